"""The streaming engine on tiny real checkpoints (transformers save_pretrained + safetensors)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers_merge import make_base, make_expert, make_family, read_state, write_like
from mergesweep.checkpoints.layout import CheckpointError, CheckpointReader, checkpoint_fingerprint
from mergesweep.errors import ConfigError, MergeError
from mergesweep.merge.config import planned_model_id, validate_merge_config
from mergesweep.merge.engine import merge_checkpoints
from mergesweep.merge.identity import checkpoint_uid, merge_identity
from mergesweep.merge.methods import REGISTRY
from mergesweep.merge.methods.pcb import pcb as pcb_kernel
from mergesweep.merge.methods.ties import ties as ties_kernel

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """The CPU is shared: one torch thread for these tests (tests/conftest.py)."""


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    base, experts = make_family(root, 3)
    return base, experts


def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp-")]


DEFAULT_PARAMS = {
    "slerp": {"t": 0.3},
    "layer_swap": {"layers": {"per_expert": ["", "0", "2"]}},
}


# ---------------------------------------------------------------------------------------------
# every method end to end; identities through the engine
# ---------------------------------------------------------------------------------------------
def _reads_weights_only(method: str) -> bool:
    """Methods that merge from the checkpoints alone with their defaults (data-aware ones need
    statistics or calibration data: tests/test_stats_merge_contract.py, test_methods_sequential.py,
    test_pleas.py run them through the engine)."""
    from mergesweep.merge.identity import data_needs

    spec = REGISTRY[method]
    n = 1 if method == "slerp" else 3
    if spec.max_experts is not None and n > spec.max_experts:
        return False
    if spec.merge_adapters is not None:  # LoRA-native: adapters only (tests/test_lora_merge_engine.py)
        return False
    kinds, whole = data_needs(method, DEFAULT_PARAMS.get(method, {}), n)
    return not kinds and not whole


@pytest.mark.parametrize("method", [m for m in sorted(REGISTRY) if _reads_weights_only(m)])
def test_every_method_merges_and_identical_inputs_reproduce_base(method, family, tmp_path):
    base, experts = family
    spec = REGISTRY[method]
    n = 1 if method == "slerp" else 3
    params = DEFAULT_PARAMS.get(method, {})
    # identical inputs: every expert is a copy of the base
    copies = [base] * n
    meta = merge_checkpoints(method, base, copies, params, tmp_path / "same")
    want, got = read_state(base), read_state(tmp_path / "same")
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6, msg=k)
    assert meta["role"] == "merged" and meta["method"] == method
    # real experts: output differs from the base somewhere and is finite
    merge_checkpoints(method, base, experts[:n], params, tmp_path / "real")
    got = read_state(tmp_path / "real")
    assert any(not torch.equal(got[k], want[k]) for k in want), spec.name
    assert all(torch.isfinite(v).all() for v in got.values())


def test_one_expert_weight_one_reproduces_it(family, tmp_path):
    base, experts = family
    want = read_state(experts[1])
    for method, params in [("linear", {}), ("task_arithmetic", {}), ("ties", {"density": 1.0}),
                           ("dare_linear", {"density": 1.0}), ("breadcrumbs", {"density": 1.0, "gamma": 0.0})]:
        merge_checkpoints(method, base, [experts[1]], params, tmp_path / method)
        got = read_state(tmp_path / method)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6, msg=f"{method} {k}")


def test_slerp_endpoints_through_engine(family, tmp_path):
    base, experts = family
    for t, want in [(0.0, base), (1.0, experts[0])]:
        merge_checkpoints("slerp", base, [experts[0]], {"t": t}, tmp_path / f"t{t}")
        got, ref = read_state(tmp_path / f"t{t}"), read_state(want)
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    merge_checkpoints("slerp", None, experts[:2], {"t": 1.0}, tmp_path / "nobase")
    got, ref = read_state(tmp_path / "nobase"), read_state(experts[1])
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_layer_swap_takes_layers_from_the_named_expert(family, tmp_path):
    base, experts = family
    names = ["math", "lang", "other"]
    merge_checkpoints("layer_swap", None, experts, {"layers": {"lang": "0,2"}, "embeddings_from": 2},
                      tmp_path / "swap", expert_names=names)
    got = read_state(tmp_path / "swap")
    src = [read_state(e) for e in experts]
    for k, v in got.items():
        if ".layers.0." in k or ".layers.2." in k:
            assert torch.equal(v, src[1][k]), k
        elif ".layers.1." in k:
            assert torch.equal(v, src[0][k]), k
        else:
            assert torch.equal(v, src[2][k]), k
    with pytest.raises(ConfigError, match="layer 7 does not exist"):
        merge_checkpoints("layer_swap", None, experts[:2], {"layers": {"per_expert": ["", "7"]}}, tmp_path / "bad")
    _no_leftovers(tmp_path, "bad")


# ---------------------------------------------------------------------------------------------
# whole-model statistics against a brute-force reference
# ---------------------------------------------------------------------------------------------
def test_ties_scope_model_uses_whole_model_topk(family, tmp_path):
    base, experts = family
    b = read_state(base)
    es = [read_state(e) for e in experts]
    names = list(b)
    thresholds = []
    for e in es:
        flat = torch.cat([(e[k] - b[k]).abs().reshape(-1) for k in names])
        k = int(0.3 * flat.numel())
        thresholds.append(float(torch.sort(flat, descending=True).values[k - 1]))
    meta = merge_checkpoints("ties", base, experts, {"density": 0.3, "scope": "model"}, tmp_path / "m")
    assert meta["statistics"]["trim"] == pytest.approx(thresholds, rel=0, abs=0)
    got = read_state(tmp_path / "m")
    for k in names:
        want = ties_kernel(b[k], [e[k] for e in es], [1.0] * 3, [0.3] * 3, thresholds=thresholds)
        torch.testing.assert_close(got[k], want, msg=k)
    # exactly 30% of each expert's task vector survives the trim over the model
    kept = sum(int(((es[0][k] - b[k]).abs() >= thresholds[0]).sum()) for k in names)
    assert kept == int(0.3 * sum(v.numel() for v in b.values()))


def _pcb_reference(b, es, density, lam=1.0, c=1e-4):
    """PCB over whole flattened task vectors, transcribed from the paper's released code."""
    names = list(b)
    flat = torch.stack([torch.cat([(e[k] - b[k]).reshape(-1) for k in names]) for e in es])
    n, d = flat.shape

    def clamp(x, lo_ratio, hi_ratio):
        srt = torch.sort(x, dim=1).values
        lo = srt[:, int(d * lo_ratio)].unsqueeze(1)
        hi = srt[:, int(d * (1 - hi_ratio) - 1)].unsqueeze(1)
        return torch.clamp(x, lo, hi)

    def norm(x):
        mn, mx = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
        return (x - mn) / (mx - mn)

    a = clamp(flat.abs(), c, c)
    scores = torch.exp(n * norm(a) ** 2) * torch.tanh(flat * flat.sum(0))
    scale = norm(clamp(scores, 1 - density, 0))
    merged = (torch.sign(flat) * a * scale).sum(0) / scale.sum(0).clamp(min=1e-12)
    out, pos = {}, 0
    for k in names:
        m = b[k].numel()
        out[k] = b[k] + lam * merged[pos : pos + m].reshape(b[k].shape)
        pos += m
    return out


def test_pcb_scope_model_matches_reference_implementation(family, tmp_path):
    base, experts = family
    b = read_state(base)
    es = [read_state(e) for e in experts]
    merge_checkpoints("pcb", base, experts, {"density": 0.2}, tmp_path / "pcb")
    got = read_state(tmp_path / "pcb")
    want = _pcb_reference(b, es, 0.2)
    for k in b:
        torch.testing.assert_close(got[k], want[k], atol=2e-6, rtol=1e-4, msg=k)
    # per-tensor scope is the same formula within each tensor
    merge_checkpoints("pcb", base, experts, {"density": 0.2, "scope": "tensor"}, tmp_path / "pcbt")
    got = read_state(tmp_path / "pcbt")
    k = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(got[k], pcb_kernel(b[k], [e[k] for e in es], [0.2] * 3))


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------
def _digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_dare_is_bit_identical_across_runs_and_thread_counts(family, tmp_path):
    base, experts = family
    params = {"density": 0.4, "seed": 7}
    merge_checkpoints("dare_ties", base, experts, params, tmp_path / "a")
    merge_checkpoints("dare_ties", base, experts, params, tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    code = (
        "import sys, torch;"
        "from mergesweep.merge.engine import merge_checkpoints;"
        "torch.set_num_threads(2);"
        f"merge_checkpoints('dare_ties', {str(base)!r}, {[str(e) for e in experts]!r}, {params!r}, sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], check=True, cwd=ROOT,
                   env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert _digest(tmp_path / "a") == _digest(tmp_path / "c")
    merge_checkpoints("dare_ties", base, experts, {**params, "seed": 8}, tmp_path / "d")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "d")


# ---------------------------------------------------------------------------------------------
# output layout, metadata, transformers
# ---------------------------------------------------------------------------------------------
def test_output_layout_record_and_model_card(family, tmp_path):
    from mergesweep.record import read_record

    base, experts = family
    params = {"density": [0.2, 0.5, 0.8], "lambda": 0.9}
    meta = merge_checkpoints("ties", base, experts, params, tmp_path / "out", expert_names=["a", "b", "c"])
    out = tmp_path / "out"
    disk = json.loads((out / "mergesweep.json").read_text())
    assert disk == json.loads(json.dumps(meta, default=str))
    rec = read_record(out)  # the one record type, read back
    assert (rec.role, rec.stage, rec.method, rec.uid) == ("merged", "merge", "ties", rec.model_id)
    for key in ("inputs", "align", "dtype", "device", "vocab_policy", "shard_size", "files", "num_tensors",
                "num_parameters", "statistics", "expert_names"):
        assert key in rec.extra, key
    assert rec.params["density"] == [0.2, 0.5, 0.8] and rec.params["normalize"] is True
    assert rec.experts == ["a", "b", "c"] and rec.base == "base" and rec.source is None
    assert rec.model_id.startswith("ties-") and rec.runtime_s > 0 and rec.peak_rss_mb > 0
    assert rec.versions["torch"] and rec.versions["safetensors"]
    # the recorded params and id are merge_identity's, fed with the inputs' uids
    uids = [checkpoint_uid(e) for e in experts]
    want_id, resolved = merge_identity("ties", params, ["a", "b", "c"], checkpoint_uid(base), uids)
    assert rec.params == resolved and rec.model_id == want_id
    assert [d["uid"] for d in rec.extra["inputs"]] == [checkpoint_uid(base)] + uids
    # ... which is the id `mergesweep merge` plans from the same YAML
    cfg = validate_merge_config({"method": "ties", "base": str(base), "experts": [str(e) for e in experts],
                                 "params": params, "expert_names": ["a", "b", "c"]})
    assert planned_model_id(cfg) == rec.model_id
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert (out / "tokenizer_config.json").exists()
    card = (out / "README.md").read_text()
    assert "ties" in card and "Yadav" in card and "density" in card and rec.extra["inputs"][1]["fingerprint"] in card
    assert "mergesweep merge --config" in card and "torch" in card and rec.model_id in card
    # the card's YAML reproduces the merge: same id
    import yaml

    doc = yaml.safe_load(card.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert planned_model_id(validate_merge_config(doc)) == rec.model_id
    # same inputs and params -> same id; different params -> different id
    again = merge_checkpoints("ties", base, experts, params, tmp_path / "again", expert_names=["a", "b", "c"])
    other = merge_checkpoints("ties", base, experts, {**params, "lambda": 1.0}, tmp_path / "other")
    assert again["model_id"] == meta["model_id"] != other["model_id"]
    # the fingerprint computed while writing is the checkpoint_fingerprint of the output
    (out / ".mergesweep-sha256").unlink()
    assert checkpoint_fingerprint(out) == disk["fingerprint"]


def test_expect_model_id_checks_the_planned_id(family, tmp_path):
    base, experts = family
    meta = merge_checkpoints("linear", None, experts[:2], {}, tmp_path / "a")
    assert meta["base"] is None
    same = merge_checkpoints("linear", None, experts[:2], {}, tmp_path / "b", expect_model_id=meta["model_id"])
    assert same["model_id"] == meta["model_id"]
    with pytest.raises(MergeError) as err:
        merge_checkpoints("linear", None, experts[:2], {}, tmp_path / "c", expect_model_id="linear-0000000000")
    assert "linear-0000000000" in str(err.value) and meta["model_id"] in str(err.value)
    _no_leftovers(tmp_path, "c")


def test_engine_leaves_process_settings_alone(family, tmp_path):
    base, experts = family
    torch.set_num_threads(2)
    try:
        merge_checkpoints("task_arithmetic", base, experts[:1], {}, tmp_path / "out")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_sharded_output_and_sharded_input(family, tmp_path):
    base, experts = family
    merge_checkpoints("task_arithmetic", base, experts, {"lambda": 0.5}, tmp_path / "one")
    merge_checkpoints("task_arithmetic", base, experts, {"lambda": 0.5}, tmp_path / "sharded", shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    meta = json.loads((tmp_path / "sharded" / "mergesweep.json").read_text())
    (tmp_path / "sharded" / ".mergesweep-sha256").unlink()
    assert checkpoint_fingerprint(tmp_path / "sharded") == meta["fingerprint"]
    a, b = read_state(tmp_path / "one"), read_state(tmp_path / "sharded")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in a.values())
    # a sharded checkpoint is a valid input
    merge_checkpoints("linear", None, [tmp_path / "sharded"], {}, tmp_path / "again")
    c = read_state(tmp_path / "again")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_positional_reads_give_the_same_merge_as_mapped_reads(family, tmp_path, monkeypatch):
    base, experts = family
    merge_checkpoints("ties", base, experts, {"density": 0.3}, tmp_path / "mapped")
    monkeypatch.setattr(CheckpointReader, "use_mmap", False)
    merge_checkpoints("ties", base, experts, {"density": 0.3}, tmp_path / "pread")
    assert _digest(tmp_path / "mapped") == _digest(tmp_path / "pread")


def test_merged_checkpoint_loads_in_transformers_and_generates(family, tmp_path):
    from transformers import AutoModelForCausalLM

    base, experts = family
    merge_checkpoints("dare_ties", base, experts, {"density": 0.5}, tmp_path / "m", dtype="bfloat16",
                      shard_size="40KB")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert next(model.parameters()).dtype == torch.bfloat16
    state = read_state(tmp_path / "m")
    torch.testing.assert_close(model.model.embed_tokens.weight.detach(), state["model.embed_tokens.weight"])
    out = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    # the merge of identical models has the base's logits
    merge_checkpoints("ties", base, [base, base], {}, tmp_path / "same")
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(base)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "same")(ids).logits
    torch.testing.assert_close(got, want)


def test_bfloat16_inputs_and_dtype_default_from_base(tmp_path):
    base = make_base(tmp_path / "base")
    state = {k: v.to(torch.bfloat16) for k, v in read_state(base).items()}
    bbase = write_like(base, tmp_path / "bbase", state, {"dtype": "bfloat16"})
    ex = make_expert(bbase, tmp_path / "bex", seed=3)  # float32 expert of a bf16 base
    meta = merge_checkpoints("task_arithmetic", bbase, [ex], {"lambda": 0.5}, tmp_path / "out")
    assert meta["dtype"] == "bfloat16"
    got = read_state(tmp_path / "out")
    b, e = read_state(bbase), read_state(ex)
    k = "model.layers.0.self_attn.q_proj.weight"
    assert got[k].dtype == torch.bfloat16
    want = (b[k].float() + 0.5 * (e[k].float() - b[k].float())).to(torch.bfloat16)
    assert torch.equal(got[k], want)


def test_reader_dtype_precedence_config_dtype_then_torch_dtype_then_tensors(tmp_path):
    """One rule (checkpoints.layout): config `dtype`, else `torch_dtype` (each only if it names
    float32/float16/bfloat16), else the stored floating dtype holding most parameters, else
    float32. A merge without `dtype` writes that dtype."""
    base = make_base(tmp_path / "base")
    state = read_state(base)
    half = {k: v.to(torch.float16) for k, v in state.items()}
    cases = [
        ({"dtype": "bfloat16", "torch_dtype": "float16"}, state, torch.bfloat16),
        ({"dtype": None, "torch_dtype": "fp16"}, state, torch.float16),
        ({"dtype": "auto", "torch_dtype": "torch.bfloat16"}, state, torch.bfloat16),
        ({"dtype": "auto", "torch_dtype": None}, half, torch.float16),  # not a dtype: the tensors'
        ({"dtype": None, "torch_dtype": None}, {**half, "model.norm.weight": state["model.norm.weight"]},
         torch.float16),  # most parameters are float16
        ({"dtype": None, "torch_dtype": None}, {"ids": torch.arange(4)}, torch.float32),  # no floats
    ]
    for i, (cfg, tensors, want) in enumerate(cases):
        ckpt = write_like(base, tmp_path / f"c{i}", tensors, cfg)
        with CheckpointReader(ckpt) as r:
            assert r.default_dtype == want == r.torch_dtype, (cfg, r.default_dtype)
    # the merge's output dtype follows the rule, and both config keys name it
    merge_checkpoints("linear", None, [tmp_path / "c0"], {}, tmp_path / "out")
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (out_cfg["dtype"], out_cfg["torch_dtype"]) == ("bfloat16", "bfloat16")
    assert read_state(tmp_path / "out")["model.norm.weight"].dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# tied embeddings and vocabulary mismatches
# ---------------------------------------------------------------------------------------------
def test_tied_expert_over_untied_base_is_refused_unless_allowed(tmp_path, caplog):
    base = make_base(tmp_path / "base", tie_word_embeddings=False)
    b = read_state(base)
    assert "lm_head.weight" in b
    tied = {k: v + 0.01 for k, v in b.items() if k != "lm_head.weight"}
    expert = write_like(base, tmp_path / "tied", tied, {"tie_word_embeddings": True})
    with caplog.at_level(logging.WARNING, logger="mergesweep"):
        with pytest.raises(MergeError, match=r"expert 0 \(tied\): ties lm_head.*'lm_head\.weight'.*tie_policy: allow"):
            merge_checkpoints("task_arithmetic", base, [expert], {}, tmp_path / "out")
    assert any(r.levelno == logging.WARNING and "lm_head.weight" in r.getMessage() and "expert 0 (tied)"
               in r.getMessage() for r in caplog.records)
    _no_leftovers(tmp_path, "out")
    # allowed: the expert's embedding matrix stands in for its head (and it is still logged)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mergesweep"):
        merge_checkpoints("task_arithmetic", base, [expert], {}, tmp_path / "out", tie_policy="allow")
    assert any("lm_head.weight" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    got = read_state(tmp_path / "out")
    torch.testing.assert_close(got["lm_head.weight"], tied["model.embed_tokens.weight"])


def test_untied_expert_over_tied_base_is_refused_unless_allowed(tmp_path, caplog):
    tbase = make_base(tmp_path / "tbase")
    untied = {**read_state(tbase), "lm_head.weight": torch.zeros(96, 32)}
    ex = write_like(tbase, tmp_path / "untied", untied, {"tie_word_embeddings": False})
    with caplog.at_level(logging.WARNING, logger="mergesweep"):
        with pytest.raises(MergeError, match=r"expert 0 \(untied\): its own \(untied\) 'lm_head\.weight'.*lost"):
            merge_checkpoints("task_arithmetic", tbase, [ex], {}, tmp_path / "out")
    assert any(r.levelno == logging.WARNING and "'lm_head.weight'" in r.getMessage() for r in caplog.records)
    _no_leftovers(tmp_path, "out")
    # allowed: the output stays tied and the expert's head is not merged
    merge_checkpoints("task_arithmetic", tbase, [ex], {}, tmp_path / "out", tie_policy="allow")
    assert "lm_head.weight" not in read_state(tmp_path / "out")
    # an expert that stores its head but declares it tied agrees with a tied base: no error
    copy = write_like(tbase, tmp_path / "stored", {**read_state(tbase), "lm_head.weight": torch.zeros(96, 32)})
    merge_checkpoints("task_arithmetic", tbase, [copy], {}, tmp_path / "ok")
    with pytest.raises(ConfigError, match="tie_policy: 'maybe'"):
        merge_checkpoints("task_arithmetic", tbase, [ex], {}, tmp_path / "bad", tie_policy="maybe")


def _vocab_expert(base: Path, dst: Path, rows: int, shift: float = 0.5) -> Path:
    state = read_state(base)
    emb = state["model.embed_tokens.weight"]
    extra = torch.full((max(0, rows - emb.shape[0]), emb.shape[1]), 9.0)
    state["model.embed_tokens.weight"] = torch.cat([emb[:rows] + shift, extra])
    return write_like(base, dst, state, {"vocab_size": rows})


def test_vocab_mismatch_default_errors_with_tensor_and_shapes(family, tmp_path):
    base, _ = family
    big = _vocab_expert(base, tmp_path / "big", 100)
    with pytest.raises(MergeError) as err:
        merge_checkpoints("task_arithmetic", base, [big], {}, tmp_path / "out")
    msg = str(err.value)
    assert "model.embed_tokens.weight" in msg and "[100, 32]" in msg and "[96, 32]" in msg
    assert "vocab_policy" in msg
    _no_leftovers(tmp_path, "out")


def test_vocab_policy_base_and_truncate(family, tmp_path):
    base, _ = family
    b = read_state(base)["model.embed_tokens.weight"]
    big = _vocab_expert(base, tmp_path / "big", 100)
    small = _vocab_expert(base, tmp_path / "small", 90, shift=0.25)
    merge_checkpoints("task_arithmetic", base, [big, small], {}, tmp_path / "vb", vocab_policy="base")
    got = read_state(tmp_path / "vb")["model.embed_tokens.weight"]
    assert got.shape == (96, 32)
    # rows < 90: both task vectors; rows 90..95: the small expert contributes nothing there
    torch.testing.assert_close(got[:90], b[:90] + 0.75)
    torch.testing.assert_close(got[90:], b[90:] + 0.5)
    assert json.loads((tmp_path / "vb" / "config.json").read_text())["vocab_size"] == 96
    merge_checkpoints("task_arithmetic", base, [big, small], {}, tmp_path / "vt", vocab_policy="truncate")
    got = read_state(tmp_path / "vt")["model.embed_tokens.weight"]
    assert got.shape == (90, 32)
    torch.testing.assert_close(got, b[:90] + 0.75)
    assert json.loads((tmp_path / "vt" / "config.json").read_text())["vocab_size"] == 90


def test_vocab_policy_base_needs_a_base(family, tmp_path):
    """Without a base, rows an expert lacks would come from expert 0 and count it twice: refused
    before anything is read; truncate works without a base."""
    base, _ = family
    big = _vocab_expert(base, tmp_path / "big", 100)
    small = _vocab_expert(base, tmp_path / "small", 90, shift=0.25)
    with pytest.raises(ConfigError, match=r"vocab_policy: 'base'.*needs a base model"):
        merge_checkpoints("linear", None, [big, small], {}, tmp_path / "out", vocab_policy="base")
    _no_leftovers(tmp_path, "out")
    with pytest.raises(MergeError, match=r"vocabulary sizes differ\. Set vocab_policy: truncate") as err:
        merge_checkpoints("linear", None, [big, small], {}, tmp_path / "out")
    assert "vocab_policy: base" not in str(err.value)
    merge_checkpoints("linear", None, [big, small], {}, tmp_path / "vt", vocab_policy="truncate")
    got = read_state(tmp_path / "vt")["model.embed_tokens.weight"]
    b = read_state(base)["model.embed_tokens.weight"]
    torch.testing.assert_close(got, b[:90] + (0.5 + 0.25) / 2)


# ---------------------------------------------------------------------------------------------
# bad inputs: clear error, no output directory
# ---------------------------------------------------------------------------------------------
def test_missing_tensor_in_expert(family, tmp_path):
    base, _ = family
    state = read_state(base)
    del state["model.layers.1.mlp.up_proj.weight"]
    bad = write_like(base, tmp_path / "bad", state)
    with pytest.raises(MergeError, match=r"expert 1 \(bad\).*model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        merge_checkpoints("task_arithmetic", base, [family[1][0], bad], {}, tmp_path / "out")
    _no_leftovers(tmp_path, "out")


def test_shape_mismatch(family, tmp_path):
    base, _ = family
    state = read_state(base)
    state["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(32, 16)
    bad = write_like(base, tmp_path / "bad", state)
    with pytest.raises(MergeError, match=r"o_proj\.weight.*\[32, 16\].*\[32, 32\].*shape mismatch"):
        merge_checkpoints("ties", base, [bad], {}, tmp_path / "out")
    _no_leftovers(tmp_path, "out")


@pytest.mark.parametrize("bad_value,word", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_nan_or_inf_in_an_input(family, tmp_path, bad_value, word):
    base, _ = family
    state = read_state(base)
    state["model.norm.weight"][3] = bad_value
    bad = write_like(base, tmp_path / "bad", state)
    with pytest.raises(MergeError, match=rf"expert 0 \(bad\): tensor 'model\.norm\.weight'.*{word}"):
        merge_checkpoints("linear", None, [bad], {}, tmp_path / "out")
    _no_leftovers(tmp_path, "out")


def test_truncated_safetensors(family, tmp_path):
    base, experts = family
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((experts[0] / "config.json").read_bytes())
    data = (experts[0] / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"bad/model\.safetensors: truncated safetensors file"):
        merge_checkpoints("task_arithmetic", base, [bad], {}, tmp_path / "out")
    _no_leftovers(tmp_path, "out")
    (bad / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        merge_checkpoints("task_arithmetic", base, [bad], {}, tmp_path / "out")
    _no_leftovers(tmp_path, "out")


@pytest.mark.parametrize(
    "method,params,pattern",
    [
        ("ties", {"density": 1.5}, r"params\.density: 1\.5 is out of range \[0, 1\]"),
        ("ties", {"density": {"per_expert": [0.2, -0.1, 0.3]}}, r"params\.density\[1\]: -0\.1 is out of range"),
        ("ties", {"density": [0.2, 0.3]}, r"params\.density: 2 per-expert values for 3 experts"),
        ("ties", {"densty": 0.2}, r"params\.densty: unknown parameter"),
        ("ties", {"scope": "layer"}, r"params\.scope: 'layer' is not one of tensor, model"),
        ("ties", {"lambda": [0.5, 1.0]}, r"params\.lambda: expected a single value"),
        ("dare_ties", {"seed": 1.5}, r"params\.seed: expected an integer"),
        ("della", {"density": 0.1, "epsilon": 0.2}, r"params\.epsilon: density - epsilon must be > 0"),
        ("breadcrumbs", {"density": 0.95, "gamma": 0.1}, r"params\.gamma: density \+ gamma must be <= 1"),
        ("consensus", {"k": 4}, r"params\.k: 4 is more than the number of experts"),
        ("linear", {"weight": {"per_expert": [1, -1, 0]}}, r"params\.weight: the weights sum to 0"),
        ("ties", {"normalize": "yes"}, r"params\.normalize: expected true or false"),
        ("nope", {}, r"method: unknown merge method 'nope'"),
    ],
)
def test_invalid_parameters(family, tmp_path, method, params, pattern):
    base, experts = family
    with pytest.raises(ConfigError, match=pattern):
        merge_checkpoints(method, base, experts, params, tmp_path / "out")
    _no_leftovers(tmp_path, "out")


def test_invalid_inputs_and_options(family, tmp_path):
    base, experts = family
    with pytest.raises(ConfigError, match="base: method 'ties' needs a base model"):
        merge_checkpoints("ties", None, experts, {}, tmp_path / "out")
    with pytest.raises(ConfigError, match="experts: slerp with a base interpolates"):
        merge_checkpoints("slerp", base, experts[:2], {}, tmp_path / "out")
    with pytest.raises(ConfigError, match="vocab_policy"):
        merge_checkpoints("linear", None, experts, {}, tmp_path / "out", vocab_policy="pad")
    with pytest.raises(ConfigError, match="dtype"):
        merge_checkpoints("linear", None, experts, {}, tmp_path / "out", dtype="int8")
    with pytest.raises(ConfigError, match="shard_size"):
        merge_checkpoints("linear", None, experts, {}, tmp_path / "out", shard_size="lots")
    with pytest.raises(CheckpointError, match="expert 1 .*not found"):
        merge_checkpoints("linear", None, [experts[0], tmp_path / "nowhere"], {}, tmp_path / "out")
    _no_leftovers(tmp_path, "out")


def test_failure_keeps_an_existing_output_untouched(family, tmp_path):
    base, experts = family
    merge_checkpoints("linear", None, experts, {}, tmp_path / "out")
    before = _digest(tmp_path / "out")
    state = read_state(base)
    state["model.norm.weight"][0] = float("nan")
    bad = write_like(base, tmp_path / "bad", state)
    with pytest.raises(MergeError):
        merge_checkpoints("linear", None, [experts[0], bad], {}, tmp_path / "out")
    assert _digest(tmp_path / "out") == before


# ---------------------------------------------------------------------------------------------
# alignment hook (the align module is another stage's; its functions are replaced here)
# ---------------------------------------------------------------------------------------------
def test_alignment_hook_is_applied_to_the_named_expert(family, tmp_path, monkeypatch):
    import mergesweep.align.apply as apply

    from safetensors.torch import save_file

    from mergesweep.align.permmap import FORMAT, META_KEY

    base, experts = family
    perm_file = tmp_path / "perm.safetensors"  # a map file without an align job's uid: hashed
    save_file({"x": torch.zeros(1)}, str(perm_file), metadata={"format": FORMAT, META_KEY: "{}"})
    calls = []

    def fake_load(path):
        calls.append(Path(path))
        return {"flip": True}

    def fake_permute(name, tensor, perm_map, config):
        assert perm_map == {"flip": True} and config["hidden_size"] == 32
        return torch.flip(tensor, dims=[-1])

    monkeypatch.setattr(apply, "load_perm_map", fake_load)
    monkeypatch.setattr(apply, "permute_tensor", fake_permute)
    meta = merge_checkpoints("linear", None, experts[:2], {"weight": {"per_expert": [0.0, 1.0]}},
                             tmp_path / "out", align={"expert1": str(perm_file)})
    assert calls == [perm_file]
    got, e1 = read_state(tmp_path / "out"), read_state(experts[1])
    for k in e1:
        torch.testing.assert_close(got[k], torch.flip(e1[k], dims=[-1]))
    assert meta["align"]["1"]["path"] == str(perm_file)
    assert meta["align"]["1"]["uid"].startswith("sha256:")
    plain = merge_checkpoints("linear", None, experts[:2], {"weight": {"per_expert": [0.0, 1.0]}}, tmp_path / "p")
    assert plain["model_id"] != meta["model_id"]
