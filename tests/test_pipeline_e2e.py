"""End to end: the tiny preset through a real `snakemake` process, real lm-eval, real checkpoints.

One pipeline run per test session (about 2-3 minutes on 2 cores); the tests then assert on the
values in scores.parquet, on resumption, and on what a config change re-runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers_pipeline import REPO

pytestmark = pytest.mark.slow
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]


def snakemake(workdir: Path, configfile: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([*SNAKEMAKE, "--directory", str(workdir), "--configfile", str(configfile),
                           "--cores", "2", *extra], capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(extra)} failed:\n{proc.stderr[-5000:]}")
    return proc


def planned_jobs(dry_run_output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run: rule -> count."""
    counts = {}
    m = re.search(r"Job stats:\n(.*?)\n\n", dry_run_output, re.S)
    if not m:
        return counts
    for line in m.group(1).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("tiny")
    cfg_path = work / "tiny.yaml"
    shutil.copy(REPO / "config/presets/tiny.yaml", cfg_path)
    snakemake(work, cfg_path)
    return work, cfg_path


def test_scores_cover_every_model_and_task(tiny_run):
    work, cfg_path = tiny_run
    cfg = yaml.safe_load(cfg_path.read_text())
    scores = pd.read_parquet(work / "results/tables/scores.parquet")
    for col in ["model_id", "role", "method", "params", "base", "experts", "suite", "task", "metric", "value",
                "stderr", "n", "split"]:
        assert col in scores.columns, col
    models = set(scores.model_id)
    experts = {e["name"] for e in cfg["experts"]}
    assert cfg["base"]["name"] in models and experts <= models
    merged = set(scores.loc[scores.role == "merged", "model_id"])
    assert len(merged) == 3  # linear + task_arithmetic x 2 lambdas
    suites = cfg["suites"]["skills"] + cfg["suites"]["heldout"]
    ok = scores[scores.status == "ok"]
    for model in models:
        for suite in suites:
            for split, n in (("test", None), ("validation", None)):
                rows = ok[(ok.model_id == model) & (ok.suite == suite) & (ok.split == split) & (ok.metric == "acc")]
                assert len(rows) == 1, (model, suite, split)
                assert 0.0 <= rows.value.iloc[0] <= 1.0
    sizes = cfg["suites"]["sizes"]
    n_test = ok[(ok.suite == "arithmetic") & (ok.split == "test") & (ok.metric == "acc")].n.unique()
    assert list(n_test) == [sizes["test"]]
    assert set(scores.loc[scores.role == "merged", "method"]) == {"linear", "task_arithmetic"}


def test_each_expert_beats_the_base_on_its_own_skill(tiny_run):
    work, cfg_path = tiny_run
    cfg = yaml.safe_load(cfg_path.read_text())
    s = pd.read_parquet(work / "results/tables/scores.parquet")
    s = s[(s.split == "test") & (s.status == "ok")]
    base = cfg["base"]["name"]

    def score(model, suite, metric):
        return float(s[(s.model_id == model) & (s.suite == suite) & (s.metric == metric)].value.iloc[0])

    for e in cfg["experts"]:
        skill = e["skill"]
        # perplexity of the target answers: much lower for the expert (smooth, always measurable)
        assert score(e["name"], skill, "perplexity") < 0.8 * score(base, skill, "perplexity"), e["name"]
        assert score(e["name"], skill, "acc") >= score(base, skill, "acc"), e["name"]


def test_merged_models_are_hf_checkpoints_with_cards(tiny_run):
    work, _ = tiny_run
    models = sorted((work / "results/models").iterdir())
    assert len(models) == 3
    for m in models:
        meta = json.loads((m / "mergesweep.json").read_text())
        assert meta["model_id"] == m.name and meta["role"] == "merged"
        assert (m / "config.json").exists() and (m / "tokenizer.json").exists()
        assert meta["method"] in (m / "README.md").read_text()
        spec = yaml.safe_load((work / f"results/merges/{m.name}.yaml").read_text())
        assert spec["method"] == meta["method"]


def test_leaderboard_and_report_name_every_model(tiny_run):
    work, _ = tiny_run
    scores = pd.read_parquet(work / "results/tables/scores.parquet")
    html = (work / "results/report/report.html").read_text()
    md = (work / "results/leaderboard.md").read_text()
    for model in scores.model_id.unique():
        assert model in html, model
    for model in scores.loc[scores.role != "merged", "model_id"].unique():
        assert model in md
    lb = pd.read_parquet(work / "results/tables/leaderboard.parquet")
    assert len(lb) == 3


def test_nothing_to_redo_then_only_new_jobs(tiny_run):
    work, cfg_path = tiny_run
    dry = snakemake(work, cfg_path, "-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["merges"].append({"method": "ties", "params": {"density": 0.5}})
    new_cfg = work / "tiny_plus.yaml"
    new_cfg.write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(snakemake(work, new_cfg, "-n").stdout)
    n_suites = len(cfg["suites"]["skills"]) + len(cfg["suites"]["heldout"])
    assert jobs.get("merge") == 1 and jobs.get("evaluate") == n_suites, jobs
    for rule in ("finetune", "pretrain_base", "make_data"):
        assert rule not in jobs, jobs


def test_failing_suite_is_recorded_and_the_rest_survive(tiny_run):
    """A task YAML that cannot load records an error for that (model, suite); every other score
    stays in the tables and the failure shows in the report. (Runs last: it breaks a task.)"""
    work, cfg_path = tiny_run
    before = pd.read_parquet(work / "results/tables/scores.parquet")
    task_yaml = work / "resources/tasks/capitals/ms_capitals_test.yaml"
    spec = yaml.safe_load(task_yaml.read_text())
    spec["dataset_kwargs"]["data_files"]["test"] = str(work / "resources/data/capitals/missing.jsonl")
    task_yaml.write_text(yaml.safe_dump(spec))
    target = "results/evals/tiny-base/capitals.json"
    snakemake(work, cfg_path, target, "--force")  # re-evaluate one (model, suite) on the broken task
    result = json.loads((work / target).read_text())
    assert result["status"] == "error" and "missing.jsonl" in result["error"]
    snakemake(work, cfg_path)  # aggregation and report pick the failure up
    after = pd.read_parquet(work / "results/tables/scores.parquet")
    failed = after[after.status == "error"]
    assert set(zip(failed.model_id, failed.suite)) == {("tiny-base", "capitals")}
    key = ["model_id", "suite", "metric", "split"]
    untouched = ~((before.model_id == "tiny-base") & (before.suite == "capitals"))
    ref = before[untouched].sort_values(key).reset_index(drop=True)
    kept = after[after.status == "ok"].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(kept[key + ["value"]], ref[key + ["value"]])
    html = (work / "results/report/report.html").read_text()
    assert "missing.jsonl" in html or "error" in html.lower()
