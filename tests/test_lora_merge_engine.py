"""LoRA-native merges through the real engine (mergesweep.merge.engine.merge_checkpoints) on PEFT
adapters over a tiny base: lora_lego / knots outputs load with peft and apply the kernels'
updates; rmm + revert gives every expert back; dense experts and wrong ids are refused with
nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_merge import make_base, make_expert, read_state
from mergesweep.cli import main
from mergesweep.errors import ConfigError, MergeError
from mergesweep.lora.write import write_adapter
from mergesweep.merge.engine import merge_checkpoints
from mergesweep.merge.methods import _lora
from mergesweep.merge.provenance import identify_merge

TARGETS = ("q_proj", "v_proj", "down_proj")
NAMES = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory, one_torch_thread):
    """A tiny base and three adapters (ranks 2-4, different alphas, one rsLoRA; the third does not
    adapt down_proj), with each expert's factors and scaling as written (the independent truth)."""
    root = tmp_path_factory.mktemp("lora_native")
    base = make_base(root / "base")
    state = read_state(base)
    adapters, truth = [], []
    for i in range(3):
        g = torch.Generator().manual_seed(70 + i)
        r, alpha, rs = 2 + i, 4.0 + 2 * i, i == 1
        factors = {}
        for name, w in state.items():
            if w.dim() == 2 and any(f".{m}." in name for m in TARGETS) and not (i == 2 and "down_proj" in name):
                factors[name] = (torch.randn(w.shape[0], r, generator=g) * 0.1,
                                 torch.randn(r, w.shape[1], generator=g) * 0.1)
        write_adapter(root / NAMES[i], factors, lora_alpha=alpha, base_model_name_or_path=str(base), use_rslora=rs)
        adapters.append(root / NAMES[i])
        truth.append({n: (b, a, alpha / (r ** 0.5 if rs else r)) for n, (b, a) in factors.items()})
    return base, adapters, truth


def peft_deltas(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """What peft applies: the merged model's weights minus the base's (peft loads the adapter)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    ref = read_state(base)
    return {k: merged[k] - ref[k] for k in ref if k in merged and not torch.equal(merged[k], ref[k])}


def truth_delta(f) -> torch.Tensor:
    b, a, s = f
    return (b.double() @ a.double() * s).float()


def assert_deltas(got: dict, want: dict, atol=2e-6):
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=1e-4, msg=k)


def test_lora_lego_writes_an_adapter_peft_applies_and_the_dense_model(lora_family, tmp_path):
    base, adapters, truth = lora_family
    params = {"rank": 3, "dense": True}
    rec = merge_checkpoints("lora_lego", base, adapters, params, tmp_path / "lego", expert_names=NAMES)
    out = tmp_path / "lego"
    # the plan's id: the same inputs and raw parameters
    assert rec["model_id"] == identify_merge("lora_lego", params, NAMES, base, adapters).model_id
    assert rec["role"] == "merged" and rec["method"] == "lora_lego"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "mergesweep.json",
            "dense/model.safetensors", "dense/config.json"} <= set(rec["files"])
    assert all((out / f).is_file() for f in rec["files"])
    assert rec["adapter"]["base_uid"] and rec["adapter"]["modules"] == 9
    # the kernel on the experts' factors (None where an expert does not adapt the module)
    want = {}
    for name in truth[0]:
        r = _lora.lora_lego([t.get(name) for t in truth], 3, "dual")
        want[name] = r.b @ r.a
    assert_deltas(peft_deltas(base, out), want)
    dense = read_state(out / "dense")
    ref = read_state(base)
    assert set(dense) == set(ref)
    for k, w in ref.items():
        torch.testing.assert_close(dense[k], w + want[k] if k in want else w, atol=2e-6, rtol=0, msg=k)
    assert json.loads((out / "dense" / "mergesweep.json").read_text())["model_id"] == rec["model_id"]
    assert "lora_lego" in (out / "README.md").read_text()


def test_rmm_with_as_many_components_as_experts_reverts_every_expert(lora_family, tmp_path):
    base, adapters, truth = lora_family
    rec = merge_checkpoints("rmm", base, adapters, {"components": 3}, tmp_path / "rmm", expert_names=NAMES)
    meta = json.loads((tmp_path / "rmm" / "rmm.json").read_text())
    assert meta["tasks"] == NAMES and meta["components"] == 3
    assert max(meta["reconstruction"]["relative_error"].values()) < 1e-5
    assert sorted(rec["files"]) == ["README.md", "mergesweep.json", "rmm.json", "rmm.safetensors"]
    for i, name in enumerate(NAMES):
        out = tmp_path / f"rev-{name}"
        assert main(["revert", "--merged", str(tmp_path / "rmm"), "--task", name, "--out", str(out),
                     "--model-id", f"{rec['model_id']}--{name}"]) == 0
        got = peft_deltas(base, out)  # loads with peft
        assert_deltas(got, {k: truth_delta(f) for k, f in truth[i].items()}, atol=1e-5)
        r = json.loads((out / "mergesweep.json").read_text())
        assert r["role"] == "reverted" and r["stage"] == "revert" and r["model_id"] == f"{rec['model_id']}--{name}"
        assert r["reverted_from"] == rec["model_id"] and r["task"] == name
        # the reverted adapter has the expert's rank
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["r"] == 2 + i
    from mergesweep.lora.revert import revert

    with pytest.raises(ConfigError, match=r"'delta' is not a task .*\(tasks: alpha, beta, gamma\)"):
        revert(tmp_path / "rmm", "delta", tmp_path / "x")
    assert main(["revert", "--merged", str(tmp_path / "rmm"), "--task", "delta", "--out", str(tmp_path / "x")]) != 0
    assert not (tmp_path / "x").exists()


def test_rmm_with_one_component_reports_the_best_rank1_error(lora_family, tmp_path):
    base, adapters, truth = lora_family
    merge_checkpoints("rmm", base, adapters, {"components": 1}, tmp_path / "rmm1", expert_names=NAMES)
    meta = json.loads((tmp_path / "rmm1" / "rmm.json").read_text())
    err, norm = np.zeros(3), np.zeros(3)
    for name in truth[0]:  # per module, the best rank-1 approximation of the stacked updates (numpy)
        rows = np.stack([truth_delta(t[name]).double().numpy().ravel() if name in t else
                         np.zeros(truth_delta(truth[0][name]).numel()) for t in truth])
        u, s, vt = np.linalg.svd(rows, full_matrices=False)
        err += ((rows - (u[:, :1] * s[:1]) @ vt[:1]) ** 2).sum(1)
        norm += (rows ** 2).sum(1)
    got = [meta["reconstruction"]["relative_error"][n] for n in NAMES]
    np.testing.assert_allclose(got, np.sqrt(err / norm), rtol=1e-4, atol=1e-6)
    # the reverted task applies that approximation: its update is the projection onto the one
    # component, c_k * Phi_1, so the three reverted updates of a module are parallel
    from mergesweep.lora.revert import revert

    revs = {}
    for name in NAMES:
        revert(tmp_path / "rmm1", name, tmp_path / f"rev1-{name}")
        revs[name] = peft_deltas(base, tmp_path / f"rev1-{name}")
    for k in truth[0]:
        # gamma does not adapt down_proj: its coefficient there is 0, so its adapter leaves it out
        flat = np.stack([revs[n][k].double().numpy().ravel() for n in NAMES if k in revs[n]])
        assert len(flat) == (2 if "down_proj" in k else 3), k
        s = np.linalg.svd(flat, compute_uv=False)
        assert s[1] <= 1e-4 * s[0], (k, s)


def test_knots_output_loads_and_task_arithmetic_is_the_sum(lora_family, tmp_path):
    base, adapters, truth = lora_family
    merge_checkpoints("knots", base, adapters, {}, tmp_path / "knots")
    got = peft_deltas(base, tmp_path / "knots")
    assert set(got) == set(truth[0])
    merge_checkpoints("knots", base, adapters, {"method": "task_arithmetic", "lambda": 0.5}, tmp_path / "ta")
    want = {k: 0.5 * sum(truth_delta(t[k]) for t in truth if k in t) for k in truth[0]}
    assert_deltas(peft_deltas(base, tmp_path / "ta"), want)


def test_a_dense_expert_is_refused_by_name_and_nothing_is_written(lora_family, tmp_path):
    base, adapters, _ = lora_family
    dense = make_expert(base, tmp_path / "dense_expert", seed=5)
    for method in ("lora_lego", "rmm", "knots"):
        with pytest.raises(MergeError, match=r"expert 1 \(dense_expert\).*not a LoRA adapter"):
            merge_checkpoints(method, base, [adapters[0], dense], {}, tmp_path / method)
        assert not (tmp_path / method).exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{method}.")]
    with pytest.raises(MergeError, match="model id mismatch"):
        merge_checkpoints("lora_lego", base, adapters, {}, tmp_path / "lego", expect_model_id="lora-lego-0000")
    assert not (tmp_path / "lego").exists()
