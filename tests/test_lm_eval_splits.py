"""Real lm-eval suites are scored on a validation and a test split: the task's own validation
split when it has one next to its test split, else a seeded, disjoint slice of the split lm-eval
evaluates; which examples form each split is recorded; few-shot examples of a sliced task come
from its own slice. Per-suite settings override the global ones and are recorded; suites in
different dtypes load the model once per dtype.

Real lm-eval, a real tiny Llama (helpers_pipeline.tiny_eval_model), a local lm-eval task
directory over local JSON datasets (helpers_lm_eval)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers_lm_eval import GROUP, WITH_VALIDATION, WITHOUT_VALIDATION, build_lm_eval_tasks
from helpers_pipeline import tiny_eval_model
from mergesweep.cli import main
from mergesweep.evaluate.splits import SplitError, slice_indices


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_splits")
    return {"tasks": build_lm_eval_tasks(root / "lm_eval"),
            "model": tiny_eval_model(root, ["arithmetic"], "tiny-lm", train=20)}


def write_spec(path: Path, env, suites: list[dict], **options) -> Path:
    doc = {"suites": suites,
           "options": {"batch_size": 4, "device": "cpu", "include_paths": [str(env["tasks"].include_path)],
                       "validation": {"size": 8, "seed": 3}, **options}}
    path.write_text(json.dumps(doc))
    return path


def run(env, spec: Path, outs: list[Path]) -> list[dict]:
    assert main(["evaluate", "--model", str(env["model"]), "--spec", str(spec), "--threads", "1",
                 "--out", *map(str, outs)]) == 0
    docs = [json.loads(o.read_text()) for o in outs]
    for d in docs:
        assert d["status"] == "ok", d["error"]
    return docs


def by(doc: dict) -> dict:
    """(lm-eval task, split) -> n; metric values per (task, split, metric)."""
    return {(r["lm_eval_task"], r["split"], r["metric"]): r for r in doc["results"]}


# ------------------------------------------------------------------------------- the slice rule

def test_slice_is_disjoint_complete_and_deterministic():
    val, test = slice_indices(50, 12, seed=7)
    assert len(val) == 12 and len(test) == 38
    assert not set(val) & set(test) and sorted(val + test) == list(range(50))
    assert slice_indices(50, 12, seed=7) == (val, test)
    assert slice_indices(50, 12, seed=8)[0] != val
    with pytest.raises(SplitError, match="validation size 50 leaves no test examples"):
        slice_indices(50, 50, seed=0)


# ------------------------------------------------------------------------------- end to end

def test_both_splits_recorded_and_scored_on_the_right_examples(env, tmp_path, one_torch_thread):
    """One suite over a group: the task with its own validation split is scored on it (10
    examples) and on its test split (16); the other on a seeded slice of its test split (8) and
    the rest (16). The samples show exactly the recorded documents were scored, and the few-shot
    examples of validation prompts come from the validation slice only."""
    spec = write_spec(tmp_path / "spec.json", env, [
        {"name": "mc", "lm_eval_tasks": [GROUP], "num_fewshot": 2}], log_samples=True)
    (doc,) = run(env, spec, [tmp_path / "mc.json"])
    rows = by(doc)
    assert {(t, s): rows[(t, s, "acc")]["n"] for t in (WITH_VALIDATION, WITHOUT_VALIDATION)
            for s in ("validation", "test")} == {
        (WITH_VALIDATION, "validation"): 10, (WITH_VALIDATION, "test"): 16,
        (WITHOUT_VALIDATION, "validation"): 8, (WITHOUT_VALIDATION, "test"): 16}
    own, sliced = doc["splits"][WITH_VALIDATION], doc["splits"][WITHOUT_VALIDATION]
    assert own["rule"] == "task_splits" and own["validation"] == {"split": "validation", "n": 10}
    assert own["test"] == {"split": "test", "n": 16} and own["fewshot_split"] == "train"
    val, test = slice_indices(24, 8, seed=3)
    assert sliced["rule"] == "seeded_slice" and sliced["fewshot_split"] == "test"
    assert sliced["validation"] == {"source_split": "test", "seed": 3, "size": 8, "requested_size": 8, "indices": val}
    assert sliced["test"] == {"source_split": "test", "seed": 3, "size": 16, "indices": test}
    assert doc["settings"]["validation"] == {"size": 8, "seed": 3}

    samples = [json.loads(line) for line in Path(doc["samples_file"]).read_text().splitlines()]
    pairs = [json.loads(line) for line in (env["tasks"].data_dir / "pairs/test.jsonl").read_text().splitlines()]
    for split, idx in (("validation", val), ("test", test)):
        mine = [s for s in samples if s["task"] == WITHOUT_VALIDATION and s["split"] == split]
        assert sorted(s["doc"]["id"] for s in mine) == idx
        # few-shot examples are drawn from this split's own examples only
        allowed = {pairs[i]["question"] for i in idx}
        for s in mine:
            shown = set(re.findall(r"reverse \d+:", s["arguments"][0][0]))
            assert len(shown) == 3 and shown <= allowed, (split, shown - allowed)
    sums_val = [s for s in samples if s["task"] == WITH_VALIDATION and s["split"] == "validation"]
    valq = [json.loads(line)["question"] for line in
            (env["tasks"].data_dir / "sums/validation.jsonl").read_text().splitlines()]
    assert sorted(s["doc"]["question"] for s in sums_val) == sorted(valq)


def test_the_seed_decides_the_slice(env, tmp_path, one_torch_thread):
    """The same seed gives the same slice and the same scores; another seed another slice."""
    def once(seed: int, name: str) -> dict:
        spec = write_spec(tmp_path / f"{name}.spec.json", env,
                          [{"name": "mc", "lm_eval_tasks": [WITHOUT_VALIDATION], "validation": {"seed": seed}}])
        return run(env, spec, [tmp_path / f"{name}.json"])[0]

    a, b, c = once(11, "a"), once(11, "b"), once(12, "c")
    ia = a["splits"][WITHOUT_VALIDATION]["validation"]["indices"]
    assert ia == b["splits"][WITHOUT_VALIDATION]["validation"]["indices"] == slice_indices(24, 8, 11)[0]
    assert [r["value"] for r in a["results"]] == [r["value"] for r in b["results"]]
    assert c["splits"][WITHOUT_VALIDATION]["validation"]["indices"] == slice_indices(24, 8, 12)[0] != ia
    assert a["settings"]["validation"] == {"size": 8, "seed": 11}


def test_suite_settings_override_the_global_ones_and_are_recorded(env, tmp_path, one_torch_thread):
    spec = write_spec(tmp_path / "spec.json", env, [
        {"name": "own", "lm_eval_tasks": [WITH_VALIDATION], "limit": 3, "num_fewshot": 1, "batch_size": 2,
         "validation": {"size": 5}},
        {"name": "inherit", "lm_eval_tasks": [WITH_VALIDATION]},
    ], limit=6, num_fewshot=0, batch_size=4)
    own, inherit = run(env, spec, [tmp_path / "own.json", tmp_path / "inherit.json"])
    assert own["settings"] == {"dtype": "float32", "apply_chat_template": False, "num_fewshot": 1, "limit": 3,
                               "batch_size": 2, "validation": {"size": 5, "seed": 3}}
    assert inherit["settings"] == {"dtype": "float32", "apply_chat_template": False, "num_fewshot": 0, "limit": 6,
                                   "batch_size": 4, "validation": {"size": 8, "seed": 3}}
    # the settings took effect: examples scored per split and few-shot count
    assert {r["n"] for r in own["results"]} == {3} and {r["n"] for r in inherit["results"]} == {6}
    assert own["num_fewshot"] == {WITH_VALIDATION: 1} and inherit["num_fewshot"] == {WITH_VALIDATION: 0}
    assert own["lm_eval_config"]["batch_size"] == 2 and inherit["lm_eval_config"]["batch_size"] == 4
    assert own["chat_template"] is False


def test_one_model_load_per_dtype(env, tmp_path, monkeypatch, one_torch_thread):
    """Three suites in two dtypes: two loads (float32 first, as the first suite needs it), and
    each suite ran on a model in its own dtype."""
    import mergesweep.evaluate.runner as runner

    loads, dtypes_seen = [], {}
    real_load, real_run = runner.load_model, runner._run_suite

    def counting_load(model_dir, **kw):
        loads.append(kw["dtype"])
        return real_load(model_dir, **kw)

    def recording_run(lm, suite, *a, **kw):
        dtypes_seen[suite.name] = str(lm.model.dtype)
        return real_run(lm, suite, *a, **kw)

    monkeypatch.setattr(runner, "load_model", counting_load)
    monkeypatch.setattr(runner, "_run_suite", recording_run)
    spec = write_spec(tmp_path / "spec.json", env, [
        {"name": "a", "lm_eval_tasks": [WITHOUT_VALIDATION]},
        {"name": "b", "lm_eval_tasks": [WITHOUT_VALIDATION], "dtype": "bfloat16"},
        {"name": "c", "lm_eval_tasks": [WITH_VALIDATION]},
    ], limit=2)
    a, b, c = run(env, spec, [tmp_path / f"{s}.json" for s in "abc"])
    assert loads == ["float32", "bfloat16"]
    assert dtypes_seen == {"a": "torch.float32", "b": "torch.bfloat16", "c": "torch.float32"}
    assert [d["settings"]["dtype"] for d in (a, b, c)] == ["float32", "bfloat16", "float32"]
    assert a["load_s"] == c["load_s"]


def test_a_validation_slice_is_at_most_half_the_split(env, tmp_path, one_torch_thread):
    spec = write_spec(tmp_path / "spec.json", env, [
        {"name": "big", "lm_eval_tasks": [WITHOUT_VALIDATION], "validation": {"size": 24}},
        {"name": "fine", "lm_eval_tasks": [WITHOUT_VALIDATION]}], limit=2)
    outs = [tmp_path / "big.json", tmp_path / "fine.json"]
    assert main(["evaluate", "--model", str(env["model"]), "--spec", str(spec), "--threads", "1",
                 "--out", *map(str, outs)]) == 0
    big, fine = (json.loads(o.read_text()) for o in outs)
    assert big["status"] == fine["status"] == "ok"
    # 24 asked for, of a 24-example split: capped at half, 12 / 12; a size below half is kept
    for doc, want in ((big, (12, 24, 12, 12)), (fine, (8, 8, 8, 16))):
        val, test = doc["splits"][WITHOUT_VALIDATION]["validation"], doc["splits"][WITHOUT_VALIDATION]["test"]
        assert (val["size"], val["requested_size"], len(val["indices"]), test["size"]) == want
