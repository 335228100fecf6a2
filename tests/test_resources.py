"""Per-rule resources (mergesweep.resources): the size they scale with is the real model's, GPUs
follow the stages' devices, config overrides win and still grow with the retry attempt, and the
disk summary counts what keep_models keeps."""

from __future__ import annotations

import copy

import pytest
import yaml

from helpers_pipeline import REPO
from mergesweep.errors import ConfigError
from mergesweep.plan import build_plan
from mergesweep.resources import Resources, checkpoint_params, llama_params

TINY = yaml.safe_load((REPO / "config/presets/tiny.yaml").read_text())


def plan(**changes):
    cfg = copy.deepcopy(TINY)
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        if sub:
            cfg.setdefault(section, {})[sub] = value
        else:
            cfg[section] = value
    return build_plan(cfg)


def test_recipe_estimate_is_the_built_models_size(tmp_path):
    """llama_params(recipe) counts exactly the parameters of the model the pretrain stage builds
    from that recipe (mergesweep.zoo.tiny), and checkpoint_params reads the same number back from
    the saved safetensors headers."""
    import torch
    from transformers import LlamaForCausalLM

    from mergesweep.zoo.tiny import tiny_llama_config

    recipe = TINY["base"]["pretrain"]
    cfg = tiny_llama_config(recipe["vocab_size"], hidden=recipe["hidden"], layers=recipe["layers"],
                            heads=recipe["heads"], kv_heads=recipe["kv_heads"], intermediate=recipe["intermediate"],
                            pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert llama_params(recipe) == n
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    assert checkpoint_params(tmp_path / "m") == n  # tied head stored once
    assert checkpoint_params(tmp_path / "missing") is None


def test_gpus_follow_devices():
    r = Resources(plan())  # devices auto
    assert [r.gpu(s) for s in ("pretrain", "finetune", "evaluate", "merge", "make_data", "aggregate")] == [1, 1, 1, 0, 0, 0]
    r = Resources(plan(evaluation__device="cpu", training={"device": "cpu"}, merge__device="cuda:0"))
    assert [r.gpu(s) for s in ("pretrain", "finetune", "evaluate", "merge")] == [0, 0, 0, 1]
    r = Resources(plan(evaluation__backend="vllm"))
    assert r.gpu("evaluate") == 1


def test_time_and_memory_scale_with_size_and_attempt():
    r = Resources(plan())
    small = r.runtime("evaluate", 1, units=4), r.mem_mb("finetune", 1)
    assert r.runtime("evaluate", 2, units=4) >= 2 * small[0] - 1 and r.mem_mb("finetune", 3) >= 3 * small[1] - 2
    big = Resources(plan())
    big._params = 8_000_000_000  # an 8B base: 32 GB at float32
    assert big.mem_mb("finetune", 1) > 150_000
    # 30 + 5 min per GB per suite: 30 + 5 x 32 x 4 = 670 min, inside a 24 h partition limit
    assert big.runtime("evaluate", 1, units=4) == 670 and big.runtime("evaluate", 2, units=4) == 1340
    assert big.mem_mb("merge", 1) < big.mem_mb("finetune", 1)  # merges stream tensors


def test_overrides_win_and_grow_with_attempt():
    r = Resources(plan(merge__device="cpu", resources={"merge": {"runtime": 7, "mem_mb": 900, "threads": 3}}))
    assert r.runtime("merge", 1) == 7 and r.runtime("merge", 2) == 14
    assert r.mem_mb("merge", 3) == 2700 and r.threads("merge", 1) == 3 and r.gpu("merge") == 0


@pytest.mark.parametrize("changes, message", [
    ({"merge__device": "cpu", "resources": {"merge": {"gpu": 1}}}, "resources.merge.gpu: 1, but merge.device is cpu"),
    ({"evaluation__device": "cuda", "resources": {"evaluate": {"gpu": 0}}},
     "resources.evaluate.gpu: 0, but evaluation.device is cuda"),
    ({"resources": {"aggregate": {"gpu": 2}}}, "resources.aggregate.gpu: 2, but the aggregate stage runs on CPU only"),
    ({"resources": {"merge": {"mem": 5}}}, "resources.merge.mem: unknown key"),
    ({"resources": {"evaluation": {"gpu": 1}}}, "resources.evaluation: unknown key"),
    ({"keep_models": "some"}, "keep_models: 'some' is not one of"),
    ({"evaluation__backend": "vllm", "evaluation__device": "cpu"}, "evaluation.backend: vllm runs on a GPU"),
    ({"training": {"precision": "fp8"}}, "training.precision: 'fp8' is not one of"),
])
def test_bad_resource_settings_are_named(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        plan(**changes)


def test_disk_summary_counts_what_is_kept():
    assert "3 merged model(s)" in Resources(plan()).disk_summary() and "kept (keep_models: all)" in Resources(plan()).disk_summary()
    # linear and task arithmetic over two lambdas: two sweeps, so two selected points kept
    assert "2 kept" in Resources(plan(keep_models="selected")).disk_summary()
    assert "0 kept" in Resources(plan(keep_models="none")).disk_summary()
