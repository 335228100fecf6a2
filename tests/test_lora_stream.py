"""Dense merge methods on LoRA experts: the engine streams base + ΔW per tensor
(mergesweep.lora.adapter.LoraCheckpoint), so every weight-only method gives, tensor by tensor, what
it gives on the experts' densified copies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers_merge import make_base, read_state, write_like
from mergesweep.checkpoints.layout import checkpoint_fingerprint
from mergesweep.errors import MergeError
from mergesweep.lora.adapter import AdapterError
from mergesweep.lora.write import write_adapter
from mergesweep.merge.engine import merge_checkpoints
from mergesweep.merge.identity import checkpoint_uid, data_needs
from mergesweep.merge.methods import REGISTRY
from mergesweep.merge.provenance import identify_merge

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARAMS = {"slerp": {"t": 0.3}, "layer_swap": {"layers": {"per_expert": ["", "0", "2"]}}}


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory, one_torch_thread):
    """A tiny base, three LoRA experts on every linear layer (ranks 2-4, different alphas, one
    with rsLoRA) and their densified copies base + s·B·A computed here independently."""
    root = tmp_path_factory.mktemp("lora_family")
    base = make_base(root / "base")
    state = read_state(base)
    adapters, dense = [], []
    for i in range(3):
        g = torch.Generator().manual_seed(10 + i)
        r, alpha, rs = 2 + i, 4.0 + 2 * i, i == 2
        factors, dstate = {}, dict(state)
        for name, w in state.items():
            if w.dim() == 2 and any(f".{m}." in name for m in LINEAR):
                b = torch.randn(w.shape[0], r, generator=g) * 0.05
                a = torch.randn(r, w.shape[1], generator=g) * 0.05
                factors[name] = (b, a)
                s = alpha / (r ** 0.5 if rs else r)
                dstate[name] = w + (b @ a) * s
        write_adapter(root / f"lora{i}", factors, lora_alpha=alpha, base_model_name_or_path=str(base), use_rslora=rs)
        dense.append(write_like(base, root / f"dense{i}", dstate))
        adapters.append(root / f"lora{i}")
    return base, adapters, dense


def _streaming_weight_only(method: str) -> bool:
    spec = REGISTRY[method]
    if spec.merge_adapters is not None:  # LoRA-native methods: tests of their own
        return False
    n = 1 if method == "slerp" else 3
    if spec.max_experts is not None and n > spec.max_experts:
        return False
    kinds, whole = data_needs(method, PARAMS.get(method, {}), n)
    return not kinds and not whole


@pytest.mark.parametrize("method", [m for m in sorted(REGISTRY) if _streaming_weight_only(m)])
def test_method_on_lora_experts_equals_it_on_their_densified_copies(method, lora_family, tmp_path):
    base, adapters, dense = lora_family
    n = 1 if method == "slerp" else 3
    params = PARAMS.get(method, {})
    rec = merge_checkpoints(method, base, adapters[:n], params, tmp_path / "lora", expert_names=["a", "b", "c"][:n])
    merge_checkpoints(method, base, dense[:n], params, tmp_path / "dense", expert_names=["a", "b", "c"][:n])
    got, want, b = read_state(tmp_path / "lora"), read_state(tmp_path / "dense"), read_state(base)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    if method in ("task_arithmetic", "ties"):
        assert any(not torch.equal(got[k], b[k]) for k in b)  # the adapters did change the merge
    inputs = {d["name"]: d for d in rec["inputs"]}
    assert inputs["a"]["fingerprint"] == checkpoint_fingerprint(adapters[0])
    assert inputs["a"]["uid"] == checkpoint_uid(adapters[0]) == f"sha256:{checkpoint_fingerprint(adapters[0])}"
    assert "task_arithmetic" not in method or (tmp_path / "lora" / "README.md").read_text().count(str(adapters[0])) >= 1


def test_merge_id_of_adapter_experts_is_stable_and_not_the_dense_ones(lora_family):
    base, adapters, dense = lora_family
    ids = {identify_merge("task_arithmetic", {"lambda": 0.5}, ["a", "b", "c"], base, adapters).model_id
           for _ in range(2)}
    assert len(ids) == 1
    dense_id = identify_merge("task_arithmetic", {"lambda": 0.5}, ["a", "b", "c"], base, dense).model_id
    assert dense_id not in ids
    other = identify_merge("task_arithmetic", {"lambda": 0.5}, ["a", "b", "c"], base,
                           [adapters[0], adapters[1], adapters[1]]).model_id
    assert other not in ids


def test_adapter_expert_without_base_is_refused(lora_family, tmp_path):
    base, adapters, dense = lora_family
    with pytest.raises(AdapterError, match=r"expert 0 \(lora0\): .*lora0 is a LoRA adapter: merging it needs the base"):
        merge_checkpoints("slerp", None, [adapters[0], dense[1]], {"t": 0.5}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_whole_model_method_names_the_adapter_expert(lora_family, tmp_path):
    base, adapters, dense = lora_family
    calib = tmp_path / "calib.jsonl"
    calib.write_text(json.dumps({"text": "a b c"}) + "\n")
    with pytest.raises(MergeError, match=r"expert 1 \(y\): .*lora1 is a LoRA adapter, but method 'regmean_plus_plus' "
                                         r"runs the experts as models"):
        merge_checkpoints("regmean_plus_plus", base, [dense[0], adapters[1]], {}, tmp_path / "out",
                          expert_names=["x", "y"], calibration={"x": calib, "y": calib})
    assert not (tmp_path / "out").exists()


def test_adapter_of_another_base_fails_before_writing(lora_family, tmp_path):
    base, adapters, dense = lora_family
    other = make_base(tmp_path / "other", hidden_size=16, intermediate_size=24)
    with pytest.raises(AdapterError, match=r"lora0.*module 'model.layers.0.mlp.down_proj'.* in the base .*other"):
        merge_checkpoints("task_arithmetic", other, adapters, {}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
