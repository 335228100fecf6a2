"""Which torch device and training precision a stage uses: one resolver for every stage.

``auto`` is CUDA when this process may use a GPU, else the CPU:

* torch sees a CUDA device (``torch.cuda.is_available()``), and
* under SLURM (``SLURM_JOB_ID`` set) the job was *allocated* GPUs: ``CUDA_VISIBLE_DEVICES``,
  ``SLURM_JOB_GPUS``, ``SLURM_STEP_GPUS`` or ``SLURM_GPUS_ON_NODE`` is non-empty (and not
  ``-1``/``NoDevFiles``; a GPU count of ``0``). On a cluster without device cgroups every GPU of the node is
  visible to torch; ``auto`` never takes one the job did not ask for.

An explicit ``cuda``/``cuda:N``/``mps`` is the user's choice and is honoured when the device
exists (with a warning under SLURM when the job was allocated no GPU); otherwise a
:class:`~mergesweep.errors.DeviceError` names the option and what this machine has.

torch is imported inside the functions only: importing this module is cheap (the workflow's plan
checks spellings with :func:`check_device_spelling` without loading torch).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Mapping

from mergesweep.errors import DeviceError

log = logging.getLogger(__name__)

#: device spellings accepted by every stage (``cuda:N`` any index)
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
#: training precisions: ``auto`` = bf16 autocast on a CUDA device that supports it, else fp32
PRECISIONS = ("auto", "fp32", "bf16")
_PRECISION_ALIASES = {"auto": "auto", "fp32": "fp32", "float32": "fp32", "float": "fp32",
                      "bf16": "bf16", "bfloat16": "bf16"}
#: environment variables that say a SLURM job was allocated GPUs (any one non-empty suffices)
SLURM_GPU_VARS = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE")
_NO_GPU_VALUES = {"", "-1", "nodevfiles", "none"}


def check_device_spelling(value, key: str = "device") -> str:
    """``value`` if it is a device spelling (exactly, lower case), else DeviceError naming ``key``.
    Needs no torch; says nothing about whether the device exists."""
    spec = value if isinstance(value, str) else None
    if spec is None or not DEVICE_RE.fullmatch(spec):
        raise DeviceError(f"{key}: {value!r} is not a device (expected one of {DEVICE_CHOICES})")
    return spec


def slurm_gpus_allocated(environ: Mapping[str, str] | None = None) -> bool | None:
    """Under SLURM: whether the job was allocated GPUs; ``None`` outside SLURM (no job id)."""
    env = os.environ if environ is None else environ
    if not env.get("SLURM_JOB_ID"):
        return None
    for var in SLURM_GPU_VARS:
        v = str(env.get(var, "")).strip().lower()
        if v in _NO_GPU_VALUES or (var == "SLURM_GPUS_ON_NODE" and v == "0"):  # a count there, an index elsewhere
            continue
        return True
    return False


def _has_cuda() -> tuple[bool, int]:
    import torch

    if not torch.cuda.is_available():
        return False, 0
    return True, torch.cuda.device_count()


def _machine_has() -> str:
    """What this machine offers, for error messages."""
    import torch

    ok, n = _has_cuda()
    if ok:
        return f"this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})"
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    why = "no CUDA device is visible" if torch.version.cuda else "torch cannot use CUDA"
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    extra = f", CUDA_VISIBLE_DEVICES={cvd!r}" if cvd is not None else ""
    return f"{why} on this machine (torch {torch.__version__}, {build}{extra})"


def resolve_device(spec: str, key: str = "device", environ: Mapping[str, str] | None = None) -> str:
    """``auto``/``cpu``/``cuda``/``cuda:N``/``mps`` -> the device this process uses: ``"cpu"``,
    ``"cuda"``, ``"cuda:N"`` or ``"mps"``. ``auto`` never picks MPS (CPU instead) and never a GPU a
    SLURM job was not allocated. Raises DeviceError naming ``key`` (the option or config key) for
    a misspelling or a device this machine lacks."""
    spec = check_device_spelling(spec, key)
    env = os.environ if environ is None else environ
    allocated = slurm_gpus_allocated(env)
    if spec == "cpu":
        return "cpu"
    if spec == "auto":
        if allocated is False:
            return "cpu"
        ok, n = _has_cuda()
        return "cuda" if ok and n > 0 else "cpu"
    if spec == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise DeviceError(f"{key}: 'mps' requested but MPS is not available on this machine "
                              f"(torch {torch.__version__})")
        return "mps"
    ok, n = _has_cuda()
    if not ok or n == 0:
        raise DeviceError(f"{key}: {spec!r} requested but {_machine_has()}")
    _, _, index = spec.partition(":")
    if index and int(index) >= n:
        raise DeviceError(f"{key}: {spec!r} requested but this machine has {n} CUDA device(s) "
                          f"(cuda:0..cuda:{n - 1})")
    if allocated is False:
        log.warning("%s: %s requested but this SLURM job (%s) was allocated no GPU (%s are empty); using it anyway",
                    key, spec, env.get("SLURM_JOB_ID"), ", ".join(SLURM_GPU_VARS))
    return spec


def canonical_precision(value, key: str = "precision") -> str:
    """``auto`` | ``fp32`` | ``bf16`` (``float32``/``bfloat16`` accepted), else DeviceError."""
    name = value.strip().lower() if isinstance(value, str) else None
    if name not in _PRECISION_ALIASES:
        raise DeviceError(f"{key}: {value!r} is not a precision (expected one of {', '.join(PRECISIONS)})")
    return _PRECISION_ALIASES[name]


def autocast_dtype(device: str, precision: str, key: str = "precision"):
    """The dtype to autocast training's forward pass to on (resolved) ``device``, or ``None`` for
    plain float32. ``auto``: bfloat16 on a CUDA device that supports it, else ``None``;
    ``fp32``: ``None``; ``bf16``: bfloat16 (CUDA with bf16 support, or the CPU's autocast),
    DeviceError elsewhere."""
    import torch

    p = canonical_precision(precision, key)
    kind = str(device).split(":")[0]
    if p == "fp32":
        return None
    cuda_bf16 = kind == "cuda" and _cuda_bf16(device)
    if p == "auto":
        return torch.bfloat16 if cuda_bf16 else None
    if cuda_bf16 or kind == "cpu":
        return torch.bfloat16
    if kind == "cuda":
        raise DeviceError(f"{key}: 'bf16' requested but {device} ({_cuda_name(device)}) does not support bfloat16; "
                          "use fp32 or auto")
    raise DeviceError(f"{key}: 'bf16' autocast is not supported on device {device!r}; use fp32 or auto")


def precision_name(dtype) -> str:
    """What a run's :func:`autocast_dtype` means, for records: ``bf16`` or ``fp32``."""
    return "fp32" if dtype is None else str(dtype).replace("torch.", "").replace("bfloat16", "bf16")


def _cuda_bf16(device: str) -> bool:
    import torch

    with torch.cuda.device(torch.device(device)):
        return bool(torch.cuda.is_bf16_supported())


def _cuda_name(device: str) -> str:
    import torch

    try:
        return torch.cuda.get_device_name(torch.device(device))
    except Exception:  # pragma: no cover - only reached on a broken CUDA setup
        return "unknown GPU"


def device_info(device: str) -> dict:
    """What ran a stage, for records and logs: ``{"device", "name", "torch"}`` plus, on CUDA,
    ``capability`` (``"9.0"``), ``memory_gb``, ``cuda`` (runtime version) and the SLURM job id."""
    import platform

    import torch

    out: dict = {"device": str(device), "torch": torch.__version__}
    kind = str(device).split(":")[0]
    if kind == "cuda":
        dev = torch.device(device)
        props = torch.cuda.get_device_properties(dev)
        out.update(name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    elif kind == "mps":
        out["name"] = f"Apple MPS ({platform.machine()})"
    else:
        out["name"] = platform.processor() or platform.machine() or "cpu"
        out["threads"] = torch.get_num_threads()
    if os.environ.get("SLURM_JOB_ID"):
        out["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return out


def device_summary(device: str) -> str:
    """One line for logs and records: ``cuda (NVIDIA H200, capability 9.0, 139.8 GB)`` /
    ``cpu (x86_64, 1 thread)`` (from :func:`device_info`)."""
    s = device_info(device)
    if "capability" in s:
        return f"{s['device']} ({s['name']}, capability {s['capability']}, {s['memory_gb']} GB)"
    if "threads" in s:
        return f"{s['device']} ({s['name']}, {s['threads']} thread{'s' if s['threads'] != 1 else ''})"
    return f"{s['device']} ({s['name']})"
