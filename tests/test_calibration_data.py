"""``mergesweep calibration-data``: an lm-eval suite's validation examples (as the evaluation
splits them) as calibration data of data-aware merges, on local lm-eval tasks (no Hub)."""

from __future__ import annotations

import json

import pytest

from helpers_lm_eval import GROUP, WITH_VALIDATION, WITHOUT_VALIDATION, build_lm_eval_tasks
from mergesweep.cli import main
from mergesweep.evaluate.splits import slice_indices

SIZE, SEED = 8, 3


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    tasks = build_lm_eval_tasks(root / "lm_eval")
    spec = root / "evaluation.json"
    spec.write_text(json.dumps({
        "suites": [{"name": "mc", "lm_eval_tasks": [GROUP]}, {"name": "arithmetic", "tasks_dir": str(root)}],
        "options": {"include_paths": [str(tasks.include_path)], "validation": {"size": SIZE, "seed": SEED}}}))
    return root, tasks, spec


def _docs(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_validation_examples_only_never_test(env, tmp_path):
    root, tasks, spec = env
    out = tmp_path / "mc.jsonl"
    assert main(["calibration-data", "--spec", str(spec), "--suite", "mc", "--examples", "1000", "--out", str(out)]) == 0
    recs = _docs(out)
    by_task = {}
    for r in recs:
        by_task.setdefault(r["task"], []).append(r)
    # the task with its own validation split: exactly that split, answers as the gold choice's text
    val = _docs(tasks.data_dir / "sums/validation.jsonl")
    assert [(r["prompt"], r["target"]) for r in by_task[WITH_VALIDATION]] == \
        [(d["question"], " " + d["choices"][d["label"]]) for d in val]
    # the task without one: the evaluation's seeded slice of its test split, none of the rest
    pairs = _docs(tasks.data_dir / "pairs/test.jsonl")
    val_idx, test_idx = slice_indices(len(pairs), min(SIZE, len(pairs) // 2), SEED)
    got = sorted(r["prompt"] for r in by_task[WITHOUT_VALIDATION])
    assert got == sorted(pairs[i]["question"] for i in val_idx)
    assert not set(got) & {pairs[i]["question"] for i in test_idx}
    # round-robin over the tasks when fewer examples are asked for
    few = tmp_path / "few.jsonl"
    assert main(["calibration-data", "--spec", str(spec), "--suite", "mc", "--examples", "4", "--out", str(few)]) == 0
    assert [r["task"] for r in _docs(few)] == [WITH_VALIDATION, WITHOUT_VALIDATION] * 2


def test_bad_suite_names_it_and_writes_nothing(env, tmp_path, caplog):
    root, tasks, spec = env
    out = tmp_path / "x.jsonl"
    for suite in ("nope", "arithmetic"):
        assert main(["calibration-data", "--spec", str(spec), "--suite", suite, "--out", str(out)]) != 0
        assert f"--suite: '{suite}' is not an lm-eval suite" in caplog.text
    assert main(["calibration-data", "--spec", str(spec), "--suite", "mc", "--examples", "0", "--out", str(out)]) != 0
    assert "--examples: expected a positive integer" in caplog.text
    assert not out.exists()
