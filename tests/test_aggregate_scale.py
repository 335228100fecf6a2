"""The aggregation at sweep scale: a synthetic 7,000-model evaluation tree read through
``--evals-dir``/``--models`` (values checked against the generator's), a command line that does not
grow with the sweep, and the O(n log n) Pareto front against the definition."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from helpers_pipeline import REPO
from mergesweep.aggregate import analysis as A
from mergesweep.aggregate.scores import EvalFileError, build_scores, eval_files_of, read_models_list, read_scores
from mergesweep.cli import main

sys.path.insert(0, str(REPO / "benchmarks"))
from synth_evals import generate  # noqa: E402


# ---------------------------------------------------------------------------------- Pareto front


def brute_force_front(x, y) -> np.ndarray:
    """The definition, point by point: dominated if another point is >= on both, > on one."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    front = np.zeros(len(x), bool)
    for i in range(len(x)):
        if not (np.isfinite(x[i]) and np.isfinite(y[i])):
            continue
        front[i] = not any(
            np.isfinite(x[j]) and np.isfinite(y[j]) and x[j] >= x[i] and y[j] >= y[i] and (x[j] > x[i] or y[j] > y[i])
            for j in range(len(x)))
    return front


@pytest.mark.parametrize("seed", range(30))
def test_pareto_front_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 60))
    # few distinct values: many ties in x, in y and identical points; NaNs and infinities too
    x = rng.integers(0, 6, n).astype(float) / 5
    y = rng.integers(0, 6, n).astype(float) / 5
    for arr in (x, y):
        arr[rng.random(n) < 0.1] = np.nan
    if n and seed % 3 == 0:
        x[rng.integers(0, n)] = np.inf
    np.testing.assert_array_equal(A.pareto_front(x, y), brute_force_front(x, y))


def test_pareto_front_cases():
    # identical points do not dominate each other; a NaN point is never on the front
    assert A.pareto_front([1, 1, 0.5], [1, 1, 0.5]).tolist() == [True, True, False]
    assert A.pareto_front([1, np.nan, 0.2], [0, 2, 1]).tolist() == [True, False, True]
    assert A.pareto_front([0.5, 0.5], [0.2, 0.3]).tolist() == [False, True]  # same x, larger y wins
    assert A.pareto_front([], []).tolist() == []
    # 3,000 points on a coarse grid (ties everywhere), against the definition in matrix form
    x, y = np.round(np.random.default_rng(0).random((2, 3000)), 2)
    dominated = ((x[:, None] >= x) & (y[:, None] >= y) & ((x[:, None] > x) | (y[:, None] > y))).any(axis=0)
    np.testing.assert_array_equal(A.pareto_front(x, y), ~dominated)
    # a line of points of decreasing y: all on the front
    assert A.pareto_front(np.arange(5), -np.arange(5)).all()


# ----------------------------------------------------------------------- 7,000 models, --models


# the full model count (28,000 files); 3 experts and 1 lm-eval task per suite and split keep it
# at ~20 s on 2 cores (the benchmark uses 5 experts and 20 tasks); compact JSON
TREE = dict(n_models=7000, n_experts=3, tasks=1, error_rate=0.03, indent=None)


def aggregate(root, first: str, last: str, out) -> subprocess.CompletedProcess:
    """``mergesweep aggregate`` over the tree under ``root``, with a stale model directory of an
    older config (a copy of model ``last``'s) and a suite file no longer planned (in model
    ``first``'s) in it: never to be read; removed afterwards."""
    evals = root / "evals"
    stale = evals / "task-arithmetic-0000000000"
    shutil.copytree(evals / last, stale)
    extra = evals / first / "oldsuite.json"
    extra.write_text("not even JSON")
    try:
        return subprocess.run([sys.executable, "-m", "mergesweep", "aggregate", "--evals-dir", str(evals),
                               "--models", str(root / "evaluation_models.json"), "--provenance",
                               str(root / "provenance.json"), "--out", str(out)],
                              # a guard against a hang only: in its niced lane of a loaded CI run the
                              # command waits for CPU (300 s ran out in ci14d); its speed is
                              # benchmarks/bench_leaderboard.py's to measure
                              capture_output=True, text=True, timeout=1500)
    finally:
        shutil.rmtree(stale)
        extra.unlink()


def write_and_aggregate(root) -> dict:
    """The tree written under ``root/tree`` by a process of its own, then aggregated into
    ``root/scores.parquet`` (tests/conftest.py runs this in a background lane, which does no
    Python work of its own to speak of): the aggregation's process and output. The ``tree``
    fixture rebuilds the tree's values with ``generate(..., write=False)`` (the same, in 3 s)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from synth_evals import generate; "
            f"t = generate(sys.argv[2], **{TREE!r}); print(json.dumps([t.models[0].model_id, t.models[-1].model_id]))")
    made = subprocess.run([sys.executable, "-c", code, str(REPO / "benchmarks"), str(root / "tree")], check=True,
                          capture_output=True, text=True)
    first, last = json.loads(made.stdout.splitlines()[-1])
    out = root / "scores.parquet"
    return {"root": root / "tree", "proc": aggregate(root / "tree", first, last, out), "out": out}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    from conftest import early, scheduled

    if scheduled("synthetic tree"):  # written and aggregated by a background lane
        return generate(early("synthetic tree")["root"], write=False, **TREE)
    return generate(tmp_path_factory.mktemp("synth") / "tree", **TREE)


def test_aggregate_reads_a_7000_model_tree(tree, tmp_path):
    from conftest import early, scheduled

    if scheduled("synthetic tree"):
        got = early("synthetic tree")
        proc, out = got["proc"], got["out"]
    else:
        out = tmp_path / "scores.parquet"
        proc = aggregate(tree.root, tree.models[0].model_id, tree.models[-1].model_id, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    df, prov = read_scores(out)
    n_models, n_suites = len(tree.models), len(tree.suites)
    assert n_models == 7000 and df["model_id"].nunique() == 7000
    assert "task-arithmetic-0000000000" not in set(df["model_id"]) and "oldsuite" not in set(df["suite"])
    # one row per (ok file, task, split), one per failed file
    n_ok_files = n_models * n_suites - len(tree.errors)
    assert len(df) == n_ok_files * tree.tasks * len(A.SPLITS) + len(tree.errors)
    err = df[df["status"] == "error"]
    assert set(zip(err["model_id"], err["suite"])) == tree.errors and len(tree.errors) > 100
    assert (df.groupby("role")["model_id"].nunique().to_dict()
            == {"base": 1, "expert": len(tree.skills), "merged": 7000 - 1 - len(tree.skills)})
    # suite scores equal the generator's mean over tasks, for a sample of (model, suite, split)
    suites = A.suite_scores(df, A.primary_metrics(df)).set_index(["model_id", "suite", "split"])["score"]
    rng = np.random.default_rng(1)
    for i in rng.choice(len(tree.models), 40, replace=False):
        m = tree.models[i].model_id
        for q in tree.suites:
            for split in A.SPLITS:
                expected = tree.suite_score(m, q, split)
                if np.isnan(expected):
                    assert (m, q, split) not in suites.index
                else:
                    assert suites[(m, q, split)] == pytest.approx(expected, abs=1e-12), (m, q, split)
    roles = df.drop_duplicates("suite").set_index("suite")["suite_role"].to_dict()
    assert roles == {**{s: "skill" for s in tree.skills}, "capitals": "heldout"}
    assert prov["config_hash"] and len(prov["merges"]) == 7000 - 1 - len(tree.skills)


def test_a_listed_model_without_evaluations_is_named(tree, tmp_path):
    listed = tmp_path / "models.json"
    doc = json.loads(tree.models_file.read_text())
    listed.write_text(json.dumps({"models": [*doc["models"][:3], "ties-ffffffffff"], "suites": doc["suites"]}))
    out = tmp_path / "scores.parquet"
    assert main(["aggregate", "--evals-dir", str(tree.evals), "--models", str(listed), "--out", str(out)]) == 1
    assert not out.exists()
    with pytest.raises(EvalFileError) as e:
        eval_files_of(tree.evals, *read_models_list(listed))
    assert str(e.value) == (f"{tree.evals}/ties-ffffffffff/{doc['suites'][0]}.json: evaluation of a listed model "
                            f"not found (and {len(doc['suites']) - 1} more)")
    # a text list (no suites): every <model>/*.json is read; a model without any is named
    listed = tmp_path / "models.txt"
    listed.write_text("\n".join([*doc["models"][:3], "ties-ffffffffff"]) + "\n")
    with pytest.raises(EvalFileError, match=r"ties-ffffffffff/\*\.json: evaluation of a listed model not found"):
        eval_files_of(tree.evals, *read_models_list(listed))
    listed.write_text("\n".join(doc["models"][:3]) + "\n")
    files = eval_files_of(tree.evals, *read_models_list(listed))
    assert len(files) == 3 * len(tree.suites)
    assert len(build_scores(files)["model_id"].unique()) == 3


@pytest.mark.parametrize("text, message", [
    ('{"models": "a"}', "key 'models' must be a list of non-empty strings"),
    ('{"models": ["a"], "suites": [1]}', "key 'suites' must be a list of non-empty strings"),
    ('{"models": []}', "lists no model"),
    ('{"models": ["a", "a"]}', "model 'a' is listed twice"),
    ("[1]", "expected a JSON object with key 'models'"),
])
def test_bad_models_list_is_named(tmp_path, text, message):
    p = tmp_path / "models.json"
    p.write_text(text)
    with pytest.raises(EvalFileError, match=re.escape(f"{p}: {message}")):
        read_models_list(p)


def test_evals_and_models_arguments(tmp_path, caplog):
    out = str(tmp_path / "s.parquet")
    assert main(["aggregate", "--evals", "x", "--evals-dir", "y", "--models", "z", "--out", out]) == 1
    assert main(["aggregate", "--evals-dir", str(tmp_path), "--out", out]) == 1
    assert main(["aggregate", "--out", out]) == 1
    text = caplog.text
    assert "either --evals or --evals-dir" in text and "--evals-dir and --models go together" in text
    assert "no input: give --evals PATH... or --evals-dir DIR --models FILE" in text


# ----------------------------------------------------------------- the rule's command line


def _aggregate_command(tmp_path, n_merges: int) -> str:
    cfg = yaml.safe_load((REPO / "config/presets/tiny.yaml").read_text())
    cfg["merges"] = [{"method": "task_arithmetic",
                      "params": {"lambda": [round(0.01 * (i + 1), 4) for i in range(n_merges)]}}]
    d = tmp_path / f"n{n_merges}"
    d.mkdir()
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "-n",
                           "--cores", "1", "--printshellcmds", "--directory", str(d), "--configfile",
                           str(d / "cfg.yaml"), "--until", "aggregate"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (cmd,) = [line.strip() for line in proc.stdout.splitlines() if " -m mergesweep aggregate " in line]
    return cmd


def test_aggregate_command_does_not_grow_with_the_sweep(tmp_path):
    small, big = _aggregate_command(tmp_path, 2), _aggregate_command(tmp_path, 400)
    assert small == big  # the same command for 6 and 404 models: no evaluation path on it
    assert "--evals-dir results/evals --models results/evaluation_models.json" in big
    assert len(big) < 600 and ".json'" not in big.split("--models")[0]
