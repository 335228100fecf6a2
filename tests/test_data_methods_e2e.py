"""Data-aware merges through the real pipeline: the shared tiny run, extended with RegMean,
Fisher, RegMean++, Localize-and-Stitch (trained masks) and PLeaS, re-run with ``snakemake``.

Stats jobs run once per (expert, kind) and are shared by every merge reading them, the merge
jobs read them through the merge YAML (and fail if the plan's and the engine's ids disagree:
``--model-id``), every new model is evaluated by lm-eval and reaches the leaderboard.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mergesweep.plan import build_plan
from test_pipeline_e2e import copy_of, planned_jobs, run, snakemake  # noqa: F401  (run: the fixture)

pytestmark = pytest.mark.slow

DATA_MERGES = [
    {"method": "regmean", "params": {"reduce_non_diagonal_ratio": [0.5]}},
    {"method": "fisher", "params": {"fisher_target": "labels"}},
    {"method": "regmean_plus_plus", "params": {}},
    {"method": "localize_stitch", "params": {"dataless": False, "num_train_epochs": 2}},
    {"method": "pleas", "experts": ["tiny-arithmetic", "tiny-reverse"], "params": {}},
]


def extend_and_run(tiny_workdir: Path, dst: Path) -> dict:
    """A copy of the finished tiny run with DATA_MERGES added: the dry run's job counts, then the
    run itself. tests/conftest.py starts this in the background as soon as the shared tiny run is
    done (beside the SLURM fault sweep, which mostly waits); the test below asserts on it."""
    work = copy_of({"workdir": tiny_workdir}, dst)
    cfg_path = work / "config/presets/tiny.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["merges"] += DATA_MERGES
    cfg["stats"] = {"examples": 16, "max_length": 48, "batch_size": 8, "device": "cpu"}
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    jobs = planned_jobs(snakemake(work, cfg_path, "-n").stdout)
    proc = snakemake(work, cfg_path, check=False)
    return {"work": work, "cfg": cfg, "cfg_path": cfg_path, "jobs": jobs, "rc": proc.returncode,
            "log": proc.stderr[-5000:]}


@pytest.fixture(scope="module")
def data_run(run, tmp_path_factory):
    from conftest import early_data_run

    got = early_data_run()
    return got if got is not None else extend_and_run(run["workdir"], tmp_path_factory.mktemp("data-run"))


def test_data_aware_methods_run_through_the_tiny_pipeline(data_run):
    work, cfg, cfg_path, jobs = data_run["work"], data_run["cfg"], data_run["cfg_path"], data_run["jobs"]
    plan = build_plan(cfg)
    new = [m for m in plan.merges.values() if m.method not in {"linear", "task_arithmetic"}]
    assert len(new) == 5
    # two kinds x three experts, whatever the number of merges reading them; nothing upstream redone
    assert jobs.get("stats") == 6 and jobs.get("merge") == 5 and jobs.get("evaluate_merged") == 5, jobs
    assert not {"finetune", "pretrain_base", "make_data", "evaluate"} & set(jobs), jobs
    assert data_run["rc"] == 0, data_run["log"]

    # `mergesweep plan` announced their disk: within 2 % of what the stats stage wrote
    from mergesweep.resources import Resources

    written = sum((work / j.dir / "stats.safetensors").stat().st_size for j in plan.stats_jobs.values()) / 1e9
    announced = sum(Resources(plan).stats_gb(j.kind) for j in plan.stats_jobs.values())
    assert announced == pytest.approx(written, rel=0.02)
    # the statistics are of the experts the plan names, with the plan's ids
    for sid, job in plan.stats_jobs.items():
        rec = json.loads((work / job.dir / "stats.json").read_text())
        assert rec["stats_id"] == sid and rec["model_uid"] == plan.experts[job.model].uid
        assert rec["kinds"] == [job.kind]
    for m in new:
        rec = json.loads((work / m.dir / "mergesweep.json").read_text())
        assert rec["model_id"] == m.model_id and rec["method"] == m.method
        if m.stats:
            got = {e: v["uid"] for e, v in rec["data_statistics"].items()}
            assert got == {e: jobs[0].stats_id for e, jobs in zip(m.experts, m.stats)}
        else:
            got = {e: v["uid"] for e, v in rec["calibration"].items()}
            assert got == {e: c.uid for e, c in zip(m.experts, m.calibration)}
    pleas = next(m for m in new if m.method == "pleas")
    assert json.loads((work / pleas.dir / "mergesweep.json").read_text())["method_info"]

    # every new model scored on every suite, and on the leaderboard
    s = pd.read_parquet(work / "results/tables/scores.parquet")
    for m in new:
        got = s[(s.model_id == m.model_id) & (s.split == "test")]
        assert set(got.suite) == set(plan.suites) and (got.status == "ok").all(), m.model_id
    board = pd.read_parquet(work / "results/tables/leaderboard.parquet")
    assert {"regmean", "fisher", "regmean_plus_plus", "localize_stitch", "pleas"} <= set(board["method"])
    assert "regmean" in (work / "results/leaderboard.md").read_text()

    # one more RegMean point reads the same statistics: no stats job
    cfg["merges"][len(cfg["merges"]) - len(DATA_MERGES)]["params"]["reduce_non_diagonal_ratio"].append(0.0)
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    jobs = planned_jobs(snakemake(work, cfg_path, "-n").stdout)
    assert jobs.get("merge") == 1 and "stats" not in jobs, jobs
