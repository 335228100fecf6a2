"""Submit shell commands through submitit (SLURM job arrays or local processes) and track them.

This is the cluster half of the ``submitit`` Snakemake executor plugin
(``snakemake_executor_plugin_submitit``); it knows nothing about Snakemake:

* :meth:`SubmititBackend.submit` takes ``(key, command, JobRequest)`` items, groups them by
  request signature and submits each group as one job array (``executor.batch()``), at most
  ``array_max_size`` tasks per array.
* :meth:`SubmititBackend.poll` asks SLURM once (one ``sacct`` call, :func:`sacct_states`) about
  every job and says which are active, done or failed.
* :meth:`SubmititBackend.cancel` cancels jobs with one ``scancel``.
* :class:`JobRegistry` remembers submitted, unfinished jobs on disk, so that a run that was
  killed without cancelling its jobs can have them cancelled by the next run.

Only submitit's public API is used (pinned in pyproject.toml): ``SlurmExecutor`` /
``LocalExecutor`` with ``update_parameters``, ``batch()`` and ``submit``; a job's ``job_id``,
``paths``, ``state`` (local jobs), ``exception()`` and ``cancel``; ``helpers.Checkpointable`` and
``helpers.DelayedSubmission`` in :mod:`mergesweep.executor.command`. SLURM states come from our
own ``sacct`` call, not from submitit's watcher.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import submitit

from mergesweep.executor.command import ShellCommand
from mergesweep.executor.request import ExecutorError, JobRequest, parse_sbatch_options

log = logging.getLogger(__name__)

#: SLURM states in which a job will still run (or is running).
ACTIVE_STATES = {
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
    "REQUEUE_FED", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
    "RESV_DEL_HOLD", "UNKNOWN", "READY",
}
#: SLURM states after which a job will not run again by itself.
FAILED_STATES = {
    "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
    "PREEMPTED", "REVOKED", "SPECIAL_EXIT",
}
#: a job SLURM does not know about (yet) for this long is considered lost
LOST_AFTER_S = 600.0


@dataclasses.dataclass
class Handle:
    """One submitted job: the caller's ``key`` and the submitit job."""

    key: Any
    job: Any  # submitit.Job
    request: JobRequest
    array_size: int
    submitted_at: float = dataclasses.field(default_factory=time.time)
    unknown_since: float | None = None
    last_state: str = "PENDING"  # what sacct said last (kept while sacct cannot be asked)

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)


@dataclasses.dataclass
class Status:
    """Outcome of one poll for one job: ``kind`` is ``active``, ``success`` or ``failed``."""

    kind: str
    state: str
    message: str = ""


def _slurm_available() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("sacct") is not None


class SubmititBackend:
    """Submit :class:`ShellCommand` jobs with submitit and poll/cancel them in bulk.

    ``cluster`` is ``slurm``, ``local`` or ``auto`` (SLURM when ``sbatch`` is on the PATH).
    Per-job files (sbatch script, pickles, stdout/stderr) go to ``folder/<name>/<jobid>/``.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        cluster: str = "auto",
        python: str | None = None,
        array_max_size: int = 1000,
        array_parallelism: int = 1000,
        timeout_requeues: int = 0,
        signal_delay_s: int = 90,
        requeue: bool = True,
        setup: Sequence[str] = (),
        sbatch_extra: str | None = None,
        local_gpus: Sequence[int] | None = None,
        cwd: str | None = None,
    ) -> None:
        if cluster == "auto":
            cluster = "slurm" if _slurm_available() else "local"
        if cluster not in ("slurm", "local"):
            raise ExecutorError(f"submitit cluster must be 'slurm', 'local' or 'auto', got {cluster!r}")
        if cluster == "slurm" and shutil.which("sbatch") is None:
            raise ExecutorError(
                "submitit cluster 'slurm' was asked for but `sbatch` is not on the PATH "
                "(load the SLURM module, or use --submitit-cluster local on a workstation)"
            )
        self.cluster = cluster
        self.folder = Path(folder).absolute()
        self.python = python or shlex.quote(sys.executable)
        self.array_max_size = max(1, int(array_max_size))
        self.array_parallelism = max(1, int(array_parallelism))
        self.timeout_requeues = int(timeout_requeues)
        self.signal_delay_s = int(signal_delay_s)
        self.requeue = bool(requeue)
        self.setup = list(setup)
        self.sbatch_extra = parse_sbatch_options(sbatch_extra, where="submitit sbatch-extra")
        self.cwd = cwd or os.getcwd()
        self.submissions = 0  # sbatch calls (or local process launches) so far
        # local mode: GPUs handed out to running jobs (submitit's LocalExecutor gives every job
        # GPUs 0..n-1; we hand out distinct ones from this pool)
        self._gpu_pool = list(local_gpus) if local_gpus is not None else _visible_gpus()
        self._gpus_held: dict[str, list[int]] = {}

    # ---------------------------------------------------------------------------------------
    def _executor(self, request: JobRequest, folder: Path, gpus: Sequence[int] = ()) -> Any:
        if self.cluster == "slurm":
            # we count timeout requeues ourselves (ShellCommand.checkpoint); submitit's own
            # counter must never stop a requeue we asked for
            ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=10**6, python=self.python)
            params = request.slurm_parameters()
            extra = dict(self.sbatch_extra)
            extra.update(params.pop("additional_parameters", {}))
            if self.requeue:
                extra.setdefault("requeue", True)
            params.update(
                signal_delay_s=self.signal_delay_s,
                array_parallelism=self.array_parallelism,
                wckey=None,
            )
            if self.setup:
                params["setup"] = list(self.setup)
            if extra:
                params["additional_parameters"] = extra
            ex.update_parameters(**params)
            # (submitit sleeps 0.2 s between two sbatch calls of one executor; every array gets a
            # fresh executor here, so that pause never applies)
        else:
            ex = submitit.LocalExecutor(folder=folder, max_num_timeout=10**6, python=self.python)
            params = request.local_parameters()
            params["signal_delay_s"] = self.signal_delay_s
            if gpus:
                params["visible_gpus"] = tuple(gpus)
            if self.setup:
                params["setup"] = list(self.setup)
            ex.update_parameters(**params)
        return ex

    def _command(self, key: Any, command: str, request: JobRequest, label: str) -> ShellCommand:
        env = {}
        if self.cluster == "slurm" and not request.asks_gpu:
            # SLURM sets CUDA_VISIBLE_DEVICES for jobs given GPUs; a job that asked for none must
            # not use one of another job's through a value leaked from the submitting shell
            # (sbatch exports it). Empty hides every GPU, as submitit's LocalExecutor does.
            env["CUDA_VISIBLE_DEVICES"] = ""
        return ShellCommand(
            command,
            self.cwd,
            label=label,
            time_min=request.time_min,
            signal_delay_s=self.signal_delay_s,
            timeout_requeues=self.timeout_requeues,
            env=env,
        )

    def submit(self, items: Iterable[tuple[Any, str, JobRequest, str]]) -> list[Handle]:
        """Submit ``(key, command, request, label)`` items; one array per request signature.

        Returns one :class:`Handle` per item, in order. Raises :class:`ExecutorError` when a
        submission is refused; handles of arrays submitted before that are kept in
        ``error.handles``.
        """
        items = list(items)
        groups: dict[JobRequest, list[int]] = defaultdict(list)
        for index, (_, _, request, _) in enumerate(items):
            groups[request.signature()].append(index)
        handles: list[Handle | None] = [None] * len(items)
        try:
            for request, indices in groups.items():
                if self.cluster == "local":
                    for i in indices:
                        handles[i] = self._submit_local(*items[i])
                    continue
                for start in range(0, len(indices), self.array_max_size):
                    chunk = indices[start : start + self.array_max_size]
                    for i, handle in zip(chunk, self._submit_array(request, [items[i] for i in chunk])):
                        handles[i] = handle
        except ExecutorError as e:
            e.handles = [h for h in handles if h is not None]  # type: ignore[attr-defined]
            raise
        return [h for h in handles if h is not None]

    def _submit_array(self, request: JobRequest, items: list[tuple[Any, str, JobRequest, str]]) -> list[Handle]:
        ex = self._executor(request, self.folder / _safe(request.name) / "%j")
        fns = [self._command(key, command, request, label) for key, command, _, label in items]
        try:
            if len(fns) == 1:
                jobs = [ex.submit(fns[0])]
            else:
                with ex.batch():
                    jobs = [ex.submit(fn) for fn in fns]
        except (subprocess.SubprocessError, OSError, RuntimeError) as e:
            # sbatch's own error (CalledProcessError), or submitit's submission errors
            # (RuntimeError subclasses)
            raise ExecutorError(
                f"sbatch refused {len(fns)} job(s) of {request.name!r} ({request.describe()}): "
                f"{_error_text(e)}"
            ) from e
        self.submissions += 1
        now = time.time()
        return [
            Handle(key=item[0], job=job, request=request, array_size=len(items), submitted_at=now)
            for item, job in zip(items, jobs)
        ]

    def _submit_local(self, key: Any, command: str, request: JobRequest, label: str) -> Handle:
        gpus: list[int] = []
        if request.gpus:
            if len(self._gpu_pool) < request.gpus:
                log.warning(
                    "%s asks for %d GPU(s) but only %s are free on this machine; running it with "
                    "those (limit concurrency with --resources gpu=N)",
                    label, request.gpus, self._gpu_pool or "none",
                )
            gpus, self._gpu_pool = self._gpu_pool[: request.gpus], self._gpu_pool[request.gpus :]
        ex = self._executor(request, self.folder / _safe(request.name) / "%j", gpus)
        if request.gpus and not gpus:
            ex.update_parameters(gpus_per_node=0)
        job = ex.submit(self._command(key, command, request, label))
        self.submissions += 1
        if gpus:
            self._gpus_held[str(job.job_id)] = gpus
        return Handle(key=key, job=job, request=request, array_size=1)

    def _release(self, handle: Handle) -> None:
        self._gpu_pool.extend(self._gpus_held.pop(handle.job_id, []))

    # ---------------------------------------------------------------------------------------
    def poll(self, handles: Sequence[Handle]) -> dict[int, Status]:
        """Status of every handle, keyed by ``id(handle)``; one ``sacct`` call for all."""
        out: dict[int, Status] = {}
        if not handles:
            return out
        if self.cluster == "local":
            for h in handles:
                out[id(h)] = self._local_status(h)
        else:
            states = sacct_states(h.job_id for h in handles)
            if states is None:
                log.warning("sacct failed; keeping the last known state of %d job(s)", len(handles))
            for h in handles:
                out[id(h)] = self._slurm_status(h, None if states is None else states.get(h.job_id, "UNKNOWN"))
            # sacct reports PREEMPTED/NODE_FAIL/... for a while after SLURM requeued the job
            # (and REQUEUED is not final either): a job still in squeue is not over.
            doubtful = [h for h in handles if out[id(h)].kind == "failed" and out[id(h)].state in FAILED_STATES]
            queued = squeue_ids(h.job_id for h in doubtful) if doubtful else set()
            for h in doubtful:
                if queued is None or h.job_id in queued:
                    out[id(h)] = Status("active", out[id(h)].state + " (requeued)")
        for h in handles:
            if out[id(h)].kind != "active":
                self._release(h)
        return out

    def _local_status(self, h: Handle) -> Status:
        state = h.job.state
        if state == "RUNNING":
            return Status("active", state)
        return self._outcome(h, state)

    def _slurm_status(self, h: Handle, raw: str | None) -> Status:
        if raw is None:  # sacct could not be asked
            return Status("active", h.last_state)
        state = raw.split()[0].upper().rstrip("+") if raw.strip() else "UNKNOWN"
        if state == "UNKNOWN":
            # not in the accounting database yet (or no accounting): trust a result file
            if h.job.paths.result_pickle.exists() and not _in_squeue(h.job_id):
                return self._outcome(h, "COMPLETED?")
            if h.unknown_since is None:
                h.unknown_since = time.time()
            elif time.time() - h.unknown_since > LOST_AFTER_S and not _in_squeue(h.job_id):
                return Status("failed", state, f"SLURM lost track of job {h.job_id} (not in sacct nor squeue)")
            return Status("active", state)
        h.unknown_since = None
        h.last_state = state
        if state in ACTIVE_STATES:
            return Status("active", state)
        if state == "COMPLETED":
            return self._outcome(h, state)
        return Status("failed", state, self._failure_message(h, raw))

    def _outcome(self, h: Handle, state: str) -> Status:
        """Success or failure of a job that is over, from submitit's result file."""
        if not h.job.paths.result_pickle.exists():
            return Status("failed", state, self._failure_message(h, f"{state}, no result file"))
        try:
            error = h.job.exception()  # None on success; returns at once: the result file is there
        except Exception as e:  # truncated/corrupt result file
            return Status("failed", state, self._failure_message(h, f"{state}, unreadable result ({e})"))
        if error is None:
            return Status("success", state)
        return Status("failed", state, self._failure_message(h, f"{state}, command failed"))

    def _failure_message(self, h: Handle, what: str) -> str:
        paths = h.job.paths
        lines = _tail(paths.stderr, 80) or _tail(paths.stdout, 80)
        # the command's own last words, not submitit's traceback that follows them
        cut = next((i for i, line in enumerate(lines) if line.startswith("submitit ERROR")), len(lines))
        tail = lines[:cut][-15:]
        msg = f"{self.cluster} job {h.job_id} ended {what}; logs: {paths.stderr}"
        if tail:
            msg += "\n" + "\n".join("    " + line for line in tail)
        return msg

    # ---------------------------------------------------------------------------------------
    def cancel(self, handles: Sequence[Handle]) -> None:
        """Cancel jobs (one ``scancel`` for all of them on SLURM)."""
        if not handles:
            return
        if self.cluster == "slurm":
            scancel(h.job_id for h in handles)
        else:
            for h in handles:
                try:
                    h.job.cancel(check=False)
                except Exception as e:  # process already gone
                    log.debug("cancel %s: %s", h.job_id, e)
                self._release(h)

    def describe(self) -> str:
        if self.cluster == "slurm":
            return f"SLURM via submitit (arrays of up to {self.array_max_size}, logs in {self.folder})"
        return f"local processes via submitit's LocalExecutor (logs in {self.folder})"


# ------------------------------------------------------------------------------------------------
def scancel(job_ids: Iterable[str], timeout: float = 60.0) -> None:
    """Cancel SLURM jobs in chunks of 500 ids per ``scancel`` call; errors are logged."""
    ids = sorted({str(j) for j in job_ids})
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        try:
            subprocess.run(["scancel", *chunk], check=False, timeout=timeout,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.warning("scancel of %d job(s) failed: %s", len(chunk), e)


def sacct_states(job_ids: Iterable[str], timeout: float = 60.0) -> dict[str, str] | None:
    """SLURM state of each job (``123`` or array task ``123_4``) from ``sacct``; ``None`` if it failed.

    One ``sacct`` call per 500 distinct job (array) ids: ``sacct -X -n -P -o JobID,State -j ...``.
    Tasks of an array not yet started are reported as a range (``123_[0-7%4]``) and expanded.
    Jobs sacct does not know (yet) are missing from the result. States are sacct's text
    (``CANCELLED by 0``, ``COMPLETED``...).
    """
    mains = sorted({str(j).split("_")[0] for j in job_ids})
    states: dict[str, str] = {}
    for start in range(0, len(mains), 500):
        chunk = mains[start : start + 500]
        cmd = ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(chunk)]
        try:
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout).stdout
        except (OSError, subprocess.SubprocessError) as e:
            log.debug("sacct failed: %s", e)
            return None
        states.update(parse_sacct(out))
    return states


def parse_sacct(text: str) -> dict[str, str]:
    """``{job id: state}`` from ``sacct -P -o JobID,State`` lines (a header line is skipped)."""
    states: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) < 2 or not fields[0] or fields[0] == "JobID" or "." in fields[0]:
            continue  # empty, the header, or a job step (123.batch)
        for job_id in _expand_job_id(fields[0]):
            states[job_id] = fields[1].strip()
    return states


def _expand_job_id(text: str) -> list[str]:
    """``123`` -> [123]; ``123_4`` -> [123_4]; ``123_[0-2,5%4]`` -> [123_0, 123_1, 123_2, 123_5]."""
    main, sep, rest = text.partition("_")
    if not sep:
        return [main]
    if not rest.startswith("["):
        return [text]
    ids = []
    for part in rest.strip("[]").split("%")[0].split(","):
        low, _, high = part.partition("-")
        try:
            ids.extend(f"{main}_{i}" for i in range(int(low), int(high or low) + 1))
        except ValueError:
            log.debug("unreadable sacct job id %r", text)
    return ids


def squeue_ids(job_ids: Iterable[str] | None = None) -> set[str] | None:
    """Ids (``123`` or ``123_4``) of queued/running jobs of this user; ``None`` when unknown."""
    # all of the user's jobs: `squeue -j` fails outright when one id is no longer known
    cmd = ["squeue", "-h", "-r", "-o", "%i", "-u", _user()]
    wanted = None if job_ids is None else {str(j) for j in job_ids}
    if wanted is not None and not wanted:
        return set()
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    ids = {line.strip() for line in out.splitlines() if line.strip()}
    return ids if wanted is None else ids & wanted


def _in_squeue(job_id: str) -> bool:
    ids = squeue_ids([job_id])
    return True if ids is None else job_id in ids


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return os.environ.get("USER", "")


def _visible_gpus() -> list[int]:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        return list(range(len([v for v in value.split(",") if v.strip()])))
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
        return list(range(sum(1 for line in out.splitlines() if line.startswith("GPU "))))
    except (OSError, subprocess.SubprocessError):
        return []


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name) or "job"


def _tail(path: Path, n: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    return lines[-n:]


def _error_text(e: BaseException) -> str:
    text = str(e)
    for attr in ("stderr", "output"):
        extra = getattr(e, attr, None)
        if extra:
            text += " " + (extra.decode() if isinstance(extra, bytes) else str(extra))
    return text.strip()


# ------------------------------------------------------------------------------------------------
class JobRegistry:
    """Unfinished jobs of the running workflow, in a JSON file (``{job_id: label}``).

    Written on every change (small: only active jobs). A file left by a killed run names the
    jobs that nobody is watching any more: :meth:`take_orphans` returns them and starts afresh.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._jobs: dict[str, str] = {}

    def take_orphans(self) -> dict[str, str]:
        try:
            orphans = json.loads(self.path.read_text())
        except (OSError, ValueError):
            orphans = {}
        self._jobs = {}
        self._write()
        return orphans if isinstance(orphans, dict) else {}

    def add(self, handles: Iterable[Handle], label_of: Any = str) -> None:
        for h in handles:
            self._jobs[h.job_id] = label_of(h)
        self._write()

    def remove(self, handles: Iterable[Handle]) -> None:
        changed = False
        for h in handles:
            changed |= self._jobs.pop(h.job_id, None) is not None
        if changed:
            self._write()

    def clear(self) -> None:
        self._jobs = {}
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self._jobs, indent=0, sort_keys=True))
        os.replace(tmp, self.path)
