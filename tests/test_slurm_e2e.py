"""The tiny preset, end to end, through ``snakemake --profile profiles/slurm`` on the real cluster.

This is the session's shared tiny run (``tiny_run`` in tests/conftest.py, run by
tests/slurm_e2e_run.py when the cluster is available): data, pretraining, fine-tuning, merges,
evaluations, tables. While it runs, a running evaluation is cancelled with ``scancel`` (Snakemake
must retry it) and the node is drained while jobs wait, then resumed (the waiting jobs must just
wait). These tests check the events and that ``sacct`` saw every non-local job;
tests/test_pipeline_e2e.py checks the results of the same run.
"""

from __future__ import annotations

import json

import pytest

import slurm_cluster as sc

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(1500)]

REMOTE_RULES = {"make_data", "pretrain_base", "finetune", "merge", "evaluate", "evaluate_merged", "aggregate",
                "leaderboard"}
LOCAL_RULES = {"merge_yaml", "provenance", "evaluation_spec", "evaluation_models", "all"}
EVALUATE = {"smk-evaluate", "smk-evaluate_merged"}


@pytest.fixture(scope="module")
def slurm_run(tiny_run):
    reason = sc.skip_reason()
    if reason or tiny_run["via"] != "slurm":
        pytest.skip(reason or "the shared tiny run did not go through SLURM")
    return tiny_run


def test_tiny_preset_completes_with_complete_tables(slurm_run):
    assert slurm_run["rc"] == 0, slurm_run["log"][-5000:]
    import pandas as pd

    workdir = slurm_run["workdir"]
    scores = pd.read_parquet(workdir / "results" / "tables" / "scores.parquet")
    evals = sorted((workdir / "results" / "evals").glob("*/*.json"))
    pairs = {(p.parent.name, p.stem) for p in evals}
    assert len(pairs) == 28, pairs  # (base + 3 experts + 3 merges) x 4 suites
    assert set(zip(scores["model_id"], scores["suite"])) == pairs
    assert set(scores["role"]) == {"base", "expert", "merged"}
    assert all(json.loads(p.read_text())["status"] == "ok" for p in evals)
    assert (workdir / "results" / "leaderboard.md").stat().st_size > 0


def test_every_job_ran_through_slurm(slurm_run):
    rows = slurm_run["sacct"]
    names = {r["JobName"].removeprefix("smk-") for r in rows}
    assert names == REMOTE_RULES, names
    local = {line.split()[-1].rstrip(":") for line in slurm_run["log"].splitlines() if line.startswith("localrule ")}
    assert local <= LOCAL_RULES, local
    completed = [r for r in rows if r["State"] == "COMPLETED"]
    assert sum(r["JobName"] in EVALUATE for r in completed) == 7  # one job per model, every suite in it
    assert sum(r["JobName"] == "smk-finetune" for r in completed) == 3
    assert sum(r["JobName"] == "smk-merge" for r in completed) == 3
    # each job got the GPUs its stage uses (the config's devices: auto -> training and evaluation
    # ask for one, the rest none; mergesweep.resources) and the CPUs it runs on (its threads)
    import yaml

    from mergesweep.plan import build_plan
    from mergesweep.resources import STAGES, Resources

    res = Resources(build_plan(yaml.safe_load(slurm_run["config"].read_text())))
    stage_of = {rule: stage for stage, rules in STAGES.items() for rule in rules}
    expected_gpu = {f"smk-{rule}": res.gpu(stage) for rule, stage in stage_of.items()}
    assert {expected_gpu[n] for n in EVALUATE | {"smk-finetune", "smk-pretrain_base"}} == {1}
    assert {expected_gpu[n] for n in ("smk-merge", "smk-make_data", "smk-aggregate", "smk-leaderboard")} == {0}
    for r in completed:
        has_gpu = "gres/gpu=1" in r["AllocTRES"]
        assert has_gpu == bool(expected_gpu[r["JobName"]]), r
        assert "cpu=1," in r["AllocTRES"] + ",", r  # the e2e run sets one thread per job (2 real cores)
    # jobs that became ready together went out as arrays
    assert any("_" in r["JobID"] for r in rows)
    assert list((slurm_run["workdir"] / "results" / "logs" / "slurm").glob("smk-evaluate*/*/*_log.out"))


def test_scancelled_evaluation_is_retried(slurm_run):
    victim = slurm_run["events"]["victim"]
    states = {r["JobID"]: r["State"].split()[0] for r in slurm_run["sacct"]}
    assert states.get(victim) == "CANCELLED", states
    assert "Trying to restart job" in slurm_run["log"]


def test_drained_node_holds_jobs_until_resumed(slurm_run):
    ev = slurm_run["events"]
    assert ev["drained_state"].startswith("drain"), ev
    assert ev["pending_while_drained"] and ev["still_pending"], ev
    assert ev["snakemake_alive_while_drained"]
    assert slurm_run["rc"] == 0
