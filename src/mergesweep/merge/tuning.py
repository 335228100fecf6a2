"""Process-wide tuning for a merge *command* (never applied by the library itself).

The engine (:func:`mergesweep.merge.engine.merge_checkpoints`) changes no process-wide setting:
a program that embeds it keeps its torch threads and its allocator. ``mergesweep merge`` calls
:func:`tune_for_merge` before merging, because both settings matter a lot to the streaming
engine's speed:

* **torch intra-op threads**: the engine already reads, computes and writes in three threads, and
  its block-wise kernels issue many small ops, for which OpenMP fork/join costs more than it
  gains: on a busy 2-core machine a TIES merge of SmolLM2-135M took 40 s with one intra-op
  thread and 370 s with two. Default on CPU: :data:`DEFAULT_CPU_THREADS`.
* **glibc malloc**: by default every block above 32 MB is a fresh ``mmap`` whose pages fault in
  on first touch, which makes elementwise float32 kernels on embedding-sized tensors 3-7x slower
  than the arithmetic (:func:`tune_malloc`).
"""

from __future__ import annotations

import ctypes
import os
import platform

from mergesweep.errors import ConfigError

#: torch intra-op threads for a CPU merge unless told otherwise
DEFAULT_CPU_THREADS = 1

_MALLOC_TUNED = False


def tune_malloc() -> bool:
    """Let glibc recycle large freed blocks instead of returning them to the OS (process-wide).

    Raises ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to 1 GiB once per process; peak RSS is
    unchanged. Opt out with ``MERGESWEEP_MALLOC_TUNING=0``. Returns whether the settings apply
    (false on other C libraries and platforms).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if os.environ.get("MERGESWEEP_MALLOC_TUNING", "1") == "0" or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    except (OSError, AttributeError):  # not glibc
        return False
    _MALLOC_TUNED = ok
    return ok


def merge_threads(device: str, threads: int | None = None) -> int | None:
    """The torch intra-op threads a merge on ``device`` should use: ``threads`` when given
    (checked), :data:`DEFAULT_CPU_THREADS` on CPU, else ``None`` (leave torch's default)."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads: expected a positive integer, got {threads!r}")
        return threads
    return DEFAULT_CPU_THREADS if str(device).startswith("cpu") else None


def tune_for_merge(device: str, threads: int | None = None) -> int | None:
    """Set torch's intra-op threads (:func:`merge_threads`) and :func:`tune_malloc`, for the rest
    of the process; returns the threads set (``None``: unchanged)."""
    n = merge_threads(device, threads)
    if n is not None:
        import torch

        torch.set_num_threads(n)
    tune_malloc()
    return n
