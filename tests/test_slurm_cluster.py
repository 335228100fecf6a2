"""Stopping Snakemake on the real single-node SLURM cluster (.ci/slurm/up.sh).

Throwaway workflows from ``slurm_cluster`` run through ``profiles/slurm``: Ctrl-C cancels what was
submitted; a Snakemake killed with SIGKILL and started again cancels the dead run's orphans and
finishes without redoing finished jobs.
"""

from __future__ import annotations

import datetime as dt
import signal

import pytest

import slurm_cluster as sc

slurm = sc.make_fixture()

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]


def test_interrupting_snakemake_cancels_its_jobs(slurm, tmp_path):
    since = dt.datetime.now() - dt.timedelta(seconds=1)
    workdir = sc.write_workflow(tmp_path, sc.SLEEPERS)
    with sc.Background(workdir) as smk:
        sc.wait_for(lambda: len([r for r in sc.Cluster.squeue("smk-sleeper", workdir) if r["state"] == "RUNNING"]) == 3
                    and len(sc.runs(workdir)) == 3, 120, "three sleepers to run")
        smk.signal(signal.SIGINT)  # Ctrl-C
        rc = smk.wait(timeout=180)  # cancelling every job takes longer on a loaded machine
    assert rc != 0
    assert "cancelling 3 job(s)" in smk.log, smk.log[-3000:]
    sc.wait_for(lambda: not sc.Cluster.squeue("smk-sleeper", workdir), 30, "the sleepers to leave the queue")
    rows = sc.Cluster.sacct(since, workdir=workdir)
    sc.wait_for(lambda: [r["State"].split()[0] for r in sc.Cluster.sacct(since, workdir=workdir)] == ["CANCELLED"] * 3,
                30, f"three CANCELLED sleepers in sacct ({rows})")
    assert not list((workdir / "out").glob("z*.txt"))


def test_killed_snakemake_restarts_without_redoing_finished_jobs(slurm, tmp_path):
    since = dt.datetime.now() - dt.timedelta(seconds=1)
    workdir = sc.write_workflow(tmp_path, sc.CHAIN)
    smk = sc.Background(workdir)
    # kill -9 Snakemake once the three quick steps are done and the three slow ones run
    sc.wait_for(lambda: smk.log.count("Finished jobid") >= 3, 150, "three quick steps")
    smk.kill_hard()
    running = sc.Cluster.squeue("smk-step", workdir)
    assert running, "the slow steps should still be in SLURM after Snakemake died"
    partial = [p for p in (workdir / "out").glob("s*.txt") if "DONE" not in p.read_text()]
    assert partial, "slow steps should have written partial outputs"

    # started again: --unlock (Snakemake's lock survives kill -9), then the same command
    assert sc.run_snakemake(workdir, "--unlock").returncode == 0
    proc = sc.run_snakemake(workdir)
    assert proc.returncode == 0, proc.log[-4000:]
    # jobs of the dead run still in SLURM were cancelled (their outputs were incomplete) ...
    assert "left queued/running by a previous Snakemake run" in proc.log, proc.log[-3000:]
    states = {r["JobID"]: r["State"].split()[0] for r in sc.Cluster.sacct(since, workdir=workdir)}
    assert {running_job["id"] for running_job in running} <= {j for j, s in states.items() if s == "CANCELLED"}
    # ... and recomputed; finished ones were not redone
    counts: dict[str, int] = {}
    for name, *_ in sc.runs(workdir):
        counts[name] = counts.get(name, 0) + 1
    finished_before = {f"s{i}" for i in range(6)} - {p.stem for p in partial}
    assert all(counts[s] == 1 for s in finished_before), counts
    assert all(counts[p.stem] == 2 for p in partial), counts
    assert all((workdir / "out" / f"s{i}.txt").read_text().endswith("DONE\n") for i in range(6))
