"""The callable a submitit job runs: one shell command (a Snakemake job), requeue-aware.

submitit pickles an instance of :class:`ShellCommand`, ships it to the node and calls it. The
command runs in a child process whose output goes straight to the job's submitit log files.

Requeueing (submitit's checkpoint protocol): SLURM sends ``SIGUSR2`` (submitit's
``--signal=USR2@<signal_delay_s>``) before the time limit, and clusters configured for it send
it on preemption. submitit's handler then calls :meth:`ShellCommand.checkpoint`:

* preemption (the time limit is not near): stop the child and return a fresh submission, so
  submitit requeues the job (``scontrol requeue``); the command starts over on the next run.
* time limit near and fewer than ``timeout_requeues`` requeues so far: the same.
* time limit near otherwise: decline (return ``None``) and let the child run until SLURM stops
  it. A job with a hard time limit gains nothing from a requeue with the same limit; Snakemake
  retries it instead, with the ``attempt``-scaled ``runtime`` from the profile.

The child ignores the checkpoint signal (SLURM signals every process of the job step), so only
this wrapper decides.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

import submitit
from submitit.core.utils import UncompletedJobError

log = logging.getLogger(__name__)

#: margin (s) on top of signal_delay_s: SLURM may send the warning signal up to 60 s early.
SIGNAL_SLACK_S = 75


class CommandFailed(RuntimeError):
    """The command exited with a non-zero status."""


def _checkpoint_signal_name() -> str:
    return "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")


class ShellCommand(submitit.helpers.Checkpointable):
    """Run ``command`` with ``bash -c`` in ``cwd``; raise :class:`CommandFailed` on failure.

    ``time_min`` and ``signal_delay_s`` must match what the job was submitted with: they tell a
    warning before the time limit from a preemption.
    """

    def __init__(
        self,
        command: str,
        cwd: str,
        *,
        label: str = "",
        time_min: float = 60,
        signal_delay_s: int = 90,
        timeout_requeues: int = 0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.command = command
        self.cwd = cwd
        self.label = label
        self.time_min = float(time_min)
        self.signal_delay_s = int(signal_delay_s)
        self.timeout_requeues = int(timeout_requeues)
        self.env = dict(env or {})
        self.timeouts = 0  # requeues after a time-limit warning so far
        self.preemptions = 0  # requeues after a preemption so far
        self._proc: subprocess.Popen | None = None
        self._started = 0.0

    # -- pickling: the child process stays behind ------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_proc"] = None
        state.pop("_stopping", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- running ------------------------------------------------------------------------------
    def __call__(self) -> int:
        self._started = time.time()
        sig = _checkpoint_signal_name()
        env = dict(os.environ)
        env.update(self.env)
        _say(
            f"start {self.label or 'job'} on {os.uname().nodename} "
            f"(slurm job {os.environ.get('SLURM_JOB_ID', '-')}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!s}, "
            f"previous requeues: {self.preemptions} preemption(s), {self.timeouts} timeout(s))"
        )
        # `trap '' SIG` makes the child and everything it starts ignore the checkpoint signal.
        script = f"trap '' {sig[3:]}\n{self.command}"
        # own process group, so that stopping it reaches everything the command started
        self._proc = subprocess.Popen(
            ["/bin/bash", "-c", script], cwd=self.cwd, env=env, start_new_session=True
        )
        # submitit ignores SIGTERM (it waits for its checkpoint signal); we stop the command on it
        # (scancel, preemption without checkpoint signal, the local executor's cancel).
        for stop_sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stop_sig, self._on_stop_signal)
        while True:
            try:
                rc = self._proc.wait()
                break
            except UncompletedJobError:
                # raised by submitit's signal handler after checkpoint() declined to requeue
                _say("time limit near and no requeue left: running on until the limit")
        if rc != 0:
            raise CommandFailed(f"{self.label or 'command'} exited with status {rc}")
        _say(f"done {self.label or 'job'} in {time.time() - self._started:.1f}s")
        return rc

    # -- submitit's checkpoint protocol -----------------------------------------------------------
    def near_time_limit(self) -> bool:
        """Whether a checkpoint signal now means "time limit ahead" rather than preemption."""
        elapsed = time.time() - self._started if self._started else 0.0
        return elapsed >= self.time_min * 60 - self.signal_delay_s - SIGNAL_SLACK_S

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        if self.near_time_limit():
            if self.timeouts >= self.timeout_requeues:
                _say(
                    f"time limit ({self.time_min:g} min) near; not requeued "
                    f"({self.timeouts}/{self.timeout_requeues} timeout requeues used)"
                )
                return None
            self.timeouts += 1
            reason = f"time limit near (timeout requeue {self.timeouts}/{self.timeout_requeues})"
        else:
            self.preemptions += 1
            reason = f"preempted (requeue {self.preemptions})"
        _say(f"{reason}: stopping the command and requeueing")
        self._stop_child()
        fresh = ShellCommand.__new__(ShellCommand)
        fresh.__setstate__(self.__getstate__())
        fresh._started = 0.0
        return submitit.helpers.DelayedSubmission(fresh, *args, **kwargs)

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        if getattr(self, "_stopping", False):  # SLURM may signal twice; the first one handles it
            return
        self._stopping = True
        _say(f"caught {signal.Signals(signum).name}: stopping the command")
        self._stop_child()
        raise SystemExit(128 + signum)

    def _stop_child(self, grace_s: float = 10.0) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                return
            deadline = time.time() + wait_s
            while time.time() < deadline:
                if proc.poll() is not None:
                    return
                time.sleep(0.1)

    def __repr__(self) -> str:
        return f"ShellCommand({self.label or self.command[:60]!r})"


def _say(message: str) -> None:
    # the job's stdout is its submitit log file; logging may not be configured there
    print(f"[mergesweep.executor {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
