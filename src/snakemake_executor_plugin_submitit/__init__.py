"""Snakemake executor plugin: run a workflow's jobs through submitit (SLURM job arrays or local).

Use with ``snakemake --executor submitit`` (the repository's ``profiles/slurm`` does this).
Snakemake keeps what it is good at: the DAG, scheduling, ``retries`` with ``attempt``-dependent
resources, incomplete-output tracking. submitit does the cluster side through its public API:
sbatch scripts, job arrays, requeueing on its checkpoint signal, and the local executor for a
workstation; the status of all jobs comes from one ``sacct`` call per check. The cluster half
lives in :mod:`mergesweep.executor` (no Snakemake imports).

Each scheduling round, the jobs Snakemake hands over (``run_jobs``) are grouped by rule and
cluster resources; each group becomes one job array. See ``docs/slurm.md``.
"""


import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncGenerator, List, Optional

from snakemake_interface_common.exceptions import WorkflowError
from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
from snakemake_interface_executor_plugins.executors.remote import RemoteExecutor
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface
from snakemake_interface_executor_plugins.settings import CommonSettings, ExecutorSettingsBase

from mergesweep.executor.backend import JobRegistry, SubmititBackend, scancel, squeue_ids
from mergesweep.executor.request import ExecutorError, JobRequest

__all__ = ["Executor", "ExecutorSettings", "common_settings"]


@dataclass
class ExecutorSettings(ExecutorSettingsBase):
    cluster: Optional[str] = field(
        default="auto",
        metadata={
            "help": "Where jobs run: 'slurm', 'local' (submitit's LocalExecutor, for a workstation) "
            "or 'auto' (slurm when sbatch is on the PATH).",
            "choices": ["auto", "slurm", "local"],
        },
    )
    folder: Optional[str] = field(
        default=".snakemake/submitit",
        metadata={
            "help": "Folder for submitit's per-job files: sbatch script, pickles, stdout/stderr "
            "(<folder>/<rule>/<jobid>/). Relative to the working directory."
        },
    )
    partition: Optional[str] = field(
        default=None,
        metadata={"help": "Default SLURM partition (a rule's resources.slurm_partition wins)."},
    )
    account: Optional[str] = field(
        default=None,
        metadata={"help": "Default SLURM account (a rule's resources.slurm_account wins)."},
    )
    array_max_size: int = field(
        default=1000,
        metadata={
            "help": "Most tasks per job array (keep <= the cluster's MaxArraySize - 1). "
            "1 submits one sbatch per job."
        },
    )
    array_parallelism: int = field(
        default=1000,
        metadata={"help": "Most tasks of one array running at once (sbatch --array=...%N)."},
    )
    timeout_requeues: int = field(
        default=0,
        metadata={
            "help": "How often a job warned of its time limit (submitit's USR2) is requeued with "
            "the same limit before it is left to time out; Snakemake then retries it with its "
            "attempt-scaled runtime. Preempted jobs are always requeued."
        },
    )
    signal_delay_s: int = field(
        default=90,
        metadata={"help": "Seconds before the time limit at which SLURM sends the USR2 warning."},
    )
    no_requeue: bool = field(
        default=False,
        metadata={"help": "Do not pass --requeue to sbatch (jobs hit by node failure or "
                  "preemption then fail and are retried by Snakemake instead)."},
    )
    sbatch_extra: Optional[str] = field(
        default=None,
        metadata={"help": "Extra sbatch options for every job, e.g. '--reservation=x'."},
    )
    setup: Optional[str] = field(
        default=None,
        metadata={"help": "Shell lines run in every job script before the job, separated by "
                  "';' or newlines (e.g. 'module load cuda')."},
    )
    python: Optional[str] = field(
        default=None,
        metadata={"help": "Python that runs submitit on the nodes (default: this interpreter)."},
    )
    local_gpus: Optional[str] = field(
        default=None,
        metadata={"help": "Local mode: GPU indices to hand out to jobs, e.g. '0,1' (default: "
                  "CUDA_VISIBLE_DEVICES or nvidia-smi)."},
    )
    keep_orphans: bool = field(
        default=False,
        metadata={"help": "Do not cancel jobs left running by a previous, killed Snakemake run "
                  "in this directory (by default they are cancelled: their outputs are "
                  "incomplete for Snakemake and will be recomputed)."},
    )


common_settings = CommonSettings(
    non_local_exec=True,
    implies_no_shared_fs=False,
    job_deploy_sources=False,
    pass_default_storage_provider_args=True,
    pass_default_resources_args=True,
    pass_envvar_declarations_to_cmd=True,
    auto_deploy_default_storage_provider=False,
    init_seconds_before_status_checks=1,
    pass_group_args=True,
)

REGISTRY_PATH = Path(".snakemake") / "submitit" / "active_jobs.json"


class Executor(RemoteExecutor):
    def __post_init__(self) -> None:
        s: ExecutorSettings = self.workflow.executor_settings or ExecutorSettings()
        setup = [line.strip() for line in (s.setup or "").replace(";", "\n").splitlines() if line.strip()]
        local_gpus = None
        if s.local_gpus:
            local_gpus = [int(x) for x in s.local_gpus.split(",") if x.strip()]
        try:
            self.backend = SubmititBackend(
                s.folder or ".snakemake/submitit",
                cluster=s.cluster or "auto",
                python=s.python,
                array_max_size=s.array_max_size,
                array_parallelism=s.array_parallelism,
                timeout_requeues=s.timeout_requeues,
                signal_delay_s=s.signal_delay_s,
                requeue=not s.no_requeue,
                setup=setup,
                sbatch_extra=s.sbatch_extra,
                local_gpus=local_gpus,
            )
        except ExecutorError as e:
            raise WorkflowError(str(e)) from e
        self.defaults = {}
        if s.partition:
            self.defaults["slurm_partition"] = s.partition
        if s.account:
            self.defaults["slurm_account"] = s.account
        self._backend_lock = threading.Lock()
        # every submitted, unfinished job (also those a status check has in hand right now,
        # which the base class's active_jobs list does not hold meanwhile)
        self._live: dict = {}
        self.registry = JobRegistry(REGISTRY_PATH)
        self._cancel_orphans(keep=s.keep_orphans)
        self.logger.info(f"submitit executor: {self.backend.describe()}")

    # -- a previous run killed without cancelling its jobs ------------------------------------
    def _cancel_orphans(self, keep: bool) -> None:
        orphans = self.registry.take_orphans()
        if not orphans or self.backend.cluster != "slurm":
            return
        alive = squeue_ids(orphans)
        alive = sorted(j for j in orphans if alive is None or j in alive)
        if not alive:
            return
        if keep:
            self.logger.warning(
                f"{len(alive)} job(s) of a previous run are still queued/running and are kept "
                f"(--submitit-keep-orphans): {', '.join(alive[:10])}{' ...' if len(alive) > 10 else ''}"
            )
            return
        self.logger.warning(
            f"cancelling {len(alive)} job(s) left queued/running by a previous Snakemake run that "
            f"was stopped without cancelling them: {', '.join(alive[:10])}"
            f"{' ...' if len(alive) > 10 else ''}"
        )
        scancel(alive)

    # -- submission ---------------------------------------------------------------------------
    def _request(self, job: JobExecutorInterface) -> JobRequest:
        resources = {k: v for k, v in job.resources.items() if not str(k).startswith("_")}
        return JobRequest.from_resources(
            f"smk-{job.name}", resources, threads=job.threads, defaults=self.defaults
        )

    @staticmethod
    def _label(job: JobExecutorInterface) -> str:
        wildcards = ""
        if not job.is_group():
            wc = getattr(job, "wildcards_dict", None) or {}
            if wc:
                wildcards = " " + ",".join(f"{k}={v}" for k, v in wc.items())
        return f"{job.name}{wildcards} (snakemake job {job.jobid}, attempt {job.attempt})"

    def run_job(self, job: JobExecutorInterface) -> None:
        self._submit([job])

    def run_jobs(self, jobs: List[JobExecutorInterface]) -> None:
        for job in jobs:
            self.run_job_pre(job)
        self._submit(list(jobs))

    def _submit(self, jobs: List[JobExecutorInterface]) -> None:
        items = []
        for job in jobs:
            try:
                request = self._request(job)
            except ExecutorError as e:
                self.report_job_error(SubmittedJobInfo(job), msg=str(e))
                continue
            items.append((job, self.format_job_exec(job), request, self._label(job)))
        if not items:
            return
        started = time.time()
        failure: Optional[ExecutorError] = None
        with self._backend_lock:
            before = self.backend.submissions
            try:
                handles = self.backend.submit(items)
            except ExecutorError as e:
                failure = e
                handles = getattr(e, "handles", [])
            n_submissions = self.backend.submissions - before
            self.registry.add(handles, label_of=lambda h: self._label(h.key))
            self._live.update((h.job_id, h) for h in handles)
        for h in handles:
            self.report_job_submission(
                SubmittedJobInfo(job=h.key, external_jobid=h.job_id, aux={"handle": h})
            )
        if handles:
            self.logger.info(
                f"submitit: {len(handles)} job(s) in {n_submissions} submission(s) "
                f"({time.time() - started:.2f}s): "
                + ", ".join(sorted({h.job_id.split('_')[0] for h in handles}))
            )
        if failure is not None:
            submitted = {id(h.key) for h in handles}
            for job, *_ in items:
                if id(job) not in submitted:
                    self.report_job_error(SubmittedJobInfo(job), msg=str(failure))

    # -- status ---------------------------------------------------------------------------------
    async def check_active_jobs(
        self, active_jobs: List[SubmittedJobInfo]
    ) -> AsyncGenerator[SubmittedJobInfo, None]:
        if not active_jobs:
            return
        handles = [info.aux["handle"] for info in active_jobs]
        async with self.status_rate_limiter:
            with self._backend_lock:
                statuses = self.backend.poll(handles)
        finished = []
        for info, h in zip(active_jobs, handles):
            status = statuses[id(h)]
            if status.kind == "active":
                yield info
                continue
            finished.append(h)
            if status.kind == "success":
                self.report_job_success(info)
            else:
                self.report_job_error(info, msg=status.message + "\n")
        if finished:
            with self._backend_lock:
                self.registry.remove(finished)
                for h in finished:
                    self._live.pop(h.job_id, None)

    # -- stopping -------------------------------------------------------------------------------
    def cancel_jobs(self, active_jobs: List[SubmittedJobInfo]) -> None:
        with self._backend_lock:
            handles = {info.aux["handle"].job_id: info.aux["handle"] for info in active_jobs if info.aux}
            handles.update(self._live)
            if handles:
                self.logger.info(f"submitit: cancelling {len(handles)} job(s)")
                self.backend.cancel(list(handles.values()))
                self.registry.remove(handles.values())
                self._live.clear()

    def shutdown(self) -> None:
        super().shutdown()
        with self.lock:
            still_active = bool(self.active_jobs)
        if not still_active and not self.workflow.remote_execution_settings.immediate_submit:
            self.registry.clear()
