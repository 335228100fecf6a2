"""A PEFT LoRA adapter is evaluated over its base with lm-eval's ``peft=`` (issue 13, item 4):
its scores equal those of the same adapter merged into a dense checkpoint, and differ from the
base's (the adapter was really applied); an adapter without ``--base``, a ``--base`` that is not a
dense checkpoint, a base whose fingerprint is not the adapter's, and the vLLM backend are refused
before anything is loaded or written.

Real lm-eval, real peft, a real tiny Llama with a tokenizer, a real generated suite (``mergesweep
make-data``), through the real ``mergesweep evaluate`` entry point. The per-example
log-likelihoods (``--log-samples``) are compared, not only the aggregate metrics, so an adapter
that ``peft=`` silently ignored, or applied to a differently shaped vocabulary, fails."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from helpers_pipeline import tiny_eval_model
from mergesweep.cli import main

SUITE = "arithmetic"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapter_and_dense(base: Path, root: Path, name: str, seed: int) -> tuple[Path, Path]:
    """A random LoRA adapter on ``base`` (both factors random, so it changes the outputs), saved
    by peft with a model record naming the base's fingerprint; and the same adapter merged into
    a dense copy (peft's merge_and_unload) with the base's tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    from mergesweep.checkpoints.layout import checkpoint_fingerprint
    from mergesweep.record import ModelRecord, write_record

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0,
                                                  init_lora_weights=False))
    with torch.no_grad():  # random A and B (peft's init_lora_weights=False), B scaled to a moderate change
        for key, w in peft_model.named_parameters():
            if "lora_B" in key:
                w.mul_(0.2)
    adapter, dense = root / f"{name}-adapter", root / f"{name}-dense"
    peft_model.save_pretrained(adapter)
    write_record(adapter, ModelRecord(model_id=f"{name}-adapter", role="expert", stage="finetune",
                                      extra={"adapter": {"r": 4, "lora_alpha": 8,
                                                         "base_fingerprint": checkpoint_fingerprint(base)}}))
    peft_model.merge_and_unload().save_pretrained(dense, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(dense)
    write_record(dense, ModelRecord(model_id=f"{name}-dense", role="expert", stage="finetune"))
    return adapter, dense


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base, a padded-vocabulary variant of it (config vocab_size > its tokenizer's
    length, as many real bases have), and for each a random adapter and its dense merge."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from mergesweep.record import ModelRecord, write_record

    root = tmp_path_factory.mktemp("peft")
    base = tiny_eval_model(root, [SUITE], "tiny-base", train=40)
    tok = AutoTokenizer.from_pretrained(base)
    padded = root / "models" / "tiny-padded"
    m = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    m.resize_token_embeddings(len(tok) + 16, mean_resizing=False)
    with torch.no_grad():  # the padding tokens' logits: large enough to matter in the softmax
        m.get_output_embeddings().weight[len(tok):].normal_(0, 0.1)
    m.save_pretrained(padded, safe_serialization=True)
    tok.save_pretrained(padded)
    write_record(padded, ModelRecord(model_id="tiny-padded", role="base", stage="pretrain", uid="tiny-padded@0"))
    assert json.loads((padded / "config.json").read_text())["vocab_size"] == len(tok) + 16
    out = {"root": root, "tasks": root / "tasks" / SUITE, "base": base, "padded": padded}
    out["adapter"], out["dense"] = _adapter_and_dense(base, root / "models", "lora", seed=1)
    out["padded_adapter"], out["padded_dense"] = _adapter_and_dense(padded, root / "models", "plora", seed=2)
    return out


@pytest.fixture(scope="module")
def base_scores(models, tmp_path_factory):
    """The scores of each base (evaluated once for the module): the adapters must move them."""
    out = {}
    for key in ("base", "padded"):
        path = tmp_path_factory.mktemp("base_evals") / f"{key}.json"
        assert evaluate(models, models[key], path) == 0
        out[key] = scores(path)
    return out


def evaluate(models, model: Path, out: Path, *extra: str) -> int:
    return main(["evaluate", "--model", str(model), "--suite", SUITE, "--tasks-dir", str(models["tasks"]),
                 "--batch-size", "4", "--device", "cpu", "--threads", "1", "--log-samples", *extra,
                 "--out", str(out)])


def scores(out: Path) -> tuple[dict, dict, dict]:
    """(result JSON, {(task, metric): value}, {(task, doc_id, choice): log-likelihood})."""
    doc = json.loads(out.read_text())
    assert doc["status"] == "ok", doc["error"]
    metrics = {(r["lm_eval_task"], r["metric"]): r["value"] for r in doc["results"]}
    lls = {}
    for line in Path(doc["samples_file"]).read_text().splitlines():
        s = json.loads(line)
        for i, resp in enumerate(s["resps"]):
            lls[(s["task"], s["doc_id"], i)] = float(resp[0][0])
    assert metrics and lls
    return doc, metrics, lls


def _assert_same(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    bad = {k: (a[k], b[k]) for k in a if abs(a[k] - b[k]) > tol * max(1.0, abs(b[k]))}
    assert not bad, bad


def assert_adapter_scores(adapter_out: Path, dense_out: Path, base: tuple) -> tuple[dict, dict]:
    """The adapter's scores equal the dense copy's: every example's log-likelihood (float32: the
    LoRA layers compute W x + s B (A x) where the dense copy computes (W + s B A) x), acc exactly,
    perplexity = exp(-mean log-likelihood) with the mean within 1e-5; and they are not the base's
    (every example's log-likelihood moved, and so did every perplexity). Returns both JSONs."""
    (doc_a, m_a, ll_a), (doc_d, m_d, ll_d), (_, m_b, ll_b) = scores(adapter_out), scores(dense_out), base
    _assert_same(ll_a, ll_d, 1e-5)
    assert m_a.keys() == m_d.keys() and {k[1] for k in m_a} == {"acc", "perplexity"}
    for k in m_a:
        if k[1] == "acc":
            assert m_a[k] == m_d[k], (k, m_a[k], m_d[k])
        else:
            assert abs(math.log(m_a[k]) - math.log(m_d[k])) <= 1e-5, (k, m_a[k], m_d[k])
    assert ll_a.keys() == ll_b.keys()
    assert all(abs(ll_a[k] - ll_b[k]) > 1e-3 for k in ll_a), "the adapter left some log-likelihoods unchanged"
    assert all(abs(math.log(m_a[k]) - math.log(m_b[k])) > 1e-2 for k in m_a if k[1] == "perplexity"), (m_a, m_b)
    assert doc_a["evaluated_as"] == "adapter" and doc_d["evaluated_as"] == "dense" and doc_d["adapter"] is None
    return doc_a, doc_d


@pytest.mark.parametrize("which, loader", [("", "lm_eval_peft"), ("padded_", "peft_model")])
def test_adapter_scores_equal_its_dense_merge(models, base_scores, tmp_path, one_torch_thread, which, loader):
    """A peft-saved adapter over its base (peft=) scores what peft's own merge of it into a dense
    checkpoint scores, and not what the base scores. With a padded vocabulary the adapter is
    applied without lm-eval's embedding resize (which would renormalise the softmax over fewer
    tokens and so move every log-likelihood)."""
    from mergesweep.checkpoints.layout import checkpoint_fingerprint

    base = models["padded" if which else "base"]
    adapter, dense = models[f"{which}adapter"], models[f"{which}dense"]
    outs = {k: tmp_path / f"{k}.json" for k in ("adapter", "dense")}
    assert evaluate(models, adapter, outs["adapter"], "--base", str(base)) == 0
    assert evaluate(models, dense, outs["dense"], "--base", str(base)) == 0  # a dense model ignores --base
    doc_a, _ = assert_adapter_scores(outs["adapter"], outs["dense"], base_scores["padded" if which else "base"])
    assert doc_a["model_id"] == f"{'plora' if which else 'lora'}-adapter" and doc_a["model_path"] == str(adapter)
    assert doc_a["adapter"] == {"path": str(adapter), "base_path": str(base),
                                "base_fingerprint": checkpoint_fingerprint(base),
                                "base_model_id": "tiny-padded" if which else "tiny-base",
                                "tokenizer": str(base), "loader": loader}


def test_a_merged_lora_lego_adapter_scores_its_dense_model(models, base_scores, tmp_path, one_torch_thread):
    """Issue 13's test: a merged LoRA (lora_lego through the real merge engine, two experts) is
    evaluated as an adapter via peft= and scores what the same merge written as a dense model
    (lora_lego's ``dense: true``, base + B @ A computed by the merge) scores."""
    from mergesweep.merge.engine import merge_checkpoints

    other, _ = _adapter_and_dense(models["base"], tmp_path, "other", seed=3)
    out = tmp_path / "lego"
    rec = merge_checkpoints("lora_lego", models["base"], [models["adapter"], other], {"rank": 6, "dense": True}, out,
                            expert_names=["lora", "other"])
    outs = {k: tmp_path / f"{k}.json" for k in ("adapter", "dense")}
    assert evaluate(models, out, outs["adapter"], "--base", str(models["base"])) == 0
    assert evaluate(models, out / "dense", outs["dense"]) == 0
    doc_a, doc_d = assert_adapter_scores(outs["adapter"], outs["dense"], base_scores["base"])
    assert doc_a["model_id"] == doc_d["model_id"] == rec["model_id"] and doc_a["model"]["role"] == "merged"
    assert doc_a["adapter"]["loader"] == "lm_eval_peft"


def _bad_fingerprint(models, tmp_path):
    import shutil

    bad = tmp_path / "adapter"
    shutil.copytree(models["adapter"], bad)
    rec = json.loads((bad / "mergesweep.json").read_text())
    rec["adapter"]["base_fingerprint"] = "0123456789abcdef"
    (bad / "mergesweep.json").write_text(json.dumps(rec))
    return bad, ["--base", str(models["base"])]


def _no_weights(models, tmp_path):
    bad = tmp_path / "adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((models["adapter"] / "adapter_config.json").read_text())
    return bad, ["--base", str(models["base"])]


@pytest.mark.parametrize("case, pattern", [
    (lambda m, t: (m["adapter"], []),
     r"--model .*lora-adapter is a LoRA adapter; evaluating it needs --base \(the base it was trained on\)"),
    (lambda m, t: (m["adapter"], ["--base", str(m["root"] / "tasks")]),
     r"--base .*/tasks: not a checkpoint \(no config\.json\)"),
    (lambda m, t: (m["adapter"], ["--base", str(t / "nowhere")]), r"--base .*/nowhere: directory not found"),
    (lambda m, t: (m["adapter"], ["--base", str(m["padded_adapter"])]),
     r"--base .*plora-adapter: is a LoRA adapter \(adapter_config\.json\), not a dense checkpoint"),
    (_bad_fingerprint, r"the adapter was made on a base with fingerprint 0123456789abcdef .*adapter\.base_fingerprint"
                       r"\), but --base .*tiny-base has fingerprint [0-9a-f]{16}"),
    (_no_weights, r"--model .*/adapter: LoRA adapter without weights \(no adapter_model\.safetensors\)"),
    (lambda m, t: (m["adapter"], ["--base", str(m["base"]), "--backend", "vllm"]),
     r"is a LoRA adapter: evaluation\.backend vllm \(--backend vllm\) does not evaluate adapters"),
], ids=["no-base", "base-not-checkpoint", "base-missing", "base-is-adapter", "fingerprint", "no-weights", "vllm"])
def test_bad_adapter_inputs_are_refused(models, tmp_path, capsys, case, pattern):
    model, extra = case(models, tmp_path)
    out = tmp_path / "evals" / f"{SUITE}.json"
    assert evaluate(models, model, out, *extra) == 1
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("mergesweep evaluate: error: ")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), err[-1500:]
    assert not (tmp_path / "evals").exists()
