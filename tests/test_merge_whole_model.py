"""The engine's path for whole-model methods (MethodSpec.merge_model) and for per-expert data:
what it hands the method, what it writes, and how the data enters the model id."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mergesweep.errors import ConfigError, MergeError
from mergesweep.merge import methods
from mergesweep.merge.config import load_merge_yaml, planned_model_id
from mergesweep.merge.engine import merge_checkpoints
from mergesweep.merge.spec import Identity, MethodSpec, Param
from mergesweep.merge.whole import WholeModelResult
from helpers_merge import make_base, make_expert, read_state

SEEN: list = []


def _whole_average(inputs):
    """A toy whole-model method: the mean of the experts, plus what it was given."""
    SEEN.append(inputs)
    states = [read_state(p) for p in inputs.experts]
    state = {k: sum(s[k] for s in states) / len(states) for k in states[0]}
    if inputs.params["shrink"]:
        state = {k: (v[: v.shape[0] // 2] if k.endswith("mlp.up_proj.weight") else v) for k, v in state.items()}
        return WholeModelResult(state, {"intermediate_size": 24}, {"rows": 24})
    return WholeModelResult(state, {}, {"examples": inputs.calibration_settings["examples"]})


TOY = MethodSpec(
    name="toy_whole", summary="toy", paper="-", base="unused", min_experts=1,
    params=(Param("shrink", "bool", False, "drop half the up_proj rows"),),
    merge=lambda *a: (_ for _ in ()).throw(AssertionError("streamed")), merge_model=_whole_average,
    formula="mean", order_invariant=False, identities=(Identity({}, "expert"),),
)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, "toy_whole", TOY)
    SEEN.clear()
    return TOY


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("whole")
    base = make_base(d / "base")
    a, b = make_expert(base, d / "a", 1), make_expert(base, d / "b", 2)
    ca, cb = d / "a.jsonl", d / "b.jsonl"
    ca.write_text(json.dumps({"text": "one two"}) + "\n")
    cb.write_text(json.dumps({"prompt": "3+4=", "target": "7"}) + "\n")
    return d, a, b, ca, cb


def test_whole_model_method_is_run_once_and_written_like_a_merge(toy, ckpts, tmp_path):
    d, a, b, ca, cb = ckpts
    rec = merge_checkpoints("toy_whole", None, [a, b], {}, tmp_path / "out", expert_names=["a", "b"],
                            calibration={"a": ca, "b": cb}, calibration_settings={"examples": 5})
    assert len(SEEN) == 1
    got = SEEN[0]
    assert got.calibration == [ca, cb] and got.names == ["a", "b"]
    assert got.calibration_settings == {"examples": 5, "max_length": 128, "batch_size": 8}
    out, sa, sb = read_state(tmp_path / "out"), read_state(a), read_state(b)
    assert set(out) == set(sa)
    for k in sa:
        torch.testing.assert_close(out[k], (sa[k] + sb[k]) / 2)
    assert rec["method_info"] == {"examples": 5}
    assert set(rec["calibration"]) == {"a", "b"} and rec["calibration"]["a"]["uid"].startswith("data@")
    # the record's id is what `mergesweep merge --config` plans for the same YAML
    y = tmp_path / "m.yaml"
    y.write_text(json.dumps({"method": "toy_whole", "experts": [str(a), str(b)], "expert_names": ["a", "b"],
                             "calibration": {"a": str(ca), "b": str(cb)}, "calibration_settings": {"examples": 5}}))
    assert planned_model_id(load_merge_yaml(y)) == rec["model_id"]
    # and the model card's YAML reproduces it too (calibration and settings included)
    card = (tmp_path / "out" / "README.md").read_text()
    (tmp_path / "card.yaml").write_text(card.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert planned_model_id(load_merge_yaml(tmp_path / "card.yaml")) == rec["model_id"]


def test_calibration_data_and_settings_enter_the_model_id(toy, ckpts, tmp_path):
    d, a, b, ca, cb = ckpts
    ids = set()
    for calib, settings in [({"a": ca, "b": cb}, None), ({"a": cb, "b": ca}, None), ({"a": ca, "b": cb}, {"examples": 9}),
                            ({"a": {"path": ca, "uid": "u1"}, "b": {"path": cb, "uid": "u2"}}, None)]:
        out = tmp_path / f"o{len(ids)}"
        ids.add(merge_checkpoints("toy_whole", None, [a, b], {}, out, expert_names=["a", "b"], calibration=calib,
                                  calibration_settings=settings)["model_id"])
    assert len(ids) == 4


def test_reduced_width_state_with_config_updates(toy, ckpts, tmp_path):
    d, a, b, ca, cb = ckpts
    merge_checkpoints("toy_whole", None, [a, b], {"shrink": True}, tmp_path / "o", expert_names=["a", "b"],
                      calibration={"a": ca, "b": cb})
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["intermediate_size"] == 24
    assert read_state(tmp_path / "o")["model.layers.0.mlp.up_proj.weight"].shape[0] == 24


def test_bad_inputs_name_the_key_and_write_nothing(toy, ckpts, tmp_path):
    d, a, b, ca, cb = ckpts
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match=r"calibration\.b: method 'toy_whole' runs its experts"):
        merge_checkpoints("toy_whole", None, [a, b], {}, out, expert_names=["a", "b"], calibration={"a": ca})
    with pytest.raises(ConfigError, match=r"calibration\.c: not an expert"):
        merge_checkpoints("toy_whole", None, [a, b], {}, out, expert_names=["a", "b"], calibration={"c": ca})
    with pytest.raises(ConfigError, match=r"calibration\.b: calibration file .*nope.jsonl not found"):
        merge_checkpoints("toy_whole", None, [a, b], {}, out, expert_names=["a", "b"],
                          calibration={"a": ca, "b": d / "nope.jsonl"})
    with pytest.raises(ConfigError, match=r"calibration_settings\.examples: expected a positive integer"):
        merge_checkpoints("toy_whole", None, [a, b], {}, out, expert_names=["a", "b"],
                          calibration={"a": ca, "b": cb}, calibration_settings={"examples": 0})
    with pytest.raises(ConfigError, match=r"calibration: method 'linear' reads no calibration data"):
        merge_checkpoints("linear", None, [a, b], {}, out, expert_names=["a", "b"], calibration={"a": ca, "b": cb})
    with pytest.raises(ConfigError, match=r"stats: method 'linear' reads no statistics"):
        merge_checkpoints("linear", None, [a, b], {}, out, expert_names=["a", "b"], stats={"a": d, "b": d})
    assert not out.exists()


def test_a_state_with_other_tensors_is_refused(monkeypatch, ckpts, tmp_path):
    d, a, b, ca, cb = ckpts

    def drop_one(inputs):
        s = read_state(inputs.experts[0])
        s.pop(sorted(s)[0])
        return WholeModelResult(s)

    monkeypatch.setitem(methods.REGISTRY, "toy_whole", dataclasses.replace(TOY, merge_model=drop_one))
    with pytest.raises(MergeError, match=r"returned a state that lacks 'lm_head|returned a state that lacks 'model"):
        merge_checkpoints("toy_whole", None, [a], {}, tmp_path / "o", expert_names=["a"], calibration={"a": ca})
    assert not (tmp_path / "o").exists()
