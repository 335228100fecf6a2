"""Exact order statistics, fast: per tensor (sample-bracketed select) and over a whole model
(streaming two-pass radix select on float bit patterns).

``torch.kthvalue`` / ``torch.topk`` on a 28M-element embedding take over a second on one CPU
core; TIES needs one threshold per expert per tensor. :func:`kth_smallest` brackets the
target with a strided sample, counts exactly with one vectorised comparison, and runs
``kthvalue`` only on the few elements inside the bracket (falling back to a full ``kthvalue``
when the bracket misses, so the answer is always exact).

:class:`StreamingKth` finds the k-th smallest of values that arrive tensor by tensor without
keeping them: pass 1 builds a histogram of the top 16 bits of an order-preserving 32-bit key of
each float32, which locates the bucket holding rank k; pass 2 histograms the low 16 bits of the
elements in that bucket, which pins the exact value.
"""

from __future__ import annotations

import math
import struct
from typing import Callable

import numpy as np
import torch

_SMALL = 1 << 16
_SAMPLE = 1 << 14
_CHUNK = 1 << 22
CHUNK = 1 << 18  # elements per cache-sized block in chunked kernels (1 MiB of float32)


def blocks(n: int, size: int = CHUNK):
    """Slices covering ``range(n)`` in blocks of ``size`` (kernels work block by block so their
    temporaries stay in cache)."""
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def count_for_fraction(fraction: float, n: int) -> int:
    """``floor(fraction * n)`` robust to float noise (``0.29 * 100`` is 28.999999999999996)."""
    return max(0, min(n, int(math.floor(round(fraction * n, 6)))))


def kth_smallest(x: torch.Tensor, k: int) -> torch.Tensor:
    """Exact value of ascending rank ``k`` (0-based) of ``x`` (flattened), as a 0-d tensor."""
    flat = x.reshape(-1)
    return kth_smallest_of(lambda a, b, step: flat[a:b:step], flat.numel(), k)


def kth_smallest_of(values: Callable[[int, int, int], torch.Tensor], n: int, k: int,
                    chunk: int = CHUNK) -> torch.Tensor:
    """Exact ascending-rank-``k`` value of a virtual vector of ``n`` elements.

    ``values(start, stop, step)`` returns the elements at flat indices ``range(start, stop,
    step)`` (e.g. ``|e - b|`` computed on the fly), so nothing of size ``n`` is materialised:
    a strided sample brackets the target, then one chunked pass counts the elements below the
    bracket and collects those inside it.
    """
    if not 0 <= k < n:
        raise IndexError(f"rank {k} out of range for {n} elements")
    if n <= _SMALL:
        return torch.kthvalue(values(0, n, 1), k + 1).values
    stride = n // _SAMPLE
    sample = values(0, n, stride).contiguous()
    m = sample.numel()
    p = k / n
    pos = p * (m - 1)
    half = 4.0 * math.sqrt(m * p * (1 - p)) + 16
    i_lo, i_hi = max(0, int(pos - half)), min(m - 1, int(math.ceil(pos + half)))
    if sample.device.type == "cpu":
        part = np.partition(sample.numpy(), (i_lo, i_hi))  # O(m), no full sort
        lo, hi = torch.tensor(part[i_lo]), torch.tensor(part[i_hi])
    else:
        srt = torch.sort(sample).values
        lo, hi = srt[i_lo], srt[i_hi]
    below = 0
    inside = []
    if sample.device.type == "cpu":
        # numpy's comparisons and boolean indexing are several times faster than torch's on CPU
        lo_f, hi_f = float(lo), float(hi)
        for s in range(0, n, chunk):
            x = values(s, min(n, s + chunk), 1).numpy()
            below += int(np.count_nonzero(x < lo_f))
            inside.append(torch.from_numpy(x[(x >= lo_f) & (x <= hi_f)]))
    else:
        for s in range(0, n, chunk):
            x = values(s, min(n, s + chunk), 1)
            below += int(torch.count_nonzero(x < lo))
            inside.append(x[(x >= lo) & (x <= hi)])
    mid = torch.cat(inside)
    if below <= k < below + mid.numel():
        return torch.kthvalue(mid, k - below + 1).values
    return torch.kthvalue(values(0, n, 1), k + 1).values  # bracket missed (adversarial data)


def kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """Exact k-th largest (1-based: ``k=1`` is the maximum) of ``x``."""
    n = x.numel()
    return kth_smallest(x, n - k)


def topk_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor | None:
    """Boolean mask of the ``k`` largest entries (``>=`` the k-th largest; exact when values are
    distinct, ties at the threshold are all kept). ``None`` means "keep everything"."""
    n = magnitude.numel()
    if k >= n:
        return None
    if k <= 0:
        return torch.zeros(magnitude.shape, dtype=torch.bool, device=magnitude.device)
    return magnitude >= kth_largest(magnitude, k)


# --------------------------------------------------------------------------------------------
# streaming radix select
# --------------------------------------------------------------------------------------------
def order_keys(x: torch.Tensor) -> torch.Tensor:
    """Map float32 values to int64 keys in [0, 2**32) with the same order (NaN-free input)."""
    b = x.reshape(-1).to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    return torch.where(b >= 0, b + (1 << 31), -1 - b)


def key_to_float(key: int) -> float:
    bits = key - (1 << 31) if key >= (1 << 31) else -1 - key
    return struct.unpack("<f", struct.pack("<i", bits))[0]


class StreamingKth:
    """Exact k-th smallest over values streamed in two passes (see module docstring)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.high = torch.zeros(1 << 16, dtype=torch.int64, device=self.device)
        self.low = torch.zeros(1 << 16, dtype=torch.int64, device=self.device)
        self.count = 0
        self.max = -math.inf
        self.min = math.inf
        self._bucket: int | None = None
        self._rank_in_bucket: int | None = None

    def add_pass1(self, values: torch.Tensor) -> None:
        v = values.reshape(-1)
        if v.numel() == 0:
            return
        self.count += v.numel()
        lo, hi = torch.aminmax(v)
        self.max = max(self.max, float(hi))
        self.min = min(self.min, float(lo))
        for s in range(0, v.numel(), _CHUNK):
            keys = order_keys(v[s : s + _CHUNK])
            self.high += torch.bincount(keys >> 16, minlength=1 << 16)

    def locate(self, k: int) -> None:
        """After pass 1: find the bucket holding ascending rank ``k``."""
        cum = torch.cumsum(self.high, 0)
        bucket = int(torch.searchsorted(cum, torch.tensor(k, dtype=torch.int64, device=cum.device), right=True))
        before = int(cum[bucket - 1]) if bucket > 0 else 0
        self._bucket = bucket
        self._rank_in_bucket = k - before

    def add_pass2(self, values: torch.Tensor) -> None:
        v = values.reshape(-1)
        for s in range(0, v.numel(), _CHUNK):
            keys = order_keys(v[s : s + _CHUNK])
            sel = keys[(keys >> 16) == self._bucket]
            if sel.numel():
                self.low += torch.bincount(sel & 0xFFFF, minlength=1 << 16)

    def result(self) -> float:
        cum = torch.cumsum(self.low, 0)
        r = torch.tensor(self._rank_in_bucket, dtype=torch.int64, device=cum.device)
        low = int(torch.searchsorted(cum, r, right=True))
        return key_to_float((self._bucket << 16) | low)
