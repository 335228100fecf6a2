"""Inputs that are not data are refused: `mergesweep aggregate` and `mergesweep leaderboard` exit 1
with a message naming the file, the row and the metric, and every existing output stays
byte-identical (nothing is written, not even an empty table)."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mergesweep.aggregate.checks import METRIC_RANGES, metric_range, value_problem
from mergesweep.aggregate.scores import SCORE_SCHEMA, read_scores
from mergesweep.cli import main

DATA = Path(__file__).parent / "data" / "aggregate"
EVALS = DATA / "evals"
TA = "task-arithmetic-72b23e1903"
FAILED = ("dare-ties-7106c69111", "reverse")


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A results directory with good outputs from the fixture: scores.parquet and every
    leaderboard output, and a snapshot of its bytes."""
    res = tmp_path_factory.mktemp("results")
    scores = res / "tables" / "scores.parquet"
    assert main(["aggregate", "--evals", str(EVALS), "--provenance", str(DATA / "provenance.json"),
                 "--out", str(scores)]) == 0
    assert main(["leaderboard", "--scores", str(scores), "--out-dir", str(res)]) == 0
    snap = snapshot(res)
    assert len(snap) == 1 + 4 + 1 + 1 + 4  # scores, 4 tables (reversible: empty), markdown, report, 4 figures
    return res, snap


@pytest.fixture
def results(good, tmp_path):
    """A private copy of the good results directory (a failing case cannot spoil the next one)."""
    res, snap = good
    shutil.copytree(res, tmp_path / "results")
    assert snapshot(tmp_path / "results") == snap
    return tmp_path / "results", snap


def copy_evals(dst: Path) -> Path:
    shutil.copytree(EVALS, dst)
    return dst


def edit(evals: Path, model: str, suite: str, fn) -> Path:
    p = evals / model / f"{suite}.json"
    doc = json.loads(p.read_text())
    fn(doc)
    p.write_text(json.dumps(doc))  # allow_nan: writes NaN / Infinity, as a buggy writer would
    return p


def row(doc: dict, metric: str = "acc", split: str = "test") -> dict:
    return next(r for r in doc["results"] if r["metric"] == metric and r["split"] == split)


def setter(key: str, value, metric: str = "acc", split: str = "test"):
    def fn(doc):
        row(doc, metric, split)[key] = value
    return fn


def add_row(metric: str, value):
    def fn(doc):
        doc["results"].append({**row(doc), "metric": metric, "value": value, "stderr": 0.01})
    return fn


def rename_metric(metric: str, value):
    def fn(doc):
        r = row(doc)
        r["metric"], r["value"] = metric, value
    return fn


def duplicate_row(doc):
    doc["results"].append(dict(doc["results"][0]))


def model_field(key, value):
    def fn(doc):
        if value is None:
            doc["model"].pop(key)
        else:
            doc["model"][key] = value
    return fn


# (case id, model dir, suite, edit of the JSON, what the message must say)
EDITS = [
    ("acc above 1 (would win selection)", TA, "arithmetic", setter("value", 5.0),
     r"results\[\d\] \(ms_arithmetic_test, split 'test'\): value 5 of 'acc' is outside its range \[0, 1\]"),
    ("acc below 0", TA, "arithmetic", setter("value", -0.1), r"value -0.1 of 'acc' is outside its range"),
    ("acc_norm above 1", TA, "capitals", setter("value", 1.02, "acc_norm"),
     r"value 1.02 of 'acc_norm' is outside its range \[0, 1\]"),
    ("exact_match above 1", TA, "arithmetic", rename_metric("exact_match", 1.5),
     r"value 1.5 of 'exact_match' is outside its range \[0, 1\]"),
    ("perplexity below 1", TA, "arithmetic", add_row("perplexity", 0.5),
     r"value 0.5 of 'perplexity' is outside its range \[1, inf\]"),
    ("value +inf", TA, "arithmetic", setter("value", math.inf), r"value of 'acc' is inf"),
    ("value -inf", TA, "reverse", setter("value", -math.inf), r"value of 'acc' is -inf"),
    ("value NaN in an ok file", TA, "arithmetic", setter("value", math.nan), r"value of 'acc' is missing \(NaN\)"),
    ("value null in an ok file", TA, "arithmetic", setter("value", None), r"value None of 'acc' is not a number"),
    ("value as a string", TA, "arithmetic", setter("value", "0.5"), r"value '0.5' of 'acc' is not a number"),
    ("negative stderr", TA, "dateformat", setter("stderr", -0.01), r"stderr -0.01 of 'acc' is negative"),
    ("infinite stderr", TA, "dateformat", setter("stderr", math.inf), r"stderr of 'acc' is inf"),
    ("negative n", TA, "arithmetic", setter("n", -5), r"n -5 of 'acc' is negative"),
    ("duplicated row within one file", TA, "arithmetic", duplicate_row, r"results\[\d\] duplicates results\[0\]"),
    ("model record with an unknown role", TA, "arithmetic", model_field("role", "teacher"),
     r"'model': role: 'teacher' is not one of base, expert, merged"),
    ("model record without stage", TA, "arithmetic", model_field("stage", None),
     r"'model': missing field 'stage'"),
]


@pytest.mark.parametrize("case, model, suite, fn, message", EDITS, ids=[e[0] for e in EDITS])
def test_aggregate_refuses_a_bad_value(results, tmp_path, capsys, case, model, suite, fn, message):
    res, snap = results
    evals = copy_evals(tmp_path / "evals")
    bad = edit(evals, model, suite, fn)
    assert main(["aggregate", "--evals", str(evals), "--out", str(res / "tables" / "scores.parquet")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mergesweep aggregate: error: ")
    assert str(bad) in err, err  # names the file ...
    assert re.search(message, err), err  # ... the row and the metric
    assert snapshot(res) == snap


def _aggregate_fails(res, snap, capsys, evals_args, message):
    assert main(["aggregate", "--evals", *map(str, evals_args), "--out", str(res / "tables" / "scores.parquet")]) == 1
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert snapshot(res) == snap
    return err


def test_duplicated_model_suite_from_two_files(results, tmp_path, capsys):
    res, snap = results
    a = copy_evals(tmp_path / "a")
    b = tmp_path / "b" / TA
    b.mkdir(parents=True)
    shutil.copy(a / TA / "capitals.json", b / "capitals.json")
    _aggregate_fails(res, snap, capsys, [a, tmp_path / "b"],
                     rf"b/{TA}/capitals.json: \(model '{TA}', suite 'capitals'\) already read from .*a/{TA}/capitals.json")


def test_directory_not_named_after_model_id(results, tmp_path, capsys):
    res, snap = results
    evals = copy_evals(tmp_path / "evals")
    (evals / TA).rename(evals / "task-arithmetic-OLD")
    _aggregate_fails(res, snap, capsys, [evals],
                     rf"task-arithmetic-OLD/\w+.json: its directory 'task-arithmetic-OLD' does not match its model_id '{TA}'")


def test_file_not_named_after_suite(results, tmp_path, capsys):
    res, snap = results
    evals = copy_evals(tmp_path / "evals")
    (evals / TA / "capitals.json").rename(evals / TA / "capitals-v2.json")
    _aggregate_fails(res, snap, capsys, [evals],
                     r"capitals-v2.json: its file name 'capitals-v2.json' does not match its suite 'capitals'")


def test_every_evaluation_failed(results, tmp_path, capsys):
    res, snap = results
    d = tmp_path / "evals" / FAILED[0]
    d.mkdir(parents=True)
    shutil.copy(EVALS / FAILED[0] / f"{FAILED[1]}.json", d)
    err = _aggregate_fails(res, snap, capsys, [tmp_path / "evals"],
                           r"--evals .*evals: no evaluation succeeded \(1 error rows, e.g. dare-ties-7106c69111/reverse: MemoryError")
    assert "nothing is written" in err


def test_no_evaluation_file(results, tmp_path, capsys):
    res, snap = results
    (tmp_path / "empty").mkdir()
    _aggregate_fails(res, snap, capsys, [tmp_path / "empty"], r"--evals .*empty: no evaluation JSON found")


# ------------------------------------------------------------------------------------ leaderboard


@pytest.fixture(scope="module")
def good_scores(good):
    res, _ = good
    df, _ = read_scores(res / "tables" / "scores.parquet")
    return df


def write_table(df: pd.DataFrame, path: Path) -> Path:
    """A scores.parquet as another (buggy) writer would leave it: no checks."""
    pq.write_table(pa.Table.from_pandas(df, schema=SCORE_SCHEMA, preserve_index=False), path)
    return path


def _ok_acc_row(df: pd.DataFrame) -> int:
    m = (df["model_id"] == TA) & (df["suite"] == "arithmetic") & (df["metric"] == "acc") & (df["split"] == "test")
    (i,) = df.index[m]
    return i


def tamper_value(value):
    def fn(df):
        df.loc[_ok_acc_row(df), "value"] = value
        return df
    return fn


def tamper(col, value):
    def fn(df):
        df.loc[_ok_acc_row(df), col] = value
        return df
    return fn


TABLES = [
    ("0-row table", lambda df: df.iloc[0:0], r"the scores table has no rows"),
    ("only error rows", lambda df: df[df["status"] == "error"], r"no evaluation succeeded"),
    ("acc 5.0", tamper_value(5.0), r"value 5 of 'acc' is outside its range \[0, 1\] \(model "
                                   rf"'{TA}', suite 'arithmetic', .*metric 'acc'.*split 'test', from .*{TA}/arithmetic.json\)"),
    ("inf value", tamper_value(math.inf), r"value of 'acc' is inf"),
    ("negative stderr", tamper("stderr", -1.0), r"stderr -1 of 'acc' is negative"),
    ("negative n", tamper("n", -3), r"n -3 of 'acc' is negative"),
    ("duplicated rows", lambda df: pd.concat([df, df[df["model_id"] == TA]]).reset_index(drop=True),
     rf"duplicated row \(model '{TA}', suite 'arithmetic'.*\) appears 2 times"),
]


@pytest.mark.parametrize("case, fn, message", TABLES, ids=[t[0] for t in TABLES])
def test_leaderboard_refuses_a_bad_table(results, good_scores, tmp_path, capsys, case, fn, message):
    res, snap = results
    bad = write_table(fn(good_scores.copy()), tmp_path / "scores.parquet")
    assert main(["leaderboard", "--scores", str(bad), "--out-dir", str(res)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"mergesweep leaderboard: error: {bad}: "), err  # names the input
    assert re.search(message, err), err
    assert snapshot(res) == snap


def base_fingerprint_everywhere(checkpoints: dict) -> None:
    """What the hand-written provenance.json fixture hid: every expert with the base's fingerprint."""
    for c in checkpoints.values():
        c["fingerprint"] = "sha256:5b0c1f9e2a7d"


def _provenance(tmp_path, fn) -> Path:
    prov = json.loads((DATA / "provenance.json").read_text())
    fn(prov["checkpoints"])
    p = tmp_path / "provenance.json"
    p.write_text(json.dumps(prov))
    return p


@pytest.mark.parametrize("case, fn, message", [
    ("provenance fingerprint differs from the model's record",
     lambda c: c["expert-reverse"].update(fingerprint="sha256:0ther"),
     r"checkpoint 'expert-reverse' has fingerprint sha256:0ther but the model's own record .* has sha256:bee5fade0002"),
    ("every expert recorded with the base's fingerprint",
     base_fingerprint_everywhere,
     r"checkpoint 'expert-arithmetic' has fingerprint sha256:5b0c1f9e2a7d but the model's own record"),
], ids=["fingerprint mismatch", "base fingerprint on every expert"])
def test_leaderboard_refuses_contradicting_fingerprints(results, tmp_path, capsys, case, fn, message):
    res, snap = results
    prov = _provenance(tmp_path, fn)
    assert main(["leaderboard", "--scores", str(res / "tables" / "scores.parquet"), "--out-dir", str(res),
                 "--provenance", str(prov)]) == 1
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert snapshot(res) == snap


def test_shared_fingerprint_between_references(good_scores):
    # the records themselves say two different models have the same weights
    from mergesweep.aggregate.provenance import ProvenanceError, checkpoint_identities

    refs = good_scores.drop_duplicates("model_id")
    refs = refs[refs["role"].isin(["base", "expert"])].copy()
    checkpoint_identities(None, refs)  # distinct fingerprints: fine
    refs.loc[refs["model_id"] == "expert-arithmetic", "fingerprint"] = "sha256:5b0c1f9e2a7d"
    with pytest.raises(ProvenanceError, match="'base-smollm2-135m' and 'expert-arithmetic' carry the same fingerprint"):
        checkpoint_identities(None, refs)


def test_good_inputs_still_pass_and_overwrite(good, tmp_path):
    # the refusals are not a blanket refusal: a good table is written over the old outputs
    res, snap = good
    out = tmp_path / "res"
    shutil.copytree(res, out)  # (not the `results` fixture: it would share tmp_path's "results")
    evals = copy_evals(tmp_path / "evals")
    edit(evals, TA, "arithmetic", setter("value", 0.57))
    assert main(["aggregate", "--evals", str(evals), "--out", str(out / "tables" / "scores.parquet")]) == 0
    assert main(["leaderboard", "--scores", str(out / "tables" / "scores.parquet"), "--out-dir", str(out)]) == 0
    new = snapshot(out)
    assert new.keys() == snap.keys() and new["tables/scores.parquet"] != snap["tables/scores.parquet"]


# ------------------------------------------------------------------------------------ the range table


def test_metric_ranges_live_in_one_table():
    assert metric_range("acc") == (0.0, 1.0) == METRIC_RANGES["acc"]
    assert metric_range("prompt_level_strict_acc") == (0.0, 1.0)  # ifeval, by pattern
    assert metric_range("pass@10") == (0.0, 1.0)
    assert metric_range("perplexity")[0] == 1.0
    assert metric_range("some_new_metric") == (-math.inf, math.inf)
    assert value_problem("some_new_metric", 123.0, 1.0, 5) is None
    assert value_problem("some_new_metric", math.inf, 1.0, 5) == "value of 'some_new_metric' is inf"
    assert value_problem("mcc", -1.0, None, None) is None
    assert "outside its range [-1, 1]" in value_problem("mcc", -1.5, None, None)
    assert value_problem("acc", 1.0, math.nan, 10) is None  # stderr not reported
    assert value_problem("acc", 0.5, 0.1, True) == "n True of 'acc' is not a whole number"
