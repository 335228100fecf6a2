"""The ``stats`` stage on a tiny real Llama (character tokenizer), against direct computations.

* BlockRunner: embed -> blocks -> head equals ``model(ids, attention_mask).logits`` on the real
  tokens of a right-padded batch; a block of another model run in place equals that model's block.
* Gram: ``gram/<W>`` equals ``XᵀX`` of every real token's input to ``W`` stacked with plain
  forward hooks on the full model, example by example (no padding, no BlockRunner).
* Fisher: ``fisher/<p>`` equals Σ_n (∇ Σ_t log p(x_{t+1}|x_≤t))² / predicted tokens with the
  per-example gradient computed here by autograd of a cross-entropy; ``fisher_model`` the same
  with labels drawn from the model (same seed, same draw order as documented).
* The CLI writes a record ``StatsReader`` accepts for the right model and refuses for another;
  bad inputs give one error naming the option or file and write nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers_merge import make_base
from mergesweep.cli import main
from mergesweep.errors import MergeError

TEXTS = [
    "the quick fox jumps over the dog.",
    "12+30=42.",
    "a",  # one token after <s>: two tokens, kept
    "the small cat sees the big bird and the red car.",
]
PAIRS = [("7+8=", "15."), ("the cat ", "sleeps.")]
SEED = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mergesweep.align.toy import char_tokenizer

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("stats")
    base = make_base(root / "base", seed=1)
    char_tokenizer().save_pretrained(base)
    data = root / "calib.jsonl"
    recs = [{"text": t} for t in TEXTS] + [{"prompt": p, "target": t} for p, t in PAIRS]
    data.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    out = root / "out"
    rc = main(["stats", "--model", str(base), "--data", str(data), "--kind", "gram", "--kind", "fisher",
               "--kind", "fisher_model", "--examples", "100", "--max-length", "40", "--batch-size", "4",
               "--device", "cpu", "--seed", str(SEED), "--uid", "stats-test-1", "--out", str(out), "--no-progress"])
    assert rc == 0
    return {"root": root, "base": base, "data": data, "out": out}


def _model_and_examples(tiny):
    from mergesweep.align.data import load_causal_lm, load_tokenizer, read_texts

    model = load_causal_lm(tiny["base"])
    tok = load_tokenizer(tiny["base"])
    texts = read_texts(tiny["data"])
    ids = [tok(t, truncation=True, max_length=40)["input_ids"] for t in texts]
    return model, [torch.tensor(x) for x in ids if len(x) >= 2]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_blocks_reproduce_logits_on_right_padded_batch(tiny, attn):
    from transformers import AutoModelForCausalLM

    from mergesweep.stats.blocks import BlockRunner

    _, exs = _model_and_examples(tiny)
    # eager attention takes no implicit causal mask: BlockRunner must build the model's own
    model = AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32, attn_implementation=attn).eval()
    width = max(len(x) for x in exs)
    ids = torch.zeros(len(exs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, x in enumerate(exs):
        ids[j, : len(x)] = x
        mask[j, : len(x)] = 1
    assert (mask == 0).any()  # the batch is padded
    runner = BlockRunner(model)
    assert runner.num_layers == 3
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        h = runner.embed(ids)
        for i in range(runner.num_layers):
            h = runner.run_block(i, h)
        out = runner.head(h)
        # each example alone (no padding at all) agrees too
        alone = model(input_ids=exs[0][None]).logits[0]
    real = mask.bool()
    assert torch.allclose(out[real], ref[real], atol=1e-5, rtol=0)
    assert torch.allclose(out[0, : len(exs[0])], alone, atol=1e-5, rtol=0)

    other = tiny["root"] / "other"
    if not other.exists():
        make_base(other, seed=7)
    from mergesweep.align.data import load_causal_lm

    m2 = load_causal_lm(other)
    with torch.no_grad():
        h0 = runner.embed(ids)
        swapped = runner.run_block(1, h0, layer=m2.model.layers[1])
        direct = BlockRunner(m2).run_block(1, h0)
        own = runner.run_block(1, h0)
    assert torch.allclose(swapped, direct, atol=1e-6)
    assert not torch.allclose(swapped, own, atol=1e-3)


def test_gram_equals_stacked_inputs(tiny):
    from mergesweep.stats.io import StatsReader

    model, exs = _model_and_examples(tiny)
    linears = {f"{n}.weight": m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    assert len(linears) == 3 * 7
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in linears}
    hooks = [m.register_forward_hook(lambda mod, args, out, k=k: rows[k].append(args[0][0].detach().double()))
             for k, m in linears.items()]
    with torch.no_grad():
        for x in exs:
            model(input_ids=x[None])
    for h in hooks:
        h.remove()
    tokens = sum(len(x) for x in exs)
    with StatsReader(tiny["out"]) as r:
        gram_keys = set(r.names("gram"))
        assert gram_keys == set(linears)  # no lm_head, no embeddings
        for k in linears:
            X = torch.cat(rows[k])
            assert X.shape[0] == tokens
            ref = X.T @ X
            got = r.get("gram", k).double()
            assert got.dtype == torch.float64 and got.shape == ref.shape
            err = (got - ref).abs().max() / ref.abs().max()
            assert err < 1e-6, (k, float(err))
            assert r.count(k) == tokens


def _reference_fisher(model, exs, sample: bool, seed: int) -> dict[str, torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in zip(names, params)}
    gen = torch.Generator().manual_seed(seed)
    predicted = 0
    for x in exs:
        logits = model(input_ids=x[None]).logits[0, :-1]
        if sample:
            probs = torch.softmax(logits.detach(), dim=-1)
            y = torch.multinomial(probs, 1, generator=gen)[:, 0]
        else:
            y = x[1:]
        loglik = -F.cross_entropy(logits, y, reduction="sum")
        grads = torch.autograd.grad(loglik, params)
        for n, g in zip(names, grads):
            acc[n] += g.double() ** 2
        predicted += len(x) - 1
    return {n: a / predicted for n, a in acc.items()}


@pytest.mark.parametrize("kind", ["fisher", "fisher_model"])
def test_fisher_equals_per_sample_autograd(tiny, kind):
    from mergesweep.stats.io import StatsReader

    model, exs = _model_and_examples(tiny)
    ref = _reference_fisher(model, exs, sample=kind == "fisher_model", seed=SEED)
    with StatsReader(tiny["out"]) as r:
        assert r.record["data"]["fisher_tokens"] == sum(len(x) - 1 for x in exs)
        for n, want in ref.items():
            got = r.get(kind, n)
            assert got is not None and got.shape == want.shape, n
            err = (got.double() - want).abs().max() / want.abs().max()
            assert err < 1e-4, (kind, n, float(err))
        # the two kinds differ (different labels) and a tied lm_head has no entry of its own
        assert not torch.allclose(r.get("fisher", "model.norm.weight"), r.get("fisher_model", "model.norm.weight"))
        assert not r.has(kind, "lm_head.weight")


def test_cli_record_and_reader(tiny):
    from mergesweep.merge.identity import checkpoint_uid
    from mergesweep.record import sha256_file
    from mergesweep.stats.io import RECORD_KEYS, StatsReader

    uid = checkpoint_uid(tiny["base"])
    rec = json.loads((tiny["out"] / "stats.json").read_text())
    assert set(rec) == set(RECORD_KEYS)
    assert rec["stats_id"] == "stats-test-1" and rec["model_uid"] == uid
    assert rec["kinds"] == ["gram", "fisher", "fisher_model"]
    _, exs = _model_and_examples(tiny)
    assert rec["data"]["sha256"] == sha256_file(tiny["data"])
    assert rec["data"]["examples"] == len(exs) == len(TEXTS) + len(PAIRS)
    assert rec["data"]["tokens"] == sum(len(x) for x in exs)
    r = StatsReader(tiny["out"]).require(["gram", "fisher"], model_uid=uid)
    assert r.stats_id == "stats-test-1"
    with pytest.raises(MergeError, match=r"stats\.json.*another model"):
        StatsReader(tiny["out"]).require(["gram"], model_uid="someone-else@0000")

    # --examples takes the first N records; the record says how many were used
    out2 = tiny["root"] / "out2"
    assert main(["stats", "--model", str(tiny["base"]), "--data", str(tiny["data"]), "--kind", "gram",
                 "--examples", "2", "--device", "cpu", "--uid", "s2", "--out", str(out2), "--no-progress"]) == 0
    r2 = StatsReader(out2).require(["gram"], model_uid=uid)
    assert r2.record["data"]["examples"] == 2 and r2.kinds == ["gram"]
    assert r2.count("model.layers.0.mlp.down_proj.weight") == sum(len(x) for x in exs[:2])
    assert not r2.has("fisher", "model.norm.weight")


@pytest.mark.parametrize("case, needle", [
    ("missing_model", "--model"),
    ("missing_data", "--data"),
    ("empty_data", "--data"),
    ("unknown_kind", "--kind"),
    ("zero_examples", "--examples"),
])
def test_bad_inputs(tiny, case, needle, capsys):
    root = tiny["root"]
    empty = root / "empty.jsonl"
    empty.write_text("\n")
    args = {"--model": str(tiny["base"]), "--data": str(tiny["data"]), "--kind": "gram", "--examples": "4"}
    if case == "missing_model":
        args["--model"] = str(root / "nope")
    elif case == "missing_data":
        args["--data"] = str(root / "nope.jsonl")
    elif case == "empty_data":
        args["--data"] = str(empty)
    elif case == "unknown_kind":
        args["--kind"] = "hessian"
    elif case == "zero_examples":
        args["--examples"] = "0"
    out = root / f"bad_{case}"
    argv = ["stats", "--uid", "x", "--out", str(out), "--device", "cpu", "--no-progress"]
    for k, v in args.items():
        argv += [k, v]
    capsys.readouterr()
    assert main(argv) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(err) == 1 and needle in err[0], err
    for bad in ("nope", "nope.jsonl", "empty.jsonl"):
        if case.endswith(("model", "data")) and bad in args["--model"] + args["--data"]:
            assert bad in err[0]
    assert not out.exists()
    assert not any(p.name.startswith(f".bad_{case}") or p.name.startswith(f"bad_{case}") for p in root.iterdir())


@pytest.mark.parametrize("d", [100, 1000])
def test_gram_product_blocked_equals_full(d):
    """Wide inputs form only the upper block triangle; every entry is still xᵀx's."""
    from mergesweep.stats.blocks import GRAM_BLOCK, gram_product

    assert (d >= 2 * GRAM_BLOCK) == (d == 1000)
    x = torch.randn(64, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    got = gram_product(x)
    assert torch.allclose(got, x.T @ x, rtol=1e-12, atol=1e-10)
    if d == 1000:  # the lower triangle is the upper one's transpose
        assert torch.equal(got, got.T)
