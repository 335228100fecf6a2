"""The tiny preset, end to end, through ``snakemake --profile profiles/slurm`` on the real cluster.

A temporary copy of the workflow (Snakefile, workflow/, config/) runs the whole pipeline: data,
pretraining, fine-tuning, merges, evaluations, tables. While it runs the test

* cancels a running ``evaluate`` job with ``scancel`` (Snakemake must retry it), and
* drains the node while jobs wait, then resumes it (the waiting jobs must just wait).

Then it checks the final tables and that ``sacct`` saw every non-local job.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time

import pytest

import slurm_cluster as sc

slurm = sc.make_fixture()

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(1500)]

PRESET = sc.REPO / "config" / "presets" / "tiny.yaml"
#: 2 real cores: one thread per job here (the profile's set-threads is for real clusters)
THREADS = ["--set-threads", "pretrain_base=1", "finetune=1", "merge=1", "evaluate=1", "evaluate_merged=1"]
REMOTE_RULES = {"make_data", "pretrain_base", "finetune", "merge", "evaluate", "evaluate_merged", "aggregate",
                "leaderboard"}
EVALUATE = {"smk-evaluate", "smk-evaluate_merged"}
LOCAL_RULES = {"merge_yaml", "provenance", "all"}


@pytest.fixture(scope="module")
def tiny_run(slurm, tmp_path_factory):
    if not PRESET.exists():
        pytest.skip(f"{PRESET.relative_to(sc.REPO)} does not exist yet")
    pytest.importorskip("mergesweep.plan", reason="the mergesweep package (workflow library) is not importable")
    workdir = tmp_path_factory.mktemp("tiny")
    shutil.copy(sc.REPO / "Snakefile", workdir / "Snakefile")
    for sub in ("workflow", "config"):
        shutil.copytree(sc.REPO / sub, workdir / sub)
    since = dt.datetime.now() - dt.timedelta(seconds=1)
    events: dict = {}
    started = time.time()
    with sc.Background(workdir, "--configfile", "config/presets/tiny.yaml", *THREADS) as smk:
        # scancel an evaluation once its `mergesweep evaluate` is under way (its log exists)
        def running_eval():
            for row in [*sc.Cluster.squeue("smk-evaluate", workdir), *sc.Cluster.squeue("smk-evaluate_merged", workdir)]:
                if row["state"] == "RUNNING" and list((workdir / "results" / "logs" / "evaluate").glob("*/*.log")):
                    return row["id"]
            return None

        victim = sc.wait_for(running_eval, 900, "a running evaluate job")
        time.sleep(3)
        sc.sh("scancel", victim)
        events["victim"] = victim
        # drain the node while jobs wait (the retry, further evaluations), then resume
        slurm.drain("mergesweep e2e test")
        try:
            pending = sc.wait_for(
                lambda: [r for r in sc.Cluster.squeue("smk-", workdir) if r["state"] == "PENDING"], 120,
                "a job waiting on the drained node")
            time.sleep(5)
            events["drained_state"] = slurm.node_state()
            events["pending_while_drained"] = pending
            events["still_pending"] = [r for r in sc.Cluster.squeue("smk-", workdir) if r["state"] == "PENDING"]
            events["snakemake_alive_while_drained"] = smk.proc.poll() is None
        finally:
            slurm.resume()
        rc = smk.wait(timeout=1200)
        log = smk.log
    return {"workdir": workdir, "rc": rc, "log": log, "events": events, "seconds": time.time() - started,
            "sacct": sc.Cluster.sacct(since, duplicates=True, workdir=workdir)}


def test_tiny_preset_completes_with_complete_tables(tiny_run):
    assert tiny_run["rc"] == 0, tiny_run["log"][-5000:]
    import pandas as pd

    workdir = tiny_run["workdir"]
    scores = pd.read_parquet(workdir / "results" / "tables" / "scores.parquet")
    evals = sorted((workdir / "results" / "evals").glob("*/*.json"))
    pairs = {(p.parent.name, p.stem) for p in evals}
    assert len(pairs) == 28, pairs  # (base + 3 experts + 3 merges) x 4 suites
    assert set(zip(scores["model_id"], scores["suite"])) == pairs
    assert set(scores["role"]) == {"base", "expert", "merged"}
    assert all(json.loads(p.read_text())["status"] == "ok" for p in evals)
    assert (workdir / "results" / "leaderboard.md").stat().st_size > 0


def test_every_job_ran_through_slurm(tiny_run):
    rows = tiny_run["sacct"]
    names = {r["JobName"].removeprefix("smk-") for r in rows}
    assert names == REMOTE_RULES, names
    local = {line.split()[-1].rstrip(":") for line in tiny_run["log"].splitlines() if line.startswith("localrule ")}
    assert local <= LOCAL_RULES, local
    completed = [r for r in rows if r["State"] == "COMPLETED"]
    assert sum(r["JobName"] in EVALUATE for r in completed) == 28
    assert sum(r["JobName"] == "smk-finetune" for r in completed) == 3
    assert sum(r["JobName"] == "smk-merge" for r in completed) == 3
    # GPU stages got a (fake) GPU, CPU stages none (profiles/slurm set-resources)
    for r in completed:
        has_gpu = "gres/gpu=1" in r["AllocTRES"]
        assert has_gpu == (r["JobName"] in EVALUATE | {"smk-finetune", "smk-pretrain_base"}), r
    # jobs that became ready together went out as arrays
    assert any("_" in r["JobID"] for r in rows if r["JobName"] in EVALUATE)
    assert list((tiny_run["workdir"] / "results" / "logs" / "slurm").glob("smk-evaluate*/*/*_log.out"))


def test_scancelled_evaluation_is_retried(tiny_run):
    victim = tiny_run["events"]["victim"]
    states = {r["JobID"]: r["State"].split()[0] for r in tiny_run["sacct"]}
    assert states.get(victim) == "CANCELLED", states
    assert "Trying to restart job" in tiny_run["log"]


def test_drained_node_holds_jobs_until_resumed(tiny_run):
    ev = tiny_run["events"]
    assert ev["drained_state"].startswith("drain"), ev
    assert ev["pending_while_drained"] and ev["still_pending"], ev
    assert ev["snakemake_alive_while_drained"]
    assert tiny_run["rc"] == 0
