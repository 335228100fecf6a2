"""Helpers for the SLURM tests: the single-node cluster of .ci/slurm/up.sh, sacct/squeue
queries, running Snakemake with profiles/slurm, and small throwaway workflows.

The cluster needs root and Debian's packages
(``apt-get install -y slurmctld slurmd slurm-client munge slurmdbd mariadb-server``);
:func:`skip_reason` says why it cannot be used here.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

REPO = Path(__file__).resolve().parents[1]
UP = REPO / ".ci" / "slurm" / "up.sh"
DOWN = REPO / ".ci" / "slurm" / "down.sh"
PROFILE = REPO / "profiles" / "slurm"
VENV_BIN = Path(sys.executable).parent
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

NEEDED = ["slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "sbatch", "sacct", "scontrol", "squeue"]
APT_LINE = "apt-get install -y slurmctld slurmd slurm-client munge slurmdbd mariadb-server"

#: Status checks this often in the tests (the profile's 10 s is for real clusters).
FAST = ["--seconds-between-status-checks", "2", "--max-status-checks-per-second", "5",
        "--latency-wait", "5"]


def skip_reason() -> str | None:
    """Why the real cluster cannot be brought up here, or None when it can."""
    if os.environ.get("MERGESWEEP_SLURM_TESTS", "1") == "0":
        return "SLURM tests disabled (MERGESWEEP_SLURM_TESTS=0)"
    if not sys.platform.startswith("linux"):
        return "the SLURM test cluster needs Linux"
    if os.geteuid() != 0:
        return "the SLURM test cluster needs root (it starts munged, MariaDB, slurmdbd, slurmctld, slurmd)"
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [b for b in NEEDED if shutil.which(b, path=path) is None]
    if missing:
        return f"SLURM packages missing ({', '.join(missing)}): {APT_LINE}"
    return None


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Snakemake runs: this venv first on PATH, the repo's src importable
    (``extra`` added last, e.g. ``XDG_CONFIG_HOME`` for an installed profile)."""
    e = dict(os.environ)
    e["PATH"] = f"{VENV_BIN}:{e.get('PATH', '')}:/usr/sbin"
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), e.get("PYTHONPATH")]))
    e.pop("SNAKEMAKE_PROFILE", None)
    e.update(extra or {})
    return e


def sh(*cmd: str, check: bool = True, timeout: float = 60) -> str:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True,
                          timeout=timeout, env=env()).stdout


# -------------------------------------------------------------------------------------------------
class Cluster:
    """The running single-node cluster (node ``localhost``)."""

    node = "localhost"

    def __init__(self) -> None:
        self.started_at = dt.datetime.now()

    @staticmethod
    def up() -> "Cluster":
        proc = subprocess.run(["bash", str(UP)], capture_output=True, text=True, timeout=180, env=env())
        if proc.returncode != 0:
            raise RuntimeError(f"{UP} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return Cluster()

    @staticmethod
    def down() -> None:
        subprocess.run(["bash", str(DOWN)], capture_output=True, text=True, timeout=120, env=env())

    # -- queries --------------------------------------------------------------------------------
    @staticmethod
    def sacct(since: dt.datetime, *, duplicates: bool = False, name_prefix: str = "smk-",
              workdir: Path | None = None) -> list[dict]:
        """Allocations (no steps) since ``since`` as dicts (JobID, JobName, State, Timelimit,
        ReqMem, AllocTRES, Partition, Account, ...), of jobs submitted from ``workdir`` if given."""
        fields = ["JobID", "JobIDRaw", "JobName", "State", "Timelimit", "ReqMem", "ReqTRES",
                  "AllocTRES", "Partition", "Account", "ExitCode", "Start", "End", "WorkDir"]
        cmd = ["sacct", "-X", "-n", "-P", "-S", since.strftime("%Y-%m-%dT%H:%M:%S"),
               "-o", ",".join(fields)]
        if duplicates:
            cmd.append("-D")
        rows = [dict(zip(fields, line.split("|"))) for line in sh(*cmd).splitlines() if line.strip()]
        rows = [r for r in rows if r["JobName"].startswith(name_prefix)]
        if workdir is not None:
            rows = [r for r in rows if Path(r["WorkDir"]).resolve() == Path(workdir).resolve()]
        return rows

    @staticmethod
    def squeue(name_prefix: str = "smk-", workdir: Path | None = None) -> list[dict]:
        fields = ["id", "name", "state", "reason", "partition", "workdir"]
        out = sh("squeue", "-h", "-r", "-o", "%i|%j|%T|%r|%P|%Z", check=False)
        rows = [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]
        rows = [r for r in rows if r["name"].startswith(name_prefix)]
        if workdir is not None:
            rows = [r for r in rows if Path(r["workdir"]).resolve() == Path(workdir).resolve()]
        return rows

    def node_state(self) -> str:
        return sh("sinfo", "-h", "-n", self.node, "-o", "%T", check=False).strip().splitlines()[0]

    def drain(self, reason: str = "mergesweep test") -> None:
        sh("scontrol", "update", f"nodename={self.node}", "state=drain", f"reason={reason}")

    def resume(self) -> None:
        sh("scontrol", "update", f"nodename={self.node}", "state=resume")

    @staticmethod
    def release(job_id: str) -> None:
        """Let a requeued job start now: SLURM holds requeued batch jobs for ~2 minutes
        (EligibleTime = requeue + 121 s); the tests do not wait for that."""
        sh("scontrol", "update", f"jobid={job_id}", "StartTime=now", check=False)

    @staticmethod
    def job_info(job_id: str) -> str:
        return sh("scontrol", "show", "job", job_id, check=False)


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.5):
    """Poll ``predicate`` until it returns something truthy; return it. Fail after ``timeout``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


# -------------------------------------------------------------------------------------------------
def snakemake_args(workdir: Path, *extra: str, profile: Path | str = PROFILE, fast: bool = True) -> list[str]:
    """``profile``: a path, or the name of an installed profile (``slurm``)."""
    args = [*SNAKEMAKE, "--profile", str(profile), "--directory", str(workdir),
            "--snakefile", str(workdir / "Snakefile")]
    if fast:
        args += FAST
    return args + list(extra)


def run_snakemake(workdir: Path, *extra: str, timeout: float = 300, extra_env: dict | None = None,
                  cwd: Path | None = None, **kw) -> subprocess.CompletedProcess:
    log = workdir / f"snakemake.{int(time.time() * 1000)}.log"
    with open(log, "w") as f:
        proc = subprocess.run(snakemake_args(workdir, *extra, **kw), stdout=f, stderr=subprocess.STDOUT,
                              env=env(extra_env), cwd=cwd or workdir, timeout=timeout)
    proc.log = log.read_text()  # type: ignore[attr-defined]
    return proc


class Background:
    """Snakemake running in the background; ``.log`` is what it printed so far."""

    def __init__(self, workdir: Path, *extra: str, **kw) -> None:
        self.path = workdir / f"snakemake.{int(time.time() * 1000)}.log"
        self._f = open(self.path, "w")
        self.proc = subprocess.Popen(snakemake_args(workdir, *extra, **kw), stdout=self._f,
                                     stderr=subprocess.STDOUT, env=env(), cwd=workdir,
                                     start_new_session=True)

    @property
    def log(self) -> str:
        return self.path.read_text()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill_hard(self) -> None:
        """SIGKILL Snakemake itself only (its SLURM jobs keep running, like a lost login node)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._f.flush()

    def __enter__(self) -> "Background":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._f.close()


def write_workflow(workdir: Path, snakefile: str) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "Snakefile").write_text(snakefile)
    return workdir


def by_name(rows: Iterable[dict], name: str) -> list[dict]:
    return [r for r in rows if r["JobName"] == name]


# -------------------------------------------------------------------------------------------------
# Throwaway workflows. Each job appends a line to runs.log (how often did it run?). Producers write
# their output in two steps ("start" ... "DONE") so that a consumer of a partial file would notice.

BASIC = r'''
N = 12
rule all:
    input: expand("out/a_{i}.txt", i=range(N)), "out/flaky.txt", "out/gpu.txt", "out/sum.txt"

rule a:
    output: "out/a_{i}.txt"
    resources: runtime=3
    shell: "echo a{wildcards.i} ${{SLURM_JOB_ID:-local}} >> runs.log; echo {wildcards.i} > {output}"

rule sum:
    input: expand("out/a_{i}.txt", i=range(N))
    output: "out/sum.txt"
    shell: "awk '{{s += $1}} END {{print s}}' {input} > {output}"

rule flaky:
    # fails on its first attempt; the retry must get more memory and time (profile expressions)
    output: "out/flaky.txt"
    resources: mem_mb=lambda wc, attempt: 300 * attempt, runtime=lambda wc, attempt: 2 * attempt,
               att=lambda wc, attempt: attempt
    shell: "echo flaky {resources.att} ${{SLURM_JOB_ID:-local}} >> runs.log; [ {resources.att} -ge 2 ] || exit 3; echo attempt={resources.att} > {output}"

rule gpu:
    output: "out/gpu.txt"
    resources: gpu=1
    shell: "echo gpu ${{SLURM_JOB_ID:-local}} >> runs.log; echo CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-}} > {output}"
'''

FAULTS = r'''
# One sweep, several faults injected by the test while it runs (see test_slurm_faults.py).
def produce(name, seconds):
    # writes a partial output first, then completes it
    return (f"echo {name} {{resources.att}} ${{{{SLURM_JOB_ID:-local}}}} ${{{{SLURM_RESTART_COUNT:-0}}}} >> runs.log; "
            f"echo start > {{output}}; sleep {seconds}; echo DONE >> {{output}}; "
            f"echo attempt={{resources.att}} restarts=${{{{SLURM_RESTART_COUNT:-0}}}} CUDA_VISIBLE_DEVICES=${{{{CUDA_VISIBLE_DEVICES:-}}}} >> {{output}}")

ATT = lambda wc, attempt: attempt
NAMES = ["gen0", "gen1", "gen2", "victim", "preempt_sig", "preempt_slurm", "timeout"]

rule all:
    input: "out/summary.txt", "out/sum.txt", "out/flaky.txt", "out/gpu.txt"

# -- plain jobs: one array, a GPU job, a job that fails once ------------------------------------
N = 8
rule a:
    output: "out/a_{i}.txt"
    resources: runtime=3, mem_mb=200
    shell: "echo a{wildcards.i} >> runs.log; echo {wildcards.i} > {output}"

rule sum:
    input: expand("out/a_{i}.txt", i=range(N))
    output: "out/sum.txt"
    shell: "awk '{{s += $1}} END {{print s}}' {input} > {output}"

rule flaky:
    # fails on its first attempt; the retry gets twice the memory and time
    output: "out/flaky.txt"
    resources: mem_mb=lambda wc, attempt: 300 * attempt, runtime=lambda wc, attempt: 2 * attempt,
               att=lambda wc, attempt: attempt
    shell: "echo flaky {resources.att} >> runs.log; [ {resources.att} -ge 2 ] || exit 3; echo attempt={resources.att} > {output}"

rule gpu:
    input: "out/preempt_slurm.txt"  # after the job that holds all GPUs
    output: "out/gpu.txt"
    resources: gpu=1, runtime=5
    shell: "echo CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-}} > {output}"

# -- faults ----------------------------------------------------------------------------------------

rule summary:
    input: expand("checked/{name}.ok", name=NAMES)
    output: "out/summary.txt"
    shell: "cat {input} > {output}"

rule check:
    # a consumer: fails if it ever sees a partial producer output
    input: "out/{name}.txt"
    output: "checked/{name}.ok"
    shell: "grep -qx DONE {input} || {{ echo PARTIAL-CONSUMED {wildcards.name} >> runs.log; exit 1; }}; cp {input} {output}"

rule gen:
    output: "out/gen{i}.txt"
    resources: att=ATT
    shell: produce("gen{wildcards.i}", 4)

rule victim:          # scancel'ed mid-run on attempt 1, retried by Snakemake
    output: "out/victim.txt"
    resources: att=ATT
    shell: produce("victim", 20)

rule preempt_sig:     # gets submitit's USR2 mid-run: checkpoint + requeue, same attempt
    output: "out/preempt_sig.txt"
    resources: att=ATT, runtime=10
    shell: produce("preempt_sig", 20)

rule preempt_slurm:   # preempted by a job in the higher-priority partition: SLURM requeues it
    output: "out/preempt_slurm.txt"
    resources: att=ATT, gpu=4, runtime=10
    shell: produce("preempt_slurm", 20)

rule timeout:         # needs ~62 s: times out with runtime=1 (attempt 1), fits 2 min (attempt 2)
    output: "out/timeout.txt"
    resources: att=ATT, runtime=lambda wc, attempt: attempt
    shell: produce("timeout", 62)
'''

CHAIN = r'''
# six independent steps: three quick, three slow (the test kills Snakemake in between)
QUICK = [0, 1, 2]
rule all:
    input: expand("out/s{i}.txt", i=range(6))
rule step:
    output: "out/s{i}.txt"
    params: seconds=lambda wc: 1 if int(wc.i) in QUICK else 40
    shell: "echo s{wildcards.i} ${{SLURM_JOB_ID:-local}} >> runs.log; echo start > {output}; sleep {params.seconds}; echo DONE >> {output}"
'''

GPU_CPU = r'''
# one stage that asks for a GPU, one that asks for none and two threads: each job writes what it saw
rule all:
    input: "out/gpu.txt", "out/cpu.txt"

SEEN = ("echo CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES-unset}} > {output}; "
        "echo SLURM_CPUS_PER_TASK=${{SLURM_CPUS_PER_TASK-unset}} >> {output}; "
        "echo SLURM_JOB_ID=${{SLURM_JOB_ID-unset}} >> {output}")

rule gpu_stage:
    output: "out/gpu.txt"
    resources: gpu=1, runtime=5, mem_mb=300
    shell: SEEN

rule cpu_stage:
    output: "out/cpu.txt"
    threads: 2
    resources: gpu=0, runtime=5, mem_mb=300
    shell: SEEN
'''

SLEEPERS = r'''
rule all:
    input: expand("out/z{i}.txt", i=range(3))
rule sleeper:
    output: "out/z{i}.txt"
    shell: "echo z{wildcards.i} ${{SLURM_JOB_ID:-local}} >> runs.log; sleep 120; touch {output}"
'''


def runs(workdir: Path) -> list[list[str]]:
    path = workdir / "runs.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


# -------------------------------------------------------------------------------------------------
# pytest fixture: the cluster, once per session (import it into a test module to use it)
_SESSION: dict = {}


def _cluster_fixture():
    import pytest

    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    if "cluster" not in _SESSION:
        already = subprocess.run(["bash", "-c", "pgrep -x slurmctld && scontrol ping"],
                                 capture_output=True, env=env()).returncode == 0
        _SESSION["cluster"] = Cluster.up()
        _SESSION["owner"] = not already
        yield _SESSION["cluster"]
        if _SESSION["owner"] and os.environ.get("MERGESWEEP_SLURM_KEEP", "0") != "1":
            Cluster.down()
        _SESSION.clear()
    else:
        yield _SESSION["cluster"]


def make_fixture():
    import pytest

    return pytest.fixture(scope="session", name="slurm")(_cluster_fixture)
