"""The shared tiny run (tests/conftest.py ``tiny_run``) through the real SLURM test cluster.

``snakemake --profile profiles/slurm`` runs the whole tiny preset. While it runs, a running
evaluation is cancelled with ``scancel`` (Snakemake must retry it) and the node is drained while
jobs wait, then resumed (the waiting jobs must just wait). tests/test_slurm_e2e.py asserts on
the events and on ``sacct``; tests/test_pipeline_e2e.py on the results.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import slurm_cluster as sc

#: 2 real cores: one thread per job here (the rules take the config's threads; this overrides them)
THREADS = ["--set-threads", "pretrain_base=1", "finetune=1", "merge=1", "evaluate=1", "evaluate_merged=1"]


def run_through_slurm(workdir: Path, config: Path, slurm) -> dict:
    since = dt.datetime.now() - dt.timedelta(seconds=1)
    events: dict = {}
    # keep every merged model (the profile keeps the selected ones): the e2e tests compare them
    with sc.Background(workdir, *THREADS, "--configfile", str(config), "--config", "keep_models=all") as smk:
        # scancel an evaluation once its `mergesweep evaluate` is under way (its log exists)
        def running_eval():
            for row in sc.Cluster.squeue("smk-evaluate", workdir):
                if row["state"] == "RUNNING" and list((workdir / "results" / "logs" / "evaluate").glob("*.log")):
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
    return {"via": "slurm", "rc": rc, "log": log, "events": events,
            "sacct": sc.Cluster.sacct(since, duplicates=True, workdir=workdir)}
