"""Linear mode connectivity in the tiny preset: two bases pretrained from different seeds (a
barrier that alignment lowers) and two experts fine-tuned from one base (aligned by the identity,
no barrier). Everything runs through the real ``mergesweep align`` / ``mergesweep lmc`` CLI."""

from __future__ import annotations

import json

import pytest

from mergesweep.align.lmc import barrier
from mergesweep.align.permmap import read_meta
from mergesweep.align.toy import synthetic_texts, tiny_config, train_tiny
from mergesweep.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two tiny Llama bases (hidden 64, 2 layers, 4 query / 2 kv heads) from seeds 1 and 2, and two
    experts fine-tuned from base 1 on different skills; a held-out prompt/target jsonl."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = tiny_config("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    info = {}
    for seed in (1, 2):
        info[f"base{seed}"] = train_tiny(root / f"base{seed}", seed=seed, steps=150, config=cfg)
    for seed, skill in ((3, "grammar"), (4, "arithmetic")):
        info[skill] = train_tiny(root / f"expert-{skill}", seed=seed, steps=25, init_from=root / "base1",
                                 skill=skill, lr=1e-3)
    with open(root / "validation.jsonl", "w") as f:
        for t in synthetic_texts(64, seed=12345):
            f.write(json.dumps({"prompt": t[: len(t) // 2], "target": t[len(t) // 2 :]}) + "\n")
    return root, info


def test_barrier_formula():
    assert barrier([0, 0.5, 1], [1.0, 2.0, 3.0]) == pytest.approx(0.0)
    assert barrier([0, 0.25, 0.5, 0.75, 1], [1.0, 1.5, 3.0, 2.0, 1.0]) == pytest.approx(2.0)
    assert barrier([0, 0.5, 1], [2.0, 1.0, 2.0]) == pytest.approx(0.0)  # below the chord: endpoints give 0


def test_tiny_bases_from_different_seeds_alignment_lowers_barrier(tiny, capsys):
    root, info = tiny
    assert info["base1"]["loss_last"] < 1.2 and info["base2"]["loss_last"] < 1.2  # both learned the data
    perm = root / "align" / "base2-onto-base1.safetensors"
    assert main(["align", "--model", str(root / "base2"), "--reference", str(root / "base1"),
                 "--method", "weight_matching", "--seed", "0", "--out", str(perm), "--no-progress"]) == 0
    meta = read_meta(perm)
    assert meta["identity_fraction"]["overall"] < 0.3  # independent inits: most units move
    out = root / "lmc" / "bases.json"
    plot = root / "lmc" / "bases.png"
    assert main(["lmc", "--model-a", str(root / "base1"), "--model-b", str(root / "base2"), "--perm", str(perm),
                 "--data", str(root / "validation.jsonl"), "--points", "11", "--out", str(out),
                 "--plot", str(plot), "--threads", "1"]) == 0
    res = json.loads(out.read_text())
    assert res["alphas"] == pytest.approx([i / 10 for i in range(11)])
    assert len(res["loss"]) == len(res["loss_aligned"]) == 11
    # permuting B does not change B: same endpoint losses
    assert res["loss_aligned"][-1] == pytest.approx(res["loss"][-1], abs=1e-4)
    assert res["loss_aligned"][0] == res["loss"][0]
    assert res["barrier"] == pytest.approx(barrier(res["alphas"], res["loss"]))
    # separately trained bases are not linearly connected; alignment lowers the barrier
    assert res["barrier"] > 0.3
    assert res["barrier_aligned"] < 0.9 * res["barrier"]
    assert res["perm_method"] == "weight_matching" and res["n_tokens"] > 500
    assert (res["model_a_id"], res["model_b_id"]) == ("base1", "base2")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with capsys.disabled():
        print(f"\n[tiny preset] barrier naive {res['barrier']:.3f} -> aligned {res['barrier_aligned']:.3f}; "
              f"loss A {res['loss_a']:.3f}, B {res['loss_b']:.3f}")


def test_tiny_bases_activation_matching_lowers_barrier(tiny, capsys):
    root, _ = tiny
    perm = root / "align" / "am.safetensors"
    data = root / "validation.jsonl"
    assert main(["align", "--model", str(root / "base2"), "--reference", str(root / "base1"),
                 "--method", "activation_matching", "--data", str(data), "--out", str(perm), "--no-progress",
                 "--threads", "1"]) == 0
    out = root / "lmc" / "am.json"
    assert main(["lmc", "--model-a", str(root / "base1"), "--model-b", str(root / "base2"), "--perm", str(perm),
                 "--data", str(data), "--points", "5", "--out", str(out), "--threads", "1"]) == 0
    res = json.loads(out.read_text())
    assert res["barrier_aligned"] < res["barrier"]
    with capsys.disabled():
        print(f"\n[tiny preset, activation matching, 5 points] barrier {res['barrier']:.3f} -> {res['barrier_aligned']:.3f}")


def test_same_base_experts_align_to_identity(tiny):
    root, info = tiny
    assert info["grammar"]["loss_last"] < info["base1"]["loss_last"] + 0.5
    perm = root / "align" / "expert.safetensors"
    assert main(["align", "--model", str(root / "expert-arithmetic"), "--reference", str(root / "expert-grammar"),
                 "--out", str(perm), "--no-progress"]) == 0
    meta = read_meta(perm)
    assert meta["identity_fraction"]["overall"] == 1.0, meta["identity_fraction"]
    assert meta["iterations"] == 1  # the first sweep already changes nothing
    out = root / "lmc" / "experts.json"
    assert main(["lmc", "--model-a", str(root / "expert-grammar"), "--model-b", str(root / "expert-arithmetic"),
                 "--data", str(root / "validation.jsonl"), "--points", "5", "--out", str(out), "--threads", "1"]) == 0
    res = json.loads(out.read_text())
    assert "loss_aligned" not in res
    assert res["barrier"] < 0.05  # fine-tuned from one base: linearly mode-connected
