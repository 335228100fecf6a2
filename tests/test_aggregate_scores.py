"""scores.parquet: evaluation JSONs -> the long table, failures, I/O, the aggregate CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from mergesweep.aggregate import analysis as A
from mergesweep.aggregate.leaderboard import compute_tables
from mergesweep.aggregate.scores import (
    SCORE_COLUMNS,
    EvalFileError,
    ScoresError,
    build_scores,
    read_scores,
    rows_from_eval_json,
    write_scores,
)
from mergesweep.cli import main

DATA = Path(__file__).parent / "data" / "aggregate"
EVALS = DATA / "evals"
FAILED = EVALS / "dare-ties-7106c69111" / "reverse.json"


def _doc(**over):
    doc = json.loads((EVALS / "task-arithmetic-72b23e1903" / "arithmetic.json").read_text())
    doc.update(over)
    return doc


@pytest.fixture(scope="module")
def scores():
    return build_scores([EVALS])


def test_rows_from_ok_file():
    rows = rows_from_eval_json(EVALS / "task-arithmetic-72b23e1903" / "arithmetic.json")
    assert len(rows) == 2
    by_split = {r["split"]: r for r in rows}
    # values as written in the fixture (make_fixture.MERGES, TA lambda=1: arithmetic .64 / .56)
    assert by_split["validation"]["value"] == 0.64 and by_split["test"]["value"] == 0.56
    assert by_split["test"]["n"] == 200 and by_split["test"]["stderr"] == pytest.approx(0.035188, abs=1e-6)
    r = by_split["test"]
    assert (r["model_id"], r["role"], r["method"], r["suite"], r["task"], r["metric"], r["status"]) == (
        "task-arithmetic-72b23e1903", "merged", "task_arithmetic", "arithmetic", "arithmetic", "acc", "ok")
    assert r["lm_eval_task"] == "ms_arithmetic_test" and r["filter"] == "none"
    assert json.loads(r["params"]) == {"lambda": 1.0}
    assert json.loads(r["experts"]) == ["expert-arithmetic", "expert-reverse", "expert-dateformat"]
    assert r["base"] == "base-smollm2-135m"
    assert (r["merge_runtime_s"], r["merge_peak_rss_mb"]) == (9.4, 3310.0)
    assert (r["runtime_s"], r["peak_rss_mb"], r["device"]) == (22.5, 890.0, "cpu")
    assert r["num_fewshot"] == 0 and r["task_version"] == "1.0"
    assert json.loads(r["versions"])["lm_eval"] == "0.4.13"
    assert set(r) == set(SCORE_COLUMNS)


def test_rows_from_error_file():
    (r,) = rows_from_eval_json(FAILED)
    assert r["status"] == "error" and "MemoryError" in r["error"]
    assert r["task"] == "reverse" and r["metric"] is None and r["split"] is None
    assert math.isnan(r["value"])
    assert r["role"] == "merged" and r["method"] == "dare_ties"


def test_rows_from_dict_and_architecture_example_format():
    # the minimal format of docs/ARCHITECTURE.md (no lm_eval_task/filter, per-task dicts keyed by task)
    doc = {"model_id": "m1", "suite": "arithmetic", "status": "ok", "error": None,
           "model": {"model_id": "m1", "role": "expert", "stage": "finetune", "domain": "arithmetic",
                     "params": None},
           "results": [{"task": "arithmetic", "metric": "acc", "split": "test", "value": 0.6,
                        "stderr": "N/A", "n": 64}],
           "num_fewshot": {"arithmetic": 3}}
    (r,) = rows_from_eval_json(doc)
    assert r["value"] == 0.6 and math.isnan(r["stderr"]) and r["num_fewshot"] == 3
    assert r["params"] == "{}" and r["experts"] == "[]" and r["eval_file"] == "<dict>"
    assert r["lm_eval_task"] is None and r["filter"] is None


def test_ok_file_without_results_is_an_error_row():
    (r,) = rows_from_eval_json(_doc(results=[]))
    assert r["status"] == "error" and r["error"] == "evaluation file has no results"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"suite": None}, "missing required key 'suite'"),
        ({"status": "done"}, "'status' is 'done'"),
        ({"model_id": "other"}, "'model.model_id' is 'task-arithmetic-72b23e1903'"),
        ({"results": [{"task": "a", "split": "test", "value": 1}]}, "results[0] lacks 'metric'"),
        ({"results": {"a": 1}}, "'results' must be a list"),
    ],
)
def test_malformed_files_name_file_and_key(tmp_path, change, message):
    doc = _doc(**change)
    p = tmp_path / str(doc.get("model_id") or "m") / f"{doc.get('suite') or 'arithmetic'}.json"
    p.parent.mkdir()
    p.write_text(json.dumps(doc))
    with pytest.raises(EvalFileError) as e:
        rows_from_eval_json(p)
    assert str(p) in str(e.value) and message in str(e.value)


def test_unreadable_file(tmp_path):
    p = tmp_path / "trunc.json"
    p.write_text('{"model_id": ')
    with pytest.raises(EvalFileError, match="trunc.json: not valid JSON"):
        rows_from_eval_json(p)
    with pytest.raises(EvalFileError, match="not found"):
        build_scores([tmp_path / "nope.json"])


def test_duplicate_model_suite_names_both_files(tmp_path):
    # the same (model, suite) under two evals roots
    src = EVALS / "linear-5dac38dec9" / "arithmetic.json"
    for root in ("a", "b"):
        (tmp_path / root / "linear-5dac38dec9").mkdir(parents=True)
        shutil.copy(src, tmp_path / root / "linear-5dac38dec9" / "arithmetic.json")
    with pytest.raises(EvalFileError, match=r"b/linear-5dac38dec9/arithmetic.json: .* already read from .*a/linear"):
        build_scores([tmp_path])


def test_scores_table_shape_and_suite_roles(scores):
    # 13 models x (3 skills x 1 metric x 2 splits + capitals x 2 metrics x 2 splits) = 13 x 10 = 130,
    # minus the failed (dare d=.5, reverse) 2 rows, plus its 1 error row = 129
    assert len(scores) == 129
    assert list(scores.columns) == SCORE_COLUMNS
    assert scores["model_id"].nunique() == 13
    assert set(scores["role"]) == {"base", "expert", "merged"}
    roles = scores.drop_duplicates("suite").set_index("suite")["suite_role"].to_dict()
    assert roles == {"arithmetic": "skill", "reverse": "skill", "dateformat": "skill", "capitals": "heldout"}
    key = ["model_id", "suite", "task", "lm_eval_task", "metric", "filter", "split"]
    assert not scores.duplicated(key).any()
    assert str(scores["n"].dtype) == "Int64"


def test_failing_evaluation_leaves_every_other_score(scores, tmp_path):
    # the same run without the failed file: every ok row is identical in both tables
    for p in EVALS.rglob("*.json"):
        if p != FAILED:
            dst = tmp_path / p.relative_to(EVALS)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dst)
    without = build_scores([tmp_path])
    ok = scores[scores["status"] == "ok"]
    assert len(ok) == len(without) == 128
    cols = ["model_id", "suite", "lm_eval_task", "metric", "split", "value", "stderr", "n"]
    pd.testing.assert_frame_equal(ok[cols].reset_index(drop=True), without[cols].reset_index(drop=True))
    # the failed (model, suite) is present as one error row ...
    err = scores[scores["status"] == "error"]
    assert err[["model_id", "suite"]].values.tolist() == [["dare-ties-7106c69111", "reverse"]]
    # ... and the failing model keeps its other suites' scores in every derived table
    t = compute_tables(scores)
    r = t.leaderboard.set_index("model_id").loc["dare-ties-7106c69111"]
    assert r["status"] == "error" and r["failed_suites"] == "reverse"
    assert r["abs_test_arithmetic"] == pytest.approx(0.72) and r["abs_test_capitals"] == pytest.approx(0.44)
    assert t.failures[["model_id", "suite", "status"]].values.tolist() == [
        ["dare-ties-7106c69111", "reverse", "error"]]
    assert len(t.leaderboard) == 9


def test_missing_evaluation_is_reported(tmp_path):
    for p in EVALS.rglob("*.json"):
        if p.parent.name != "linear-5dac38dec9" or p.stem != "capitals":
            dst = tmp_path / p.relative_to(EVALS)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dst)
    f = A.failures(build_scores([tmp_path]))
    assert f.loc[f["status"] == "missing", ["model_id", "suite"]].values.tolist() == [["linear-5dac38dec9", "capitals"]]


def test_error_file_without_model_block_takes_metadata_from_other_suites(tmp_path):
    ok = _doc()
    d = tmp_path / ok["model_id"]
    d.mkdir()
    bad = {"model_id": ok["model_id"], "suite": "reverse", "status": "error", "error": "boom", "model": {}}
    (d / "arithmetic.json").write_text(json.dumps(ok))
    (d / "reverse.json").write_text(json.dumps(bad))
    df = build_scores([tmp_path])
    assert set(df["role"]) == {"merged"} and set(df["method"]) == {"task_arithmetic"}


def test_primary_metric_override(scores):
    assert A.primary_metrics(scores)["capitals"] == "acc"
    metrics = A.primary_metrics(scores, {"capitals": "acc_norm"})
    assert metrics["capitals"] == "acc_norm"
    # acc_norm = acc + .02 in the fixture: base capitals test .50 -> .52
    s = A.suite_scores(scores, metrics).set_index(["model_id", "suite", "split"])
    assert s.at[("base-smollm2-135m", "capitals", "test"), "score"] == pytest.approx(0.52)
    with pytest.raises(ScoresError, match="reports only acc, acc_norm"):
        A.primary_metrics(scores, {"capitals": "f1"})
    with pytest.raises(ScoresError, match="unknown suite"):
        A.primary_metrics(scores, {"nosuchsuite": "acc"})


def test_suite_score_is_macro_mean_over_tasks():
    # a suite of two lm-eval tasks: score = (.5 + .7)/2, se = sqrt(.03^2 + .04^2)/2 = .025, n = 300;
    # a second filter of the same metric is ignored ("none" is the primary filter)
    common = {"model_id": "m", "suite": "s", "split": "test", "metric": "acc", "status": "ok"}
    df = pd.DataFrame([
        {**common, "lm_eval_task": "t1", "filter": "none", "value": 0.5, "stderr": 0.03, "n": 100},
        {**common, "lm_eval_task": "t2", "filter": "none", "value": 0.7, "stderr": 0.04, "n": 200},
        {**common, "lm_eval_task": "t2", "filter": "strict", "value": 0.0, "stderr": 0.0, "n": 200},
    ])
    s = A.suite_scores(df, {"s": "acc"}).iloc[0]
    assert (s["score"], s["stderr"], s["n"], s["n_tasks"]) == (pytest.approx(0.6), pytest.approx(0.025), 300, 2)


def test_write_read_roundtrip_with_provenance(scores, tmp_path):
    prov = json.loads((DATA / "provenance.json").read_text())
    out = tmp_path / "tables" / "scores.parquet"
    write_scores(scores, out, prov)
    back, p = read_scores(out)
    assert p == prov
    pd.testing.assert_frame_equal(back, scores)
    assert not list(out.parent.glob(".*tmp*"))  # atomic: no temporary left behind
    assert (out.stat().st_mode & 0o044) == 0o044  # readable by others, like any output


def test_read_scores_errors(tmp_path):
    with pytest.raises(ScoresError, match="scores table not found"):
        read_scores(tmp_path / "none.parquet")
    p = tmp_path / "x.parquet"
    pd.DataFrame({"model_id": ["a"]}).to_parquet(p)
    with pytest.raises(ScoresError, match=r"x.parquet: missing column\(s\) role, method"):
        read_scores(p)


def test_aggregate_cli(tmp_path, capsys):
    out = tmp_path / "scores.parquet"
    files = [str(p) for p in sorted((EVALS / "linear-5dac38dec9").glob("*.json"))]
    assert main(["aggregate", "--evals", *files, str(EVALS / "base-smollm2-135m"),
                 "--provenance", str(DATA / "provenance.json"), "--out", str(out)]) == 0
    t = pq.read_table(out)
    assert set(t.column("model_id").to_pylist()) == {"linear-5dac38dec9", "base-smollm2-135m"}
    assert b"mergesweep.provenance" in t.schema.metadata
    # errors are printed without a traceback and exit 1
    assert main(["aggregate", "--evals", str(tmp_path / "missing"), "--out", str(out)]) == 1
    assert "evaluation file or directory not found" in capsys.readouterr().err
