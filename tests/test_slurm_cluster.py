"""Stopping Snakemake, and GPUs asked for = GPUs used, on the real single-node SLURM cluster
(.ci/slurm/up.sh).

Throwaway workflows from ``slurm_cluster`` run through ``profiles/slurm``: Ctrl-C cancels what was
submitted; a Snakemake killed with SIGKILL and started again cancels the dead run's orphans and
finishes without redoing finished jobs. Through the installed profile (``snakemake --profile
slurm``): a GPU stage gets and sees exactly its GPU, a CPU stage none, and CPUs = threads (sacct).
"""

from __future__ import annotations

import datetime as dt
import signal

import pytest

import slurm_cluster as sc
from conftest import in_background

slurm = sc.make_fixture()

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]


@in_background(after="fault_sweep")  # mostly waiting on SLURM, beside the other tests
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


@in_background(after="fault_sweep")  # mostly waiting on SLURM, beside the other tests
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


def _tres(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(",") if "=" in item)


def _seen(path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def test_gpus_asked_for_are_gpus_used(slurm, tmp_path, monkeypatch):
    """A stage asking one GPU gets exactly that (sacct) and sees it (CUDA_VISIBLE_DEVICES); a stage
    asking none gets none and sees none, even with a CUDA_VISIBLE_DEVICES leaking from the
    submitting shell; CPUs = threads. Run as a cluster user types it, from the repository root,
    through the installed profile: ``mergesweep profile install slurm`` then
    ``snakemake --profile slurm``."""
    from mergesweep.profile import install

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    path, status = install("slurm", partition="debug", account="ci")
    assert status == "installed" and path.is_relative_to(tmp_path / "xdg")

    since = dt.datetime.now() - dt.timedelta(seconds=1)
    workdir = sc.write_workflow(tmp_path / "wf", sc.GPU_CPU)
    proc = sc.run_snakemake(workdir, profile="slurm", cwd=sc.REPO, timeout=240,
                            extra_env={"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "CUDA_VISIBLE_DEVICES": "7"})
    assert proc.returncode == 0, proc.log[-4000:]
    assert "Using profiles slurm" in proc.log

    def done():
        rows = sc.Cluster.sacct(since, workdir=workdir)
        return rows if sorted(r["State"] for r in rows) == ["COMPLETED", "COMPLETED"] else None

    rows = sc.wait_for(done, 30, "both jobs COMPLETED in sacct")
    [gpu] = sc.by_name(rows, "smk-gpu_stage")
    [cpu] = sc.by_name(rows, "smk-cpu_stage")
    for row in (gpu, cpu):
        assert (row["Partition"], row["Account"]) == ("debug", "ci"), row  # from the installed profile
    assert _tres(gpu["ReqTRES"]).get("gres/gpu") == "1" and _tres(gpu["AllocTRES"]).get("gres/gpu") == "1", gpu
    assert _tres(gpu["AllocTRES"])["cpu"] == "1", gpu
    assert "gres/gpu" not in _tres(cpu["ReqTRES"]) and "gres/gpu" not in _tres(cpu["AllocTRES"]), cpu
    assert _tres(cpu["AllocTRES"])["cpu"] == "2", cpu  # threads: 2

    seen_gpu, seen_cpu = _seen(workdir / "out" / "gpu.txt"), _seen(workdir / "out" / "cpu.txt")
    assert seen_gpu["SLURM_JOB_ID"] == gpu["JobIDRaw"] and seen_cpu["SLURM_JOB_ID"] == cpu["JobIDRaw"]
    assert seen_gpu["CUDA_VISIBLE_DEVICES"] in {"0", "1", "2", "3"}, seen_gpu  # SLURM's, not the leaked 7
    # no GPU visible to a CPU stage: the executor sets it empty for jobs that asked none (this
    # SLURM would unset it; one without a GPU plugin on the node would pass the shell's 7 on)
    assert seen_cpu["CUDA_VISIBLE_DEVICES"] == "", seen_cpu
    assert (seen_gpu["SLURM_CPUS_PER_TASK"], seen_cpu["SLURM_CPUS_PER_TASK"]) == ("1", "2")
