"""The submitit executor without a cluster: resource mapping, array batching (against fake
sbatch/sacct/squeue commands), submitit's checkpoint decisions, the orphan registry, and a whole
Snakemake run on the workstation path (submitit's LocalExecutor)."""

from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import slurm_cluster as sc
from mergesweep.executor.backend import JobRegistry, SubmititBackend, parse_sacct
from mergesweep.executor.command import CommandFailed, ShellCommand
from mergesweep.executor.request import ExecutorError, JobRequest, parse_sbatch_options


# -- resources -> sbatch ----------------------------------------------------------------------------
def test_request_maps_snakemake_resources_to_sbatch():
    req = JobRequest.from_resources(
        "smk-evaluate",
        {"runtime": 90, "mem_mb": 16000, "gpu": 1, "gpu_model": "a100", "slurm_partition": "gpu",
         "slurm_extra": "--reservation=r1 --exclusive", "tmpdir": "/tmp", "disk_mb": 1000},
        threads=4, defaults={"slurm_account": "proj", "slurm_partition": "cpu"})
    params = req.slurm_parameters()
    assert params["time"] == 90 and params["mem"] == "16000M" and params["cpus_per_task"] == 4
    assert params["gpus_per_node"] == "a100:1"
    assert params["partition"] == "gpu" and params["account"] == "proj"  # rule wins, default fills
    assert params["additional_parameters"] == {"reservation": "r1", "exclusive": True}
    assert req.local_parameters() == {"timeout_min": 90, "gpus_per_node": 1}


def test_request_defaults_and_units():
    req = JobRequest.from_resources("smk-x", {"runtime": 0.5, "mem_mb_per_cpu": 1000, "mem_mb": 5},
                                    threads=1)
    params = req.slurm_parameters()
    assert params["time"] == 1  # minutes, rounded up, at least one
    assert params["mem_per_cpu"] == "1000M" and "mem" not in params
    assert "gpus_per_node" not in params
    assert JobRequest.from_resources("smk-x", {}).time_min == 60


def test_equal_requests_share_an_array():
    a = JobRequest.from_resources("smk-merge", {"runtime": 10, "mem_mb": 100})
    b = JobRequest.from_resources("smk-merge", {"runtime": 10, "mem_mb": 100})
    c = JobRequest.from_resources("smk-merge", {"runtime": 20, "mem_mb": 100})
    assert a.signature() == b.signature() and hash(a) == hash(b)
    assert a.signature() != c.signature()


@pytest.mark.parametrize("resources, message", [
    ({"mem_mb": "lots"}, "resources.mem_mb of rule 'smk-x' must be a number"),
    ({"gpu": 1, "gres": "gpu:2"}, "sets both resources.gres"),
    ({"slurm_extra": "--array=0-3"}, "--array is managed by the executor"),
    ({"slurm_extra": "-p gpu"}, "is not a long sbatch option"),
])
def test_bad_resources_name_the_resource(resources, message):
    with pytest.raises(ExecutorError, match=message.replace("(", r"\(").replace("[", r"\[")):
        JobRequest.from_resources("smk-x", resources)


def test_parse_sbatch_options():
    assert parse_sbatch_options("--qos=high --hint nomultithread --exclusive") == {
        "qos": "high", "hint": "nomultithread", "exclusive": True}
    assert parse_sbatch_options(None) == {}


# -- array batching against fake SLURM commands ----------------------------------------------------
@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch/srun/sacct/squeue/scancel stand-ins that log their calls; sbatch answers job ids."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    scripts = {
        "sbatch": f'n=$(cat {tmp_path}/n 2>/dev/null || echo 100); echo $((n+1)) > {tmp_path}/n\n'
                  f'cp "$1" {tmp_path}/script.$n; echo "sbatch $*" >> {calls}; echo "Submitted batch job $n"',
        "srun": "exit 0",
        "sacct": f'echo "sacct $*" >> {calls}; cat {tmp_path}/sacct.out 2>/dev/null || echo "JobID|State|NodeList"',
        "squeue": f'echo "squeue $*" >> {calls}; cat {tmp_path}/squeue.out 2>/dev/null || true',
        "scancel": f'echo "scancel $*" >> {calls}',
    }
    for name, body in scripts.items():
        path = bindir / name
        path.write_text("#!/bin/bash\n" + body + "\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return tmp_path


def _items(n, request, label="job"):
    return [(f"key{i}", f"echo {i}", request, f"{label} {i}") for i in range(n)]


def test_jobs_with_one_request_become_one_array(fake_slurm):
    backend = SubmititBackend(fake_slurm / "logs", cluster="slurm", array_max_size=4,
                              sbatch_extra="--qos=normal", setup=["module load cuda"])
    gpu = JobRequest.from_resources("smk-evaluate", {"gpu": 1, "runtime": 30, "mem_mb": 2000,
                                                     "slurm_partition": "gpu"})
    cpu = JobRequest.from_resources("smk-aggregate", {"runtime": 5})
    handles = backend.submit(_items(10, gpu) + _items(1, cpu, "agg"))
    assert [h.key for h in handles] == [f"key{i}" for i in range(10)] + ["key0"]
    calls = (fake_slurm / "calls").read_text().splitlines()
    assert len(calls) == 4  # 10 GPU jobs in arrays of <= 4 (4+4+2), the CPU job alone
    assert [h.job_id for h in handles[:5]] == ["100_0", "100_1", "100_2", "100_3", "101_0"]
    assert handles[-1].job_id == "103" and handles[-1].array_size == 1
    script = (fake_slurm / "script.100").read_text()
    for line in ("#SBATCH --array=0-3%4", "#SBATCH --gpus-per-node=1", "#SBATCH --time=30",
                 "#SBATCH --mem=2000M", "#SBATCH --partition=gpu", "#SBATCH --signal=USR2@90",
                 "#SBATCH --requeue", "#SBATCH --qos=normal", "#SBATCH --job-name=smk-evaluate",
                 "module load cuda"):
        assert line in script, (line, script)
    assert "wckey" not in script
    assert backend.submissions == 4


def test_poll_reads_sacct_once_and_trusts_squeue_over_stale_failures(fake_slurm):
    backend = SubmititBackend(fake_slurm / "logs", cluster="slurm")
    req = JobRequest.from_resources("smk-a", {"runtime": 5})
    handles = backend.submit(_items(3, req)) + backend.submit(_items(2, req))  # arrays 100 and 101
    (fake_slurm / "sacct.out").write_text(
        "100_0|RUNNING\n100_0.batch|RUNNING\n100_1|PREEMPTED\n100_2|CANCELLED by 0\n"
        "101_[0-1%1000]|PENDING\n")
    (fake_slurm / "squeue.out").write_text("100_0\n100_1\n")  # 100_1 was requeued after preemption
    status = backend.poll(handles)
    kinds = [status[id(h)].kind for h in handles]
    assert kinds == ["active", "active", "failed", "active", "active"]
    assert [status[id(h)].state for h in handles[3:]] == ["PENDING", "PENDING"]
    assert "CANCELLED" in status[id(handles[2])].message
    calls = (fake_slurm / "calls").read_text().splitlines()
    assert [c for c in calls if c.startswith("sacct")] == ["sacct -X -n -P -o JobID,State -j 100,101"]
    assert sum(c.startswith("squeue") for c in calls) == 1
    # a requeued job is asked about again at the next poll (no cached final state)
    (fake_slurm / "sacct.out").write_text("100_1|RUNNING\n")
    assert backend.poll(handles[1:2])[id(handles[1])].state == "RUNNING"
    backend.cancel(handles[:2])
    assert "scancel 100_0 100_1" in (fake_slurm / "calls").read_text()


def test_poll_keeps_the_last_state_while_sacct_fails(fake_slurm):
    backend = SubmititBackend(fake_slurm / "logs", cluster="slurm")
    [handle] = backend.submit(_items(1, JobRequest.from_resources("smk-a", {})))
    (fake_slurm / "sacct.out").write_text("100|RUNNING\n")
    assert backend.poll([handle])[id(handle)].state == "RUNNING"
    (fake_slurm / "bin" / "sacct").write_text("#!/bin/bash\necho 'sacct: error: db down' >&2; exit 1\n")
    status = backend.poll([handle])[id(handle)]
    assert (status.kind, status.state) == ("active", "RUNNING")


def test_parse_sacct_expands_arrays_and_skips_steps():
    text = "JobID|State\n7|COMPLETED\n7.batch|COMPLETED\n8_3|RUNNING\n9_[0-2,5%4]|PENDING\n10_[4]|PENDING\n"
    assert parse_sacct(text) == {
        "7": "COMPLETED", "8_3": "RUNNING", "9_0": "PENDING", "9_1": "PENDING", "9_2": "PENDING",
        "9_5": "PENDING", "10_4": "PENDING"}


def test_jobs_without_gpus_see_no_gpu(fake_slurm):
    """SLURM sets CUDA_VISIBLE_DEVICES for jobs given GPUs; others must not inherit one from the
    submitting shell (sbatch exports the environment)."""
    backend = SubmititBackend(fake_slurm / "logs", cluster="slurm")
    cpu = JobRequest.from_resources("smk-a", {"gpu": 0})
    for gpu in (JobRequest.from_resources("smk-b", {"gpu": 1}),
                JobRequest.from_resources("smk-c", {"gres": "gpu:1"}),
                JobRequest.from_resources("smk-d", {"slurm_extra": "--gpus=2"})):
        assert gpu.asks_gpu and "CUDA_VISIBLE_DEVICES" not in backend._command("k", "true", gpu, "x").env
    assert not cpu.asks_gpu
    assert backend._command("k", "true", cpu, "x").env == {"CUDA_VISIBLE_DEVICES": ""}


def private_api_uses(files) -> list[str]:
    """Private attributes of objects the code does not own (``ex._throttling``,
    ``watcher._registered``...), submitit's watcher, and imports from submitit's inner modules
    (other than the exception a job's ``exception()`` returns)."""
    import ast

    problems, used, defined = [], {}, set()
    for path in files:
        tree = ast.parse(Path(path).read_text())
        for node in ast.walk(tree):
            where = f"{Path(path).name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                used.setdefault(node.attr, where)
                if isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name) and node.value.id == "self":
                    defined.add(node.attr)  # the code's own attribute
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.add(node.name)
            if isinstance(node, ast.Attribute) and node.attr == "watcher":
                problems.append(f"{where}: submitit's watcher")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("submitit."):
                if node.module != "submitit.core.utils" or [a.name for a in node.names] != ["UncompletedJobError"]:
                    problems.append(f"{where}: imports from {node.module}")
    problems += [f"{where}: .{name}" for name, where in used.items() if name not in defined]
    return problems


def test_executor_uses_no_private_submitit_api():
    files = [*(sc.REPO / "src" / "mergesweep" / "executor").glob("*.py"),
             sc.REPO / "src" / "snakemake_executor_plugin_submitit" / "__init__.py"]
    assert private_api_uses(files) == []


# -- submitit's checkpoint protocol --------------------------------------------------------------
def test_shell_command_runs_and_fails(tmp_path):
    assert ShellCommand("echo hi > out.txt", str(tmp_path))() == 0
    assert (tmp_path / "out.txt").read_text() == "hi\n"
    with pytest.raises(CommandFailed, match="exited with status 3"):
        ShellCommand("exit 3", str(tmp_path), label="x")()


def test_checkpoint_requeues_preemption_but_not_an_exhausted_timeout(tmp_path):
    cmd = ShellCommand("sleep 30", str(tmp_path), time_min=30, signal_delay_s=90, timeout_requeues=1)
    cmd._started = time.time() - 60  # one minute into a 30-minute job: a preemption
    cmd._proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    again = cmd.checkpoint()
    assert again is not None and cmd.preemptions == 1 and cmd._proc.poll() is not None
    requeued = again.function
    assert isinstance(requeued, ShellCommand) and requeued.preemptions == 1 and requeued._proc is None
    pickle.loads(pickle.dumps(requeued))  # what submitit dumps for the next run

    cmd._started = time.time() - 29 * 60  # near the limit: first timeout is requeued (1 allowed)
    assert cmd.checkpoint() is not None and cmd.timeouts == 1
    cmd._proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    assert cmd.checkpoint() is None  # the next is not: the command runs on until the limit
    assert cmd._proc.poll() is None
    cmd._proc.kill()


def test_registry_remembers_unfinished_jobs(tmp_path):
    class H:
        def __init__(self, job_id):
            self.job_id = job_id

    reg = JobRegistry(tmp_path / "active.json")
    reg.add([H("1_0"), H("1_1"), H("2")], label_of=lambda h: f"job {h.job_id}")
    reg.remove([H("1_0")])
    assert JobRegistry(tmp_path / "active.json").take_orphans() == {"1_1": "job 1_1", "2": "job 2"}
    reg2 = JobRegistry(tmp_path / "active.json")
    assert reg2.take_orphans() == {}
    reg2.clear()
    assert not (tmp_path / "active.json").exists()


# -- the workstation path: the same executor with submitit's LocalExecutor ----------------------------
@pytest.mark.timeout(240)
def test_local_executor_runs_the_workflow_without_slurm(tmp_path):
    basic = sc.BASIC.replace("N = 12", "N = 3")
    workdir = sc.write_workflow(tmp_path, basic)
    proc = sc.run_snakemake(workdir, "--submitit-cluster", "local", "--submitit-local-gpus", "0,1",
                            "--jobs", "3", timeout=220)
    assert proc.returncode == 0, proc.log[-4000:]
    assert "local processes via submitit's LocalExecutor" in proc.log
    assert (workdir / "out" / "sum.txt").read_text().strip() == "3"
    assert (workdir / "out" / "flaky.txt").read_text().strip() == "attempt=2"  # retried locally
    assert (workdir / "out" / "gpu.txt").read_text().strip() == "CUDA_VISIBLE_DEVICES=0"
    runs = sc.runs(workdir)
    assert runs and {r[-1] for r in runs} == {"local"}  # no SLURM_JOB_ID: nothing went through SLURM
    assert list((workdir / "results" / "logs" / "slurm" / "smk-a").glob("*/*_log.err"))
