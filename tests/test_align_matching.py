"""Weight and activation matching on real (tiny) checkpoints: exact recovery of a random
permutation, the map file format, the CLI, and refusal of what cannot be aligned exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergesweep.align.apply import load_perm_map, permute_state_dict, permute_tensor
from mergesweep.align.permmap import PermMap, read_meta
from mergesweep.align.spec import AlignError, arch_spec
from mergesweep.align.toy import save_random, synthetic_texts, tiny_config
from mergesweep.cli import main


def _permuted_copy(src: Path, dst: Path, pm: PermMap) -> None:
    """``dst`` = ``src`` with every tensor moved by ``pm`` (same config and tokenizer)."""
    shutil.copytree(src, dst)
    cfg = json.loads((src / "config.json").read_text())
    sd = load_file(str(src / "model.safetensors"))
    save_file(permute_state_dict(sd, pm, cfg), str(dst / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture()
def data_file(tmp_path):
    p = tmp_path / "data.jsonl"
    with open(p, "w") as f:
        for i, t in enumerate(synthetic_texts(48, seed=11)):
            rec = {"text": t} if i % 2 else {"prompt": t[: len(t) // 2], "target": t[len(t) // 2 :]}
            f.write(json.dumps(rec) + "\n")
    return p


@pytest.mark.parametrize(
    "model_type,extra",
    [("llama", dict(attention_bias=True, mlp_bias=True)), ("qwen2", {}), ("olmo2", {}), ("gemma2", {})],
)
def test_weight_matching_recovers_random_permutation(tmp_path, model_type, extra):
    cfg = tiny_config(model_type, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                      hidden_size=48, head_dim=8, intermediate_size=96, **extra)
    save_random(tmp_path / "ref", cfg, seed=0, scale=0.05)
    truth = PermMap.random(arch_spec(cfg.to_dict()), seed=5)
    _permuted_copy(tmp_path / "ref", tmp_path / "perm", truth)
    out = tmp_path / "align" / "perm.safetensors"
    rc = main(["align", "--model", str(tmp_path / "perm"), "--reference", str(tmp_path / "ref"),
               "--method", "weight_matching", "--seed", "3", "--out", str(out), "--summary", str(tmp_path / "s.json"),
               "--no-progress"])
    assert rc == 0
    pm = load_perm_map(out)
    # the inverse permutation, exactly, in every group
    inv = truth.inverse()
    for k, v in inv.tensors.items():
        assert torch.equal(pm.tensors[k], v), k
    # and the aligned weights are bit-identical to the reference
    ref = load_file(str(tmp_path / "ref" / "model.safetensors"))
    perm = load_file(str(tmp_path / "perm" / "model.safetensors"))
    for k in ref:
        assert torch.equal(permute_tensor(k, perm[k], pm, cfg.to_dict()), ref[k]), k
    meta = read_meta(out)
    assert meta["method"] == "weight_matching" and meta["seed"] == 3 and meta["converged"]
    assert 2 <= meta["iterations"] <= 6
    assert meta["objective_after"] > meta["objective_before"]
    assert meta["cosine_after"] == pytest.approx(1.0, abs=1e-6) and meta["cosine_before"] < 0.9
    assert meta["l2_after"] == pytest.approx(0.0, abs=1e-4)
    assert set(meta["identity_fraction"]) == {"residual", "mlp", "attn_heads", "v_dims", "overall"}
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["perm"] == str(out) and summary["arch"]["model_type"] == model_type
    assert "history" not in summary and len(meta["history"]) == meta["iterations"]


def test_weight_matching_objective_is_monotone_and_seeded(tmp_path):
    from mergesweep.align.data import read_state
    from mergesweep.align.weight_matching import weight_matching

    cfg = tiny_config("llama", num_hidden_layers=2)
    save_random(tmp_path / "a", cfg, seed=1, scale=0.05)
    save_random(tmp_path / "b", cfg, seed=2, scale=0.05)
    _, a = read_state(tmp_path / "a")
    _, b = read_state(tmp_path / "b")
    spec = arch_spec(cfg.to_dict())
    r1 = weight_matching(spec, a, b, seed=0, progress=False)
    r2 = weight_matching(spec, a, b, seed=0, progress=False)
    assert r1.perm_map.equals(r2.perm_map)  # same seed, same answer
    assert all(h["gain"] >= 0 for h in r1.history) and r1.history[-1]["changed"] == 0
    # unrelated random models: alignment moves most units
    assert r1.perm_map.identity_fraction()["overall"] < 0.5


def test_activation_matching_recovers_random_permutation(tmp_path, data_file):
    cfg = tiny_config("qwen2", num_hidden_layers=2)
    save_random(tmp_path / "ref", cfg, seed=0, scale=0.05)
    truth = PermMap.random(arch_spec(cfg.to_dict()), seed=9)
    _permuted_copy(tmp_path / "ref", tmp_path / "perm", truth)
    out = tmp_path / "am.safetensors"
    assert main(["align", "--model", str(tmp_path / "perm"), "--reference", str(tmp_path / "ref"),
                 "--method", "activation_matching", "--data", str(data_file), "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    pm = load_perm_map(out)
    assert pm.equals(truth.inverse())
    meta = read_meta(out)
    assert meta["method"] == "activation_matching" and meta["n_tokens"] > 200
    assert meta["cosine_after"] == pytest.approx(1.0, abs=1e-6)


def test_activation_matching_needs_data(tmp_path, capsys):
    cfg = tiny_config("llama")
    save_random(tmp_path / "m", cfg, seed=0)
    rc = main(["align", "--model", str(tmp_path / "m"), "--reference", str(tmp_path / "m"),
               "--method", "activation_matching", "--out", str(tmp_path / "x.safetensors")])
    assert rc == 1 and "--data" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_unsupported_and_mismatched_architectures_are_refused(tmp_path, capsys):
    from transformers import AutoConfig

    with pytest.raises(AlignError, match="model_type 'gpt2' is not supported"):
        arch_spec(AutoConfig.for_model("gpt2").to_dict())
    with pytest.raises(AlignError, match="partial_rotary_factor"):
        arch_spec(tiny_config("llama").to_dict() | {"partial_rotary_factor": 0.5})
    with pytest.raises(AlignError, match="mixture-of-experts"):
        arch_spec(tiny_config("llama").to_dict() | {"num_local_experts": 8})
    save_random(tmp_path / "a", tiny_config("llama"), seed=0)
    save_random(tmp_path / "b", tiny_config("llama", intermediate_size=64), seed=0)
    rc = main(["align", "--model", str(tmp_path / "b"), "--reference", str(tmp_path / "a"),
               "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert rc == 1 and "intermediate: 64 vs 128" in err and "Traceback" not in err


def test_perm_map_file_validation(tmp_path):
    spec = arch_spec(tiny_config("llama", num_attention_heads=6, num_key_value_heads=2, hidden_size=48, head_dim=8).to_dict())
    pm = PermMap.random(spec, seed=0)
    pm.meta["note"] = "x"
    pm.save(tmp_path / "ok.safetensors")
    back = load_perm_map(tmp_path / "ok.safetensors")
    assert back.equals(pm) and back.spec == spec and back.meta["note"] == "x"
    # a query head moved away from its kv head is rejected with the group named
    bad = {k: v.clone() for k, v in pm.tensors.items()}
    q = bad["layers.1.q_heads"]
    q[0], q[3] = q[3].clone(), q[0].clone()
    PermMap(spec, bad, validate=False).save(tmp_path / "bad.safetensors")
    with pytest.raises(AlignError, match="layers.1.q_heads.*grouped-query"):
        load_perm_map(tmp_path / "bad.safetensors")
    bad = {k: v.clone() for k, v in pm.tensors.items()}
    bad["layers.0.mlp"][0] = bad["layers.0.mlp"][1]
    with pytest.raises(AlignError, match="layers.0.mlp' is not a permutation"):
        PermMap(spec, bad)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(AlignError, match="not a mergesweep permutation map"):
        load_perm_map(tmp_path / "other.safetensors")
    with pytest.raises(AlignError, match="not covered by the permutation structure"):
        permute_tensor("model.layers.0.self_attn.rotary_emb.inv_freq", torch.zeros(4), pm, tiny_config(
            "llama", num_attention_heads=6, num_key_value_heads=2, hidden_size=48, head_dim=8).to_dict())
    with pytest.raises(AlignError, match="different architectures"):
        permute_tensor("model.norm.weight", torch.zeros(64), pm, tiny_config("llama").to_dict())


def test_merge_engine_applies_the_map_while_streaming(tmp_path):
    """`align:` in a merge config: averaging a model with a permuted copy of itself gives the model
    back exactly when the copy is aligned first, and something else when it is not."""
    pytest.importorskip("mergesweep.merge.engine")
    cfg = tiny_config("llama", num_hidden_layers=2)
    save_random(tmp_path / "ref", cfg, seed=0, scale=0.05)
    _permuted_copy(tmp_path / "ref", tmp_path / "perm", PermMap.random(arch_spec(cfg.to_dict()), seed=4))
    perm = tmp_path / "perm.safetensors"
    assert main(["align", "--model", str(tmp_path / "perm"), "--reference", str(tmp_path / "ref"),
                 "--out", str(perm), "--no-progress"]) == 0
    ref = load_file(str(tmp_path / "ref" / "model.safetensors"))
    for with_align in (True, False):
        doc = {"method": "linear", "base": str(tmp_path / "ref"), "experts": [str(tmp_path / "ref"), str(tmp_path / "perm")],
               "params": {}, "expert_names": ["ref", "perm"]}
        if with_align:
            doc["align"] = {"perm": str(perm)}
        (tmp_path / "m.yaml").write_text(json.dumps(doc))  # JSON is YAML
        out = tmp_path / f"merged-{with_align}"
        assert main(["merge", "--config", str(tmp_path / "m.yaml"), "--out", str(out)]) == 0
        merged = load_file(str(out / "model.safetensors"))
        same = all(torch.allclose(merged[k], ref[k], atol=1e-6) for k in ref)
        assert same is with_align
