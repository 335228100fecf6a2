"""PLeaS (``mergesweep.merge.methods.pleas``) on the tiny preset: two Llama bases pretrained from
different seeds on the embedded skills (the preset's architecture and recipe, fewer steps), merged
through the real engine (``merge_checkpoints``) with each base's own calibration data.

Asserted against independent computations: the merged model's validation loss against plain
averaging after weight matching (``mergesweep align`` + ``linear`` with the map) and against the
two bases themselves; a model merged with itself against that model; the least-squares core
against numpy's ``lstsq``; the partial-matching split against hand-counted numbers."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers_merge import make_base
from mergesweep.errors import ConfigError, MergeError

REPO = Path(__file__).resolve().parents[1]
SKILLS = ("arithmetic", "reverse", "dateformat")
PRETRAIN_STEPS = 200  # the preset pretrains 450 steps (~30 s on one core); 200 take ~10 s
PER_SKILL_CALIBRATION = 30  # records of each skill per expert (two disjoint slices of train)


def _pretrain_args(argv):
    from mergesweep.zoo import cli_pretrain

    p = argparse.ArgumentParser()
    cli_pretrain.add_arguments(p)
    return p.parse_args(argv)


@pytest.fixture(scope="module")
def bases(tmp_path_factory, one_torch_thread):
    """Two tiny bases (the preset's architecture: hidden 64, 2 layers, 8 query / 4 kv heads,
    intermediate 128, a 512-token BPE shared by both) from seeds 1 and 2; per-base calibration
    files (disjoint train slices of every skill) and the skills' validation splits."""
    from mergesweep.zoo import cli_pretrain
    from mergesweep.zoo.cli_data import make_suite

    root = tmp_path_factory.mktemp("pleas")
    pre = yaml.safe_load((REPO / "config/presets/tiny.yaml").read_text())["base"]["pretrain"]
    dirs = []
    for s in SKILLS:
        make_suite(s, 0, {"train": 1500, "validation": 40, "test": 1}, root / "data" / s, root / "tasks")
        dirs.append(root / "data" / s)
    common = ["--data-dirs", *map(str, dirs), "--steps", str(PRETRAIN_STEPS), "--batch-size", str(pre["batch_size"]),
              "--lr", str(pre["lr"]), "--hidden", str(pre["hidden"]), "--layers", str(pre["layers"]),
              "--heads", str(pre["heads"]), "--kv-heads", str(pre["kv_heads"]),
              "--intermediate", str(pre["intermediate"]), "--vocab-size", str(pre["vocab_size"]),
              "--threads", "1", "--device", "cpu", "--precision", "fp32"]
    b1, b2 = root / "base1", root / "base2"
    assert cli_pretrain.run(_pretrain_args(common + ["--name", "base1", "--out", str(b1), "--seed", "1"])) == 0
    assert cli_pretrain.run(_pretrain_args(common + ["--name", "base2", "--out", str(b2), "--seed", "2",
                                                     "--tokenizer-from", str(b1)])) == 0
    train = {s: (root / "data" / s / "train.jsonl").read_text().splitlines() for s in SKILLS}
    cal = []
    for i in range(2):
        path = root / f"calibration{i}.jsonl"
        k = PER_SKILL_CALIBRATION
        path.write_text("".join(line + "\n" for s in SKILLS for line in train[s][i * k:(i + 1) * k]))
        cal.append(path)
    val = root / "validation.jsonl"
    val.write_text("".join((root / "data" / s / "validation.jsonl").read_text() for s in SKILLS))
    return {"root": root, "a": b1, "b": b2, "cal": cal, "val": val, "pretrain": pre}


def _loss(model_dir: Path, val: Path) -> float:
    from mergesweep.align.data import load_causal_lm, load_tokenizer, read_texts, tokenize_batches
    from mergesweep.align.lmc import mean_loss

    batches = tokenize_batches(load_tokenizer(model_dir), read_texts(val), 32, 128)
    loss, n = mean_loss(load_causal_lm(model_dir), batches)
    assert n > 1000 and math.isfinite(loss)
    return loss


def _pleas(t, out: Path, params: dict, experts=None) -> dict:
    from mergesweep.merge.engine import merge_checkpoints

    experts = experts or [t["a"], t["b"]]
    return merge_checkpoints("pleas", None, experts, params, out, calibration={0: t["cal"][0], 1: t["cal"][1]},
                             calibration_settings={"examples": 3 * PER_SKILL_CALIBRATION, "batch_size": 16})


def test_full_width_beats_weight_matching_average(bases, capsys):
    from mergesweep.cli import main
    from mergesweep.merge.engine import merge_checkpoints

    t, root = bases, bases["root"]
    loss_a, loss_b = _loss(t["a"], t["val"]), _loss(t["b"], t["val"])
    assert max(loss_a, loss_b) < 1.2  # both bases learned the data
    # the baseline: weight matching, then plain averaging with the map
    perm = root / "wm.safetensors"
    assert main(["align", "--model", str(t["b"]), "--reference", str(t["a"]), "--method", "weight_matching",
                 "--out", str(perm), "--no-progress", "--threads", "1"]) == 0
    merge_checkpoints("linear", None, [t["a"], t["b"]], {}, root / "wm-linear", align={1: perm})
    loss_wm = _loss(root / "wm-linear", t["val"])

    rec = _pleas(t, root / "pleas-full", {"width": 1.0})
    loss_pleas = _loss(root / "pleas-full", t["val"])
    with capsys.disabled():
        print(f"\n[pleas, tiny bases seeds 1/2] validation loss: base A {loss_a:.4f}, base B {loss_b:.4f}, "
              f"weight matching + average {loss_wm:.4f}, PLeaS width 1.0 {loss_pleas:.4f}")
    assert loss_pleas < loss_wm
    # and it closes most of the gap between the averaged model and the better input
    best = min(loss_a, loss_b)
    assert loss_pleas < best + 0.5 * (loss_wm - best)

    info = rec["method_info"]
    assert rec["config_updates"] is None
    assert json.loads((root / "pleas-full" / "config.json").read_text())["intermediate_size"] == 128
    assert info["intermediate_size"] == {"input": 128, "merged": 128}
    assert info["fraction_matched"] == 1.0 and info["matching"] == "activation"
    assert info["calibration"]["sequences"] == 2 * 3 * PER_SKILL_CALIBRATION
    assert len(info["layers"]) == t["pretrain"]["layers"]
    for layer in info["layers"]:
        assert layer["mlp"]["merged"] == 128 and layer["mlp"]["separate_per_model"] == 0
        fits = layer["least_squares"]
        assert set(fits) == {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}
        for name, r in fits.items():  # the fit never does worse than its starting point, on its own data
            assert 0 <= r["after"] <= r["before"] * (1 + 1e-6), (layer["layer"], name, r)
        assert fits["mlp.down_proj"]["after"] < 0.5 * fits["mlp.down_proj"]["before"]


def test_half_width_loads_in_transformers_and_generates(bases, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t, root = bases, bases["root"]
    out = root / "pleas-half"
    rec = _pleas(t, out, {"width": 0.5, "budget_ratio": 0.5})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intermediate_size"] == 64 and cfg["hidden_size"] == 64
    assert rec["config_updates"] == {"intermediate_size": 64}
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert model.config.intermediate_size == 64
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.weight.shape == (64, 64) and mlp.down_proj.weight.shape == (64, 64)
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("12+34=", return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids.shape[1] + 6
    text = tok.decode(gen[0, ids.shape[1]:])
    # 64 units: floor(0.5 * 64 / 1.5) = 21 kept from each model, 64 - 42 = 22 merged pairs
    info = rec["method_info"]
    for layer in info["layers"]:
        assert (layer["mlp"]["merged"], layer["mlp"]["separate_per_model"]) == (22, 21)
    assert info["fraction_matched"] == pytest.approx(22 / 64, abs=1e-5)
    loss = _loss(out, t["val"])
    with capsys.disabled():
        print(f"\n[pleas width 0.5, budget_ratio 0.5] validation loss {loss:.4f}; '12+34=' -> {text!r}")
    assert loss < 1.2  # half the MLP, and still as good as the bases are required to be


def test_merging_a_model_with_itself_returns_it(bases):
    """Identical inputs: identity permutations, every target the model's own output on its own
    inputs, so every least squares returns the model's weights."""
    from mergesweep.align.data import read_state
    from mergesweep.merge.methods._pleas import pleas_merge
    from mergesweep.merge.whole import WholeModelInputs

    t = bases
    res = pleas_merge(WholeModelInputs(base=None, experts=[t["a"], t["a"]], names=["a", "a2"],
                                       params={"width": 1.0, "budget_ratio": 0.0, "ridge": 1e-3,
                                               "matching": "activation", "seed": 0},
                                       calibration=t["cal"], calibration_settings={"examples": 20},
                                       device=torch.device("cpu")))
    _, ref = read_state(t["a"])
    assert set(res.state) == set(ref) and res.config_updates == {}
    for k, v in ref.items():
        assert torch.allclose(res.state[k], v, atol=2e-5, rtol=1e-4), k
    assert res.info["alignment_identity_fraction"] == 1.0
    for layer in res.info["layers"]:
        assert all(r["after"] < 1e-8 for r in layer["least_squares"].values())


def test_ridge_toward_is_the_regularised_least_squares():
    """``argmin ||X W^T - Y||^2 + lam ||W - W0||^2`` against numpy's lstsq on the stacked system
    ``[X; sqrt(lam) I] W^T = [Y; sqrt(lam) W0^T]``, and the plain least squares at lam = 0."""
    from mergesweep.merge.methods._pleas import ridge_toward

    rng = np.random.default_rng(0)
    X, Y, W0 = rng.normal(size=(40, 6)), rng.normal(size=(40, 3)), rng.normal(size=(3, 6))
    G, C = torch.from_numpy(X.T @ X), torch.from_numpy(X.T @ Y)
    for lam in (0.0, 0.7, 25.0):
        A = np.vstack([X, math.sqrt(lam) * np.eye(6)])
        B = np.vstack([Y, math.sqrt(lam) * W0.T])
        want = np.linalg.lstsq(A, B, rcond=None)[0].T
        got = ridge_toward(G, C, torch.from_numpy(W0), lam).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)
    # rank-deficient X (2 distinct inputs of 6): the solution closest to W0, finite
    Xr = np.repeat(rng.normal(size=(2, 6)), 20, axis=0)
    got = ridge_toward(torch.from_numpy(Xr.T @ Xr), torch.from_numpy(Xr.T @ Y), torch.from_numpy(W0), 0.0).numpy()
    assert np.isfinite(got).all()
    delta = np.linalg.pinv(Xr) @ (Y - Xr @ W0.T)
    np.testing.assert_allclose(got, (W0.T + delta).T, atol=1e-6)


def test_bad_inputs(bases, tmp_path):
    from mergesweep.merge.engine import merge_checkpoints
    from mergesweep.merge.methods._pleas import pleas_merge
    from mergesweep.merge.whole import WholeModelInputs

    t = bases
    cal = {0: t["cal"][0], 1: t["cal"][1], 2: t["cal"][0]}
    with pytest.raises(ConfigError, match=r"^experts: method 'pleas' takes 2 experts, got 3"):
        merge_checkpoints("pleas", None, [t["a"], t["b"], t["a"]], {}, tmp_path / "three", calibration=cal)
    with pytest.raises(ConfigError, match=r"^params\.width: 0(\.0)? is out of range \(0, 1\]"):
        merge_checkpoints("pleas", None, [t["a"], t["b"]], {"width": 0}, tmp_path / "w0",
                          calibration={0: t["cal"][0], 1: t["cal"][1]})
    with pytest.raises(ConfigError, match=r"^params\.budget_ratio"):
        merge_checkpoints("pleas", None, [t["a"], t["b"]], {"budget_ratio": 1.5}, tmp_path / "r",
                          calibration={0: t["cal"][0], 1: t["cal"][1]})

    def direct(experts, params):
        return pleas_merge(WholeModelInputs(base=None, experts=experts, names=[str(i) for i in range(len(experts))],
                                            params=params, calibration=[t["cal"][0]] * len(experts),
                                            calibration_settings={}, device=torch.device("cpu")))

    with pytest.raises(ConfigError, match=r"^params\.width"):
        direct([t["a"], t["b"]], {"width": 0.0})
    with pytest.raises(ConfigError, match=r"^experts"):
        direct([t["a"], t["b"], t["a"]], {})
    # different hidden sizes: no permutation maps one onto the other
    h32 = make_base(tmp_path / "h32", hidden_size=32)
    h48 = make_base(tmp_path / "h48", hidden_size=48, seed=1)
    with pytest.raises(MergeError, match=r"different architectures \(hidden: 48 vs 32"):
        merge_checkpoints("pleas", None, [h32, h48], {}, tmp_path / "arch",
                          calibration={0: t["cal"][0], 1: t["cal"][1]})
    assert not (tmp_path / "arch").exists()
    with pytest.raises(MergeError, match="expert 1 .* has no calibration data"):
        pleas_merge(WholeModelInputs(base=None, experts=[t["a"], t["b"]], names=["a", "b"], params={},
                                     calibration=[t["cal"][0], None], calibration_settings={},
                                     device=torch.device("cpu")))
