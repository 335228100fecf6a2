"""LoRA extraction (truncated SVD of the task vector): exact at full rank, the Eckart–Young optimum
below it (checked against numpy's SVD), recorded honestly, refused on bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers_merge import make_base, make_expert, read_state, write_like
from mergesweep.checkpoints.layout import CheckpointError, checkpoint_fingerprint
from mergesweep.errors import ConfigError
from mergesweep.lora.adapter import AdapterReader, LoraCheckpoint
from mergesweep.lora.extract import DEFAULT_MODULES, extract_lora
from mergesweep.record import ModelRecord, read_record, write_record


@pytest.fixture(scope="module")
def pair(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("extract")
    base = make_base(root / "base")
    write_record(base, ModelRecord(model_id="tiny-base", role="base", stage="pretrain", uid="tiny-base@1"))
    expert = make_expert(base, root / "expert", seed=7)
    write_record(expert, ModelRecord(model_id="ex", role="expert", stage="finetune", domain="math", uid="ex@2"))
    return base, expert


@pytest.fixture(scope="module")
def structured(pair, tmp_path_factory):
    """An expert whose task vector is, per weight, a rank-6 matrix of decaying singular values plus
    small noise: truncation errors are then far from both 0 and ‖τ‖, so a wrong factorisation shows."""
    base, _ = pair
    g = torch.Generator().manual_seed(11)
    state = {}
    for k, w in read_state(base).items():
        if w.dim() == 2 and _adapted(k):
            u, _ = torch.linalg.qr(torch.randn(w.shape[0], 6, generator=g))
            v, _ = torch.linalg.qr(torch.randn(w.shape[1], 6, generator=g))
            s = torch.tensor([1.0, 0.6, 0.35, 0.2, 0.1, 0.05])
            w = w + (u * s) @ v.T + 1e-3 * torch.randn(w.shape, generator=g)
        state[k] = w
    return write_like(base, tmp_path_factory.mktemp("structured") / "expert", state)


def _adapted(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in DEFAULT_MODULES


def test_full_rank_reproduces_the_task_vector(pair, tmp_path):
    base, expert = pair
    rec = extract_lora(base, expert, tmp_path / "ad", rank=48, uid="ad@3")
    b, e = read_state(base), read_state(expert)
    with LoraCheckpoint(tmp_path / "ad", base) as ck:
        for k in b:
            if _adapted(k):
                torch.testing.assert_close(ck.get(k), e[k], rtol=0, atol=1e-5, msg=k)
            else:
                assert torch.equal(ck.get(k), b[k]), k
        assert ck.adapter.rank("model.layers.0.self_attn.k_proj.weight") == 16  # capped at min(out, in)
        assert ck.adapter.rank("model.layers.0.mlp.down_proj.weight") == 32
        assert ck.adapter.scaling("model.layers.0.self_attn.k_proj.weight") == 1.0
        assert ck.adapter.scaling("model.layers.0.mlp.up_proj.weight") == 1.0
    ex = rec.extra["extraction"]
    assert ex["relative_error"]["max"] < 1e-5
    inside = sum(float((e[k] - b[k]).square().sum()) for k in b if _adapted(k))
    outside = sum(float((e[k] - b[k]).square().sum()) for k in b if not _adapted(k))
    assert ex["outside_energy"] == pytest.approx(outside / (inside + outside), rel=1e-6)
    assert ex["outside_norm"] == pytest.approx((outside / (inside + outside)) ** 0.5, rel=1e-6)
    got = read_record(tmp_path / "ad")
    assert (got.role, got.stage, got.domain, got.uid, got.base) == ("expert", "extract", "math", "ad@3", "tiny-base")
    assert got.extra["adapter"]["base_fingerprint"] == checkpoint_fingerprint(base)
    assert got.extra["adapter"]["base_uid"] == "tiny-base@1"
    assert got.source["expert_uid"] == "ex@2"


@pytest.mark.parametrize("split", ["singular", "sqrt"])
def test_rank_r_error_is_the_eckart_young_optimum(pair, structured, tmp_path, split):
    base, expert = pair[0], structured
    rank = 3
    rec = extract_lora(base, expert, tmp_path / "ad", rank=rank, split=split)
    b, e = read_state(base), read_state(expert)
    per_module = rec.extra["extraction"]["relative_error_per_module"]
    assert len(per_module) == 3 * len(DEFAULT_MODULES)
    with AdapterReader(tmp_path / "ad") as ad:
        for k in ad.modules():
            tau = (e[k] - b[k]).double().numpy()
            s = np.linalg.svd(tau, compute_uv=False)
            optimum = np.sqrt(np.sum(s[rank:] ** 2))
            achieved = np.linalg.norm(tau - ad.delta(k).double().numpy())
            assert achieved == pytest.approx(optimum, rel=1e-5), k
            assert 0.1 < optimum / np.linalg.norm(tau) < 0.5
            assert per_module[k[: -len(".weight")]] == pytest.approx(optimum / np.linalg.norm(tau), rel=1e-5)
            assert ad.rank(k) == rank
        b_, a_ = ad.factors("model.layers.1.mlp.gate_proj.weight")
        if split == "singular":  # A's rows orthonormal, B's columns carry the singular values
            torch.testing.assert_close(a_ @ a_.T, torch.eye(rank), atol=1e-5, rtol=0)
        else:  # B and A share the singular values: same column / row norms
            torch.testing.assert_close(b_.norm(dim=0), a_.norm(dim=1), atol=1e-5, rtol=1e-5)


def test_lowrank_svd_is_close_to_the_optimum(pair, tmp_path):
    base, expert = pair
    rec = extract_lora(base, expert, tmp_path / "ad", rank=4, svd="lowrank")
    exact = extract_lora(base, expert, tmp_path / "ex", rank=4)
    got, want = rec.extra["extraction"]["relative_error"], exact.extra["extraction"]["relative_error"]
    assert want["mean"] <= got["mean"] <= want["mean"] * 1.05


def test_bad_inputs_are_named_and_nothing_is_written(pair, tmp_path):
    base, expert = pair
    for rank in (0, -2, 1.5):
        with pytest.raises(ConfigError, match=f"rank: expected a positive integer, got {rank}"):
            extract_lora(base, expert, tmp_path / "out", rank=rank)
    wide = make_base(tmp_path / "wide", intermediate_size=40)
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.mlp.down_proj.weight': the expert .*wide has "
                                              r"shape \[32, 40\] but the base .* has \[32, 48\]"):
        extract_lora(base, wide, tmp_path / "out", rank=2)
    with pytest.raises(ConfigError, match="modules: 'qkv_proj' matches no 2-D linear weight"):
        extract_lora(base, expert, tmp_path / "out", rank=2, modules=["q_proj", "qkv_proj"])
    with pytest.raises(ConfigError, match="split: 'half'"):
        extract_lora(base, expert, tmp_path / "out", rank=2, split="half")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]


def test_cli_extracts_and_the_adapter_merges(pair, tmp_path, capsys):
    from mergesweep.cli import main
    from mergesweep.merge.engine import merge_checkpoints

    base, expert = pair
    rc = main(["lora-extract", "--base", str(base), "--expert", str(expert), "--rank", "48", "--out",
               str(tmp_path / "ad"), "--name", "ex-lora", "--modules", "q_proj", "down_proj"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["model_id"] == "ex-lora" and out["modules"] == 6 and out["relative_error"]["max"] < 1e-5
    assert 0 < out["outside_norm"] < 1
    assert main(["lora-extract", "--base", str(base), "--expert", str(expert), "--rank", "0", "--out",
                 str(tmp_path / "bad")]) == 1
    merge_checkpoints("task_arithmetic", base, [tmp_path / "ad"], {}, tmp_path / "merged")
    got, e, b = read_state(tmp_path / "merged"), read_state(expert), read_state(base)
    q = "model.layers.2.self_attn.q_proj.weight"
    torch.testing.assert_close(got[q], e[q], rtol=0, atol=1e-5)
    assert torch.equal(got["model.layers.2.self_attn.k_proj.weight"], b["model.layers.2.self_attn.k_proj.weight"])
