"""Faults clusters are known for, injected into one running sweep on the real SLURM cluster.

One Snakemake run of ``slurm_cluster.FAULTS`` through ``profiles/slurm`` (``--submitit-account
ci``). Besides plain jobs (eight that become one array, a GPU job, a job failing once), the driver
(the ``fault_sweep`` fixture) injects, in order:

* ``scancel`` of a running job (``victim``): Snakemake sees CANCELLED and retries it;
* submitit's checkpoint signal (``scancel --signal=USR2``, as sent on preemption) to a running job
  (``preempt_sig``): the job stops its command and requeues itself; same Snakemake attempt;
* real SLURM preemption (``preempt_slurm``, holding all four fake GPUs, is preempted by a job in the
  higher-priority ``urgent`` partition): SLURM requeues it (PreemptMode=REQUEUE);
* the node drained while that requeued job waits, then resumed;
* meanwhile ``timeout`` needs ~62 s but asks for ``runtime=attempt`` minutes: attempt 1 hits its
  time limit, Snakemake retries with 2 minutes.

Every producer writes a partial output first; every consumer (``check``) fails if it ever reads one.
"""

from __future__ import annotations

import datetime as dt
import signal
import time
from pathlib import Path

import pytest

import slurm_cluster as sc

slurm = sc.make_fixture()

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(480)]


def _running(name: str) -> str | None:
    for row in sc.Cluster.squeue():  # names are unique to this workflow
        if row["name"] == f"smk-{name}" and row["state"] == "RUNNING":
            return row["id"]
    return None


def _state(job_id: str) -> dict | None:
    for row in sc.Cluster.squeue():
        if row["id"] == job_id:
            return row
    return None


@pytest.fixture(scope="module")
def fault_sweep(slurm, tmp_path_factory):
    """The sweep of :func:`run_fault_sweep`: started by conftest in the background right after the
    shared tiny run when this module is collected (it mostly waits on SLURM), else run here."""
    from conftest import early_fault_sweep

    early = early_fault_sweep()
    if early is not None:
        return early
    return run_fault_sweep(slurm, tmp_path_factory.mktemp("faults"))


def run_fault_sweep(slurm, tmp: Path) -> dict:
    """Run sc.FAULTS through the profile in ``tmp``, injecting the faults as jobs reach them."""
    workdir = sc.write_workflow(tmp, sc.FAULTS)
    since = dt.datetime.now() - dt.timedelta(seconds=1)
    events: dict = {}
    with sc.Background(workdir, "--submitit-account", "ci") as smk:
        def partial(name):
            return (workdir / "out" / f"{name}.txt").exists() and _running(name)

        # each target gets its fault as soon as it runs and has written half of its output
        step = {"victim": 0, "preempt_sig": 0, "preempt_slurm": 0}
        deadline = time.time() + 300
        while any(v >= 0 for v in step.values()):
            assert time.time() < deadline, f"fault injection stuck at {step}\n{smk.log[-3000:]}"
            assert smk.proc.poll() is None, smk.log[-3000:]
            # 1. scancel a running job
            if step["victim"] == 0 and (job := partial("victim")):
                sc.sh("scancel", job)
                events["victim"], step["victim"] = job, -1
            # 2. submitit's checkpoint signal (USR2) = preemption notice: the job requeues itself
            if step["preempt_sig"] == 0 and (job := partial("preempt_sig")):
                sc.sh("scancel", "--signal=USR2", job)
                events["preempt_sig"], step["preempt_sig"] = job, 1
            elif step["preempt_sig"] == 1 and (_state(events["preempt_sig"]) or {}).get("state") == "PENDING":
                sc.Cluster.release(events["preempt_sig"])
                step["preempt_sig"] = -1
            # 3. real preemption by the higher-priority partition, 4. then the node drained
            if step["preempt_slurm"] == 0 and (job := partial("preempt_slurm")):
                events["urgent"] = sc.sh(
                    "sbatch", "--parsable", "-p", "urgent", "--gpus=4", "-c", "1", "--mem=100M",
                    "-J", "urgent-preemptor", "-o", "/dev/null", "--wrap", "sleep 3").strip()
                events["preempt_slurm"], step["preempt_slurm"] = job, 1
            elif step["preempt_slurm"] == 1 and (_state(events["preempt_slurm"]) or {}).get("state") == "PENDING":
                slurm.drain("mergesweep fault test")
                sc.Cluster.release(events["preempt_slurm"])
                drained_at, step["preempt_slurm"] = time.time(), 2
            elif step["preempt_slurm"] == 2 and time.time() - drained_at > 6:
                events["drained_state"] = slurm.node_state()
                events["pending_while_drained"] = _state(events["preempt_slurm"])
                events["snakemake_alive_while_drained"] = smk.proc.poll() is None
                slurm.resume()
                step["preempt_slurm"] = -1
            time.sleep(0.5)

        rc = smk.wait(timeout=360)
        log = smk.log
    return {"workdir": workdir, "rc": rc, "log": log, "since": since, "events": events,
            "sacct": sc.Cluster.sacct(since, duplicates=True, workdir=workdir)}


def _output(sweep, name):
    return (sweep["workdir"] / "out" / f"{name}.txt").read_text()


def test_sweep_completes_and_nothing_partial_is_consumed(fault_sweep):
    assert fault_sweep["rc"] == 0, fault_sweep["log"][-4000:]
    summary = (fault_sweep["workdir"] / "out" / "summary.txt").read_text()
    assert summary.count("DONE") == 7
    assert (fault_sweep["workdir"] / "out" / "sum.txt").read_text().strip() == str(sum(range(8)))
    runs = sc.runs(fault_sweep["workdir"])
    assert not [r for r in runs if r[0] == "PARTIAL-CONSUMED"], runs
    # every job went through SLURM: only the target rule `all` ran on the submit host
    rules = [line.split()[-1].rstrip(":") for line in fault_sweep["log"].splitlines()
             if line.startswith("localrule ")]
    assert set(rules) <= {"all"}, rules
    names = {r["JobName"] for r in fault_sweep["sacct"]}
    assert {"smk-a", "smk-sum", "smk-flaky", "smk-gpu", "smk-gen", "smk-victim", "smk-preempt_sig", "smk-preempt_slurm", "smk-timeout",
            "smk-check", "smk-summary"} <= names


def test_scancelled_job_is_retried(fault_sweep):
    rows = sc.by_name(fault_sweep["sacct"], "smk-victim")
    states = [(r["JobID"], r["State"].split()[0]) for r in rows]
    assert (fault_sweep["events"]["victim"], "CANCELLED") in states, states
    assert [s for _, s in states].count("COMPLETED") == 1, states
    assert "attempt=2" in _output(fault_sweep, "victim")


def test_checkpoint_signal_requeues_same_attempt(fault_sweep):
    job = fault_sweep["events"]["preempt_sig"]
    rows = [r for r in sc.by_name(fault_sweep["sacct"], "smk-preempt_sig") if r["JobID"] == job]
    states = [r["State"].split()[0] for r in rows]
    assert "REQUEUED" in states and states[-1] == "COMPLETED", states
    out = _output(fault_sweep, "preempt_sig")
    assert "attempt=1" in out and "restarts=1" in out, out  # requeued by submitit, not retried


def test_preempted_job_is_requeued_by_slurm(fault_sweep):
    job = fault_sweep["events"]["preempt_slurm"]
    rows = [r for r in sc.by_name(fault_sweep["sacct"], "smk-preempt_slurm") if r["JobID"] == job]
    states = [r["State"].split()[0] for r in rows]
    assert "PREEMPTED" in states and states[-1] == "COMPLETED", states
    out = _output(fault_sweep, "preempt_slurm")
    assert "attempt=1" in out, out
    # it held both fake GPUs: gres.conf makes SLURM set CUDA_VISIBLE_DEVICES
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3" in out, out
    assert any("gres/gpu=4" in r["AllocTRES"] for r in rows), rows


def test_drained_node_holds_jobs_until_resumed(fault_sweep):
    ev = fault_sweep["events"]
    assert ev["drained_state"].startswith("drain"), ev
    assert ev["pending_while_drained"] and ev["pending_while_drained"]["state"] == "PENDING", ev
    assert ev["snakemake_alive_while_drained"]
    assert fault_sweep["rc"] == 0


def test_timed_out_job_is_retried_with_more_time(fault_sweep):
    rows = sc.by_name(fault_sweep["sacct"], "smk-timeout")
    by_state = {r["State"].split()[0]: r for r in rows}
    # the first attempt ends at its 1-minute limit: sacct says TIMEOUT, or FAILED when the job's
    # command exits on SLURM's SIGTERM before the controller records the timeout (seen on a loaded
    # machine); either way Snakemake must retry it with twice the time
    first = by_state.get("TIMEOUT") or by_state.get("FAILED")
    assert first is not None and "COMPLETED" in by_state, rows
    assert first["Timelimit"] == "00:01:00", rows
    assert by_state["COMPLETED"]["Timelimit"] == "00:02:00", rows
    assert "attempt=2" in _output(fault_sweep, "timeout")


def test_ready_jobs_become_one_array_with_account_gpus_and_scaled_retries(fault_sweep):
    rows = fault_sweep["sacct"]
    # the eight `a` jobs were ready together: one array of eight tasks, one sbatch
    a_rows = sc.by_name(rows, "smk-a")
    assert len(a_rows) == 8 and len({r["JobID"].split("_")[0] for r in a_rows}) == 1, a_rows
    assert all("_" in r["JobID"] and r["State"] == "COMPLETED" for r in a_rows), a_rows
    assert {r["Account"] for r in rows} == {"ci"}  # --submitit-account
    # a GPU request is scheduled on a (fake) GPU and CUDA_VISIBLE_DEVICES is set
    gpu = sc.by_name(rows, "smk-gpu")
    assert "gres/gpu=1" in gpu[0]["AllocTRES"], gpu
    assert _output(fault_sweep, "gpu").strip() in {f"CUDA_VISIBLE_DEVICES={i}" for i in range(4)}
    # flaky failed once, then got twice the memory and time (attempt-dependent resources)
    flaky = sorted(sc.by_name(rows, "smk-flaky"), key=lambda r: int(r["JobIDRaw"]))
    assert [r["State"] for r in flaky] == ["FAILED", "COMPLETED"], flaky
    assert [r["ReqMem"] for r in flaky] == ["300M", "600M"], flaky
    assert [r["Timelimit"] for r in flaky] == ["00:02:00", "00:04:00"], flaky
    # the profile's defaults where a rule sets nothing: 30 min x attempt, 4000 MB x attempt
    summary = sc.by_name(rows, "smk-summary")[0]
    assert (summary["Timelimit"], summary["ReqMem"]) == ("00:30:00", "4000M"), summary
    # submitit's files under the profile's folder: results/logs/slurm/<rule>/<jobid>/
    assert list((fault_sweep["workdir"] / "results" / "logs" / "slurm" / "smk-a").glob("*_*/*_log.out"))
    registry = fault_sweep["workdir"] / ".snakemake" / "submitit" / "active_jobs.json"
    assert not registry.exists()  # removed at a clean shutdown
