"""Shared helpers for the pipeline tests: tiny real checkpoints and paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def run_cli(*args, cwd=None, check=False, env=None):
    """Run ``python -m mergesweep ARGS`` and return the CompletedProcess (text)."""
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([PY, "-m", "mergesweep", *map(str, args)], cwd=cwd, capture_output=True, text=True, env=e)
    if check and proc.returncode != 0:
        raise AssertionError(f"mergesweep {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


def tiny_checkpoint(path: Path, seed: int = 0, hidden: int = 32, vocab: int = 64) -> Path:
    """A real, random tiny Llama checkpoint saved as safetensors (no tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def tiny_eval_model(root: Path, suites: list[str], model_id: str, train: int = 60, validation: int = 4,
                    test: int = 4) -> Path:
    """Skill data and task YAMLs for ``suites`` (``mergesweep make-data`` into ``root/data/<suite>``
    and ``root/tasks/<suite>``) and a random tiny Llama with a tokenizer trained on them and a model
    record, saved to ``root/models/<model_id>``: a real checkpoint lm-eval can evaluate."""
    import torch
    from transformers import LlamaForCausalLM

    from mergesweep.cli import main
    from mergesweep.record import ModelRecord, write_record
    from mergesweep.zoo.tiny import read_records, tiny_llama_config, train_tokenizer

    for s in suites:
        assert main(["make-data", "--suite", s, "--train", str(train), "--validation", str(validation),
                     "--test", str(test), "--data-dir", str(root / "data" / s),
                     "--tasks-dir", str(root / "tasks" / s)]) == 0
    recs = read_records([root / "data" / s for s in suites])
    tok = train_tokenizer([r["prompt"] + r["target"] for r in recs], vocab_size=300)
    cfg = tiny_llama_config(len(tok), hidden=32, intermediate=64, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = root / "models" / model_id
    LlamaForCausalLM(cfg).save_pretrained(model, safe_serialization=True)
    tok.save_pretrained(model)
    write_record(model, ModelRecord(model_id=model_id, role="base", stage="pretrain", uid=f"{model_id}@0"))
    return model
