"""What one job asks of the cluster, and how that maps onto submitit/sbatch parameters.

A :class:`JobRequest` is built from a plain mapping of resources (Snakemake's ``resources:``
names, see :data:`RESOURCE_NAMES`) so that this module never imports Snakemake. Jobs with equal
:meth:`JobRequest.signature` can share one SLURM job array: an array has one set of sbatch
parameters for all of its tasks.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
from typing import Any, Mapping

from mergesweep.errors import MergesweepError

log = logging.getLogger(__name__)

#: Resource names understood here (Snakemake ``resources:`` / ``set-resources`` /
#: ``default-resources`` keys). Anything else is ignored (Snakemake uses it for scheduling only).
RESOURCE_NAMES = {
    "slurm_partition": "sbatch --partition",
    "slurm_account": "sbatch --account",
    "slurm_qos": "sbatch --qos (also: qos)",
    "constraint": "sbatch --constraint",
    "runtime": "minutes, sbatch --time",
    "mem_mb": "MB per job, sbatch --mem",
    "mem_mb_per_cpu": "MB per CPU, sbatch --mem-per-cpu (wins over mem_mb)",
    "cpus_per_task": "sbatch --cpus-per-task (default: the job's threads)",
    "gpu": "number of GPUs, sbatch --gpus-per-node",
    "gpu_model": "GPU type, sbatch --gpus-per-node=<model>:<gpu>",
    "gres": "raw sbatch --gres (e.g. gpu:a100:2); use instead of gpu/gpu_model",
    "slurm_extra": "extra sbatch options, e.g. '--reservation=x --exclusive'",
}

#: sbatch options (in ``slurm_extra``) that ask for GPUs
GPU_OPTIONS = {"gpus", "gres", "gpus-per-node", "gpus-per-task", "gpus-per-socket"}


class ExecutorError(MergesweepError):
    """A job cannot be submitted (bad resource value, submission refused)."""


def parse_sbatch_options(text: str | None, *, where: str = "slurm_extra") -> dict[str, Any]:
    """Parse ``--key=value --flag -x v`` into submitit's ``additional_parameters`` mapping.

    Long options become ``{"key": "value"}``, bare flags ``{"flag": True}``. Short options are
    refused (their long names are unambiguous and submitit writes ``#SBATCH --key=value``).
    """
    out: dict[str, Any] = {}
    if not text:
        return out
    tokens = shlex.split(str(text))
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise ExecutorError(
                f"{where}: {tok!r} is not a long sbatch option (write --name=value, e.g. "
                f"--reservation=myres); got {text!r}"
            )
        key, eq, value = tok[2:].partition("=")
        if not key:
            raise ExecutorError(f"{where}: empty option name in {text!r}")
        if eq:
            out[key] = value
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            out[key] = tokens[i + 1]
            i += 1
        else:
            out[key] = True
        i += 1
    return out


def _int(resources: Mapping[str, Any], name: str, rule: str) -> int | None:
    value = resources.get(name)
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ExecutorError(
            f"resources.{name} of rule {rule!r} must be a number, got {value!r}"
        ) from None
    if number < 0:
        raise ExecutorError(f"resources.{name} of rule {rule!r} must be >= 0, got {value!r}")
    return int(number) if number == int(number) else int(number) + 1


def _str(resources: Mapping[str, Any], name: str) -> str | None:
    value = resources.get(name)
    if value is None:
        return None
    value = str(value).strip()
    return value or None


@dataclasses.dataclass(frozen=True)
class JobRequest:
    """Cluster resources of one job; frozen and hashable (see :meth:`signature`)."""

    name: str
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_min: int = 60
    cpus: int = 1
    mem_mb: int | None = None
    mem_mb_per_cpu: int | None = None
    gpus: int = 0
    gpu_model: str | None = None
    gres: str | None = None
    extra: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_resources(
        cls,
        name: str,
        resources: Mapping[str, Any],
        *,
        threads: int = 1,
        defaults: Mapping[str, Any] | None = None,
    ) -> "JobRequest":
        """Build a request from Snakemake-style resources; ``defaults`` fill missing keys.

        ``runtime`` is in minutes (Snakemake's unit); ``mem_mb`` in megabytes.
        """
        merged: dict[str, Any] = dict(defaults or {})
        merged.update({k: v for k, v in resources.items() if v is not None})
        if "qos" in merged and "slurm_qos" not in merged:
            merged["slurm_qos"] = merged["qos"]
        cpus = _int(merged, "cpus_per_task", name) or max(1, int(threads or 1))
        extra = parse_sbatch_options(_str(merged, "slurm_extra"), where=f"resources.slurm_extra of {name!r}")
        for forbidden in ("array", "output", "error", "signal", "open-mode", "wrap"):
            if forbidden in extra:
                raise ExecutorError(
                    f"resources.slurm_extra of {name!r}: --{forbidden} is managed by the executor"
                )
        gpus = _int(merged, "gpu", name) or 0
        gres = _str(merged, "gres")
        if gres and gpus:
            raise ExecutorError(
                f"rule {name!r} sets both resources.gres ({gres!r}) and resources.gpu ({gpus}); "
                "use one of them"
            )
        return cls(
            name=name,
            partition=_str(merged, "slurm_partition"),
            account=_str(merged, "slurm_account"),
            qos=_str(merged, "slurm_qos"),
            constraint=_str(merged, "constraint"),
            time_min=max(1, _int(merged, "runtime", name) or 60),
            cpus=cpus,
            mem_mb=_int(merged, "mem_mb", name),
            mem_mb_per_cpu=_int(merged, "mem_mb_per_cpu", name),
            gpus=gpus,
            gpu_model=_str(merged, "gpu_model"),
            gres=gres,
            extra=tuple(sorted(extra.items())),
        )

    @property
    def asks_gpu(self) -> bool:
        """Whether SLURM is asked for GPUs (``gpu``, ``gres`` or a GPU option in ``slurm_extra``)."""
        if self.gpus or self.gres:
            return True
        return any(key in GPU_OPTIONS for key, _ in self.extra)

    def signature(self) -> "JobRequest":
        """Jobs with equal signatures can be tasks of one array (the request is its own key)."""
        return self

    def slurm_parameters(self) -> dict[str, Any]:
        """Keyword arguments for ``submitit.SlurmExecutor.update_parameters``."""
        params: dict[str, Any] = {
            "job_name": self.name,
            "time": self.time_min,
            "cpus_per_task": self.cpus,
            "ntasks_per_node": 1,
            "nodes": 1,
        }
        if self.partition:
            params["partition"] = self.partition
        if self.account:
            params["account"] = self.account
        if self.qos:
            params["qos"] = self.qos
        if self.constraint:
            params["constraint"] = self.constraint
        if self.mem_mb_per_cpu:
            params["mem_per_cpu"] = f"{self.mem_mb_per_cpu}M"
        elif self.mem_mb:
            params["mem"] = f"{self.mem_mb}M"
        if self.gpus:
            params["gpus_per_node"] = f"{self.gpu_model}:{self.gpus}" if self.gpu_model else self.gpus
        if self.gres:
            params["gres"] = self.gres
        if self.extra:
            params["additional_parameters"] = dict(self.extra)
        return params

    def local_parameters(self) -> dict[str, Any]:
        """Keyword arguments for ``submitit.LocalExecutor.update_parameters``."""
        return {"timeout_min": self.time_min, "gpus_per_node": self.gpus}

    def describe(self) -> str:
        parts = [f"time={self.time_min}min", f"cpus={self.cpus}"]
        if self.mem_mb_per_cpu:
            parts.append(f"mem-per-cpu={self.mem_mb_per_cpu}M")
        elif self.mem_mb:
            parts.append(f"mem={self.mem_mb}M")
        if self.gpus:
            parts.append(f"gpus={self.gpu_model + ':' if self.gpu_model else ''}{self.gpus}")
        if self.gres:
            parts.append(f"gres={self.gres}")
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(self, key):
                parts.append(f"{key}={getattr(self, key)}")
        return " ".join(parts)
