"""End to end: the tiny preset through a real `snakemake` process, real lm-eval, real checkpoints.

All tests here share the session's one tiny run (``tiny_run`` in tests/conftest.py: through the
SLURM test cluster when it is available, else locally) and assert on its values: every model and
suite scored, experts that learned their skill, a leaderboard that ranks the merges, records and
provenance written by the real stages and read by the real consumers, ids the workflow and
``mergesweep merge`` agree on. Tests that change things work on a copy of the run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import in_background
from helpers_pipeline import REPO, run_cli
from mergesweep.checkpoints.layout import checkpoint_fingerprint
from mergesweep.plan import build_plan
from mergesweep.record import read_record

pytestmark = pytest.mark.slow
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(workdir: Path, configfile: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([*SNAKEMAKE, *extra, "--snakefile", str(workdir / "Snakefile"), "--directory", str(workdir),
                           "--cores", "2", "--configfile", str(configfile)], capture_output=True, text=True, env=env)
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


def shared_run(tiny_run: dict) -> dict:
    """The ``run`` fixture's value (also given to the tests a background lane runs)."""
    assert tiny_run["rc"] == 0, tiny_run["log"][-5000:]
    cfg = yaml.safe_load(tiny_run["config"].read_text())
    return {**tiny_run, "cfg": cfg, "plan": build_plan(cfg)}


@pytest.fixture(scope="module")
def run(tiny_run):
    return shared_run(tiny_run)


def copy_of(run, tmp_path) -> Path:
    """A copy of the finished run to change things in (the shared run stays as it is)."""
    dst = tmp_path / "run"
    shutil.copytree(run["workdir"], dst, symlinks=True, ignore=shutil.ignore_patterns(".snakemake", "slurm"))
    return dst


def scores(work: Path) -> pd.DataFrame:
    return pd.read_parquet(work / "results/tables/scores.parquet")


def value(s: pd.DataFrame, model: str, suite: str, split: str, metric: str = "acc") -> float:
    rows = s[(s.model_id == model) & (s.suite == suite) & (s.split == split) & (s.metric == metric)
             & (s.status == "ok")]
    assert len(rows) == 1, (model, suite, split, metric)
    return float(rows.value.iloc[0])


def test_scores_cover_every_model_and_task(run):
    s = scores(run["workdir"])
    plan = run["plan"]
    for c in ["model_id", "role", "method", "params", "base", "experts", "suite", "task", "metric", "value",
              "stderr", "n", "split"]:
        assert c in s.columns, c
    assert set(s.model_id) == set(plan.models)
    assert set(s.loc[s.role == "merged", "model_id"]) == set(plan.merges)
    for model in plan.models:
        for suite in plan.suites:
            for split in ("validation", "test"):
                assert 0.0 <= value(s, model, suite, split) <= 1.0
    n_test = s[(s.suite == "arithmetic") & (s.split == "test") & (s.metric == "acc")].n.unique()
    assert list(n_test) == [run["cfg"]["suites"]["sizes"]["test"]]
    assert set(s.loc[s.role == "merged", "method"]) == {m.method for m in plan.merges.values()}


def test_each_expert_learns_its_own_skill(run):
    """The tiny experts must learn: own-skill accuracy well above the base's, on both splits."""
    s = scores(run["workdir"])
    base = run["plan"].base.name
    for name, e in run["plan"].experts.items():
        for split in ("validation", "test"):
            expert, ref = value(s, name, e.domain, split), value(s, base, e.domain, split)
            assert expert >= ref + 0.3, (name, split, expert, ref)
        # perplexity of the target answers: much lower for the expert
        assert value(s, name, e.domain, "test", "perplexity") < 0.8 * value(s, base, e.domain, "test", "perplexity")


def test_leaderboard_ranks_the_merges(run):
    """Normalised scores recomputed here from scores.parquet (merged / expert accuracy on each
    skill, averaged over the skills: docs/report.md); per method the point with the best
    *validation* score is selected (ties: smallest id); the selected points are ranked by test."""
    work, plan = run["workdir"], run["plan"]
    s = scores(work)

    def mean_norm(mid, split):
        norms = [value(s, mid, e.domain, split) / value(s, name, e.domain, split) for name, e in plan.experts.items()]
        return sum(norms) / len(norms)

    lb = pd.read_parquet(work / "results/tables/leaderboard.parquet")
    assert set(lb.model_id) == set(plan.merges)
    for mid, got in zip(lb.model_id, lb.norm_test_mean):
        assert got == pytest.approx(mean_norm(mid, "test"), abs=1e-9), mid
    methods = {m.method for m in plan.merges.values()}
    for method in methods:
        points = sorted(mid for mid, m in plan.merges.items() if m.method == method)
        best = max(points, key=lambda mid: (mean_norm(mid, "validation"), [-ord(c) for c in mid]))
        assert set(lb.loc[lb.selected & (lb.method == method), "model_id"]) == {best}, method
    ranked = lb[lb.selected].sort_values("rank")
    assert list(ranked["rank"]) == list(range(1, len(methods) + 1))
    assert list(ranked.norm_test_mean) == sorted(ranked.norm_test_mean, reverse=True)
    assert ranked.norm_test_mean.nunique() == len(methods), "the methods do not differ: nothing is ranked"
    board = (work / "results/leaderboard.md").read_text().split("## Leaderboard", 1)[1].split("\n## ", 1)[0]
    positions = [board.find(mid) for mid in ranked.model_id]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), (list(ranked.model_id), positions)


def test_records_and_provenance_come_from_the_real_stages(run):
    """Producer -> consumer: every model's own record (fetch/pretrain, finetune, merge writers),
    its own fingerprint, the plan's uid; provenance and scores.parquet carry the same."""
    work, plan = run["workdir"], run["plan"]
    prov = json.loads((work / "results/tables/provenance.json").read_text())
    s = scores(work)
    fingerprints = {}
    for c in (plan.base, *plan.experts.values()):
        rec = read_record(work / c.dir)
        assert (rec.role, rec.stage, rec.uid, rec.model_id) == (c.role, c.stage, c.uid, c.name)
        assert rec.fingerprint == checkpoint_fingerprint(work / c.dir)
        assert prov["checkpoints"][c.name]["fingerprint"] == rec.fingerprint
        assert prov["checkpoints"][c.name]["uid"] == c.uid
        assert set(s.loc[s.model_id == c.name, "fingerprint"]) == {rec.fingerprint}
        fingerprints[c.name] = rec.fingerprint
        if c.role == "expert":
            assert rec.domain == c.domain and rec.base == plan.base.name
            assert rec.source["base_fingerprint"] == fingerprints[plan.base.name]
    assert len(set(fingerprints.values())) == len(fingerprints), fingerprints
    for mid, m in plan.merges.items():
        rec = read_record(work / m.dir)
        assert (rec.model_id, rec.role, rec.stage, rec.method) == (mid, "merged", "merge", m.method)
        assert rec.params == m.params and rec.experts == list(m.experts)
        assert rec.fingerprint == checkpoint_fingerprint(work / m.dir)
        assert (work / m.dir / "config.json").exists() and m.method in (work / m.dir / "README.md").read_text()


def test_merge_by_hand_gets_the_workflow_id(run, tmp_path):
    """`mergesweep merge` on the workflow's merge YAML computes the plan's id; pointed at the
    workflow's output it is up to date; elsewhere it writes the same weights."""
    work, plan = run["workdir"], run["plan"]
    mid, m = next((k, v) for k, v in plan.merges.items() if v.method == "task_arithmetic")
    spec = work / m.yaml
    up = run_cli("merge", "--config", spec, "--out", work / m.dir, cwd=work, check=True)
    assert "up to date" in up.stderr and json.loads(up.stdout.strip().splitlines()[-1])["model_id"] == mid
    out = tmp_path / "again"
    again = run_cli("merge", "--config", spec, "--out", out, cwd=work, check=True)
    assert json.loads(again.stdout.strip().splitlines()[-1])["model_id"] == mid
    assert checkpoint_fingerprint(out) == checkpoint_fingerprint(work / m.dir)


def test_report_names_every_model(run):
    work = run["workdir"]
    s = scores(work)
    html = (work / "results/report/report.html").read_text()
    md = (work / "results/leaderboard.md").read_text()
    for model in s.model_id.unique():
        assert model in html, model
    for model in s.loc[s.role != "merged", "model_id"].unique():
        assert model in md


@in_background(after="tiny_run")  # on a copy of the run, beside the other tests
def test_nothing_to_redo_then_only_new_jobs(run, tmp_path):
    work = copy_of(run, tmp_path)
    cfg_path = work / "config/presets/tiny.yaml"
    dry = snakemake(work, cfg_path, "-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["merges"].append({"method": "ties", "params": {"density": 0.5}})
    # an equivalent spelling of an existing merge is the same model: nothing new for it
    cfg["merges"].append({"method": "linear", "params": {"weight": 1.0, "normalize": True}})
    new_cfg = work / "tiny_plus.yaml"
    new_cfg.write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(snakemake(work, new_cfg, "-n").stdout)
    assert jobs.get("merge") == 1 and jobs.get("evaluate_merged") == 1, jobs  # one job: every suite
    for rule in ("finetune", "pretrain_base", "make_data", "evaluate"):
        assert rule not in jobs, jobs


@in_background(after="tiny_run")  # on a copy of the run, beside the other tests
def test_deleted_model_is_rebuilt(run, tmp_path):
    work = copy_of(run, tmp_path)
    cfg_path = work / "config/presets/tiny.yaml"
    victim = next(iter(run["plan"].merges.values()))
    shutil.rmtree(work / victim.dir)
    dry = snakemake(work, cfg_path, "-n", "--printshellcmds").stdout
    jobs = planned_jobs(dry)
    assert jobs.get("merge") == 1, jobs
    assert f"--model-id {victim.model_id} " in dry and f"--out {victim.dir} " in dry


@in_background(after="tiny_run")  # on a copy of the run, beside the other tests
def test_keep_models_selected_keeps_only_the_selected_points(run, tmp_path):
    """keep_models: selected: merged models are removed once evaluated and each sweep's selected
    point is kept; a rerun has nothing to do; a removed model rebuilt on request from its recipe
    has the bytes the keep-everything run wrote, and its evaluations stay up to date.

    Starts from a copy of the shared run with the task-arithmetic sweep's models and evaluations
    removed (everything else kept), so only that sweep is merged and evaluated again."""
    from mergesweep.aggregate.outputs import selected_model_ids

    work = copy_of(run, tmp_path)
    cfg_path = work / "config/presets/tiny.yaml"
    plan = run["plan"]
    redo = [m for m in plan.merges.values() if m.method == "task_arithmetic"]
    assert len(redo) == 2
    for m in redo:
        shutil.rmtree(work / m.dir)
        shutil.rmtree(work / "results/evals" / m.model_id)
    keep = ("--config", "keep_models=selected")
    dry = snakemake(work, cfg_path, "-n", *keep)
    assert "keep_models: selected" in dry.stderr and "2 kept" in dry.stderr, dry.stderr[-2000:]
    assert planned_jobs(dry.stdout).get("merge") == 2, dry.stdout[-2000:]
    snakemake(work, cfg_path, *keep)
    selected = selected_model_ids(work / "results/tables/selection.parquet")
    # one selected point per sweep (linear; task arithmetic over lambda), and only those on disk
    assert len(selected) == 2 and set(selected) <= set(plan.merges)
    on_disk = sorted(p.name for p in (work / "results/models").iterdir())
    assert on_disk == selected
    for m in plan.merges.values():  # every merged model was evaluated on every suite
        assert sorted(p.stem for p in (work / "results/evals" / m.model_id).glob("*.json")) == sorted(plan.suites)
    assert "Nothing to be done" in snakemake(work, cfg_path, "-n", *keep).stdout

    removed = next(m for m in redo if m.model_id not in selected)
    snakemake(work, cfg_path, removed.dir, *keep)  # rebuild on request
    for f in ("model.safetensors", "config.json"):
        assert (work / removed.dir / f).read_bytes() == (run["workdir"] / removed.dir / f).read_bytes(), f
    assert read_record(work / removed.dir).fingerprint == read_record(run["workdir"] / removed.dir).fingerprint
    assert "Nothing to be done" in snakemake(work, cfg_path, "-n", *keep).stdout  # its evaluations stand


@in_background(after="tiny_run")  # on a copy of the run, beside the other tests
def test_failing_suite_is_recorded_and_the_rest_survive(run, tmp_path):
    """A task YAML that cannot load records an error for that (model, suite); every other score
    stays in the tables and the failure shows in the report."""
    work = copy_of(run, tmp_path)
    cfg_path = work / "config/presets/tiny.yaml"
    before = scores(work)
    task_yaml = work / "resources/tasks/capitals/ms_capitals_test.yaml"
    spec = yaml.safe_load(task_yaml.read_text())
    spec["dataset_kwargs"]["data_files"]["test"] = str(work / "resources/data/capitals/missing.jsonl")
    task_yaml.write_text(yaml.safe_dump(spec))
    base = run["plan"].base.name
    target = f"results/evals/{base}/capitals.json"
    snakemake(work, cfg_path, target, "--force")  # re-evaluate one (model, suite) on the broken task
    result = json.loads((work / target).read_text())
    assert result["status"] == "error" and "missing.jsonl" in result["error"]
    snakemake(work, cfg_path)  # aggregation and report pick the failure up
    after = scores(work)
    failed = after[after.status == "error"]
    assert set(zip(failed.model_id, failed.suite)) == {(base, "capitals")}
    key = ["model_id", "suite", "metric", "split"]
    untouched = ~((before.model_id == base) & (before.suite == "capitals"))
    ref = before[untouched].sort_values(key).reset_index(drop=True)
    kept = after[after.status == "ok"].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(kept[key + ["value"]], ref[key + ["value"]])
    html = (work / "results/report/report.html").read_text()
    assert "missing.jsonl" in html


@in_background()  # its own workflow copy, beside the other tests
def test_killed_run_restarts_with_the_same_command(tmp_path):
    """Ctrl-C (SIGINT) on a local run mid-pretraining, then the same command again: the cut job is
    redone (profiles/default: rerun-incomplete), nothing half-written is left."""
    shutil.copy(REPO / "Snakefile", tmp_path / "Snakefile")
    for sub in ("workflow", "config", "profiles"):
        shutil.copytree(REPO / sub, tmp_path / sub)
    cfg = tmp_path / "config/presets/tiny.yaml"
    # a third of the preset's pretraining (still ~10 s of it on one idle core, ~16 s loaded, against
    # the 2 s it runs before Ctrl-C): the rerun redoes the cut job in full
    doc = yaml.safe_load(cfg.read_text())
    doc["base"]["pretrain"]["steps"] = 150
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    target = "resources/checkpoints/tiny-base"
    cmd = [*SNAKEMAKE, target, "--snakefile", str(tmp_path / "Snakefile"), "--directory", str(tmp_path),
           "--cores", "2", "--configfile", str(cfg)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path, start_new_session=True)
    log = tmp_path / "results/logs/pretrain/tiny-base.log"
    deadline = time.time() + 600
    while not (log.exists() and "pretrain" in log.read_text()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before pretraining started"
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
    proc.wait(120)
    assert not (tmp_path / target / "mergesweep.json").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert read_record(tmp_path / target).stage == "pretrain"
    leftovers = [p.name for p in (tmp_path / "resources/checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers
