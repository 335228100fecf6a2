"""What a kernel is told about the tensor it merges (name, layer, statistics, randomness).

This module imports torch; :mod:`mergesweep.merge.spec` and the method registry do not, so
building a workflow plan (which only validates parameters) never loads torch. Kernels and the
engine import :class:`TensorContext` and :func:`seeded_generator` from here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch


@dataclass
class TensorContext:
    """What a kernel may know beyond the tensors: name, layer, global statistics, randomness."""

    name: str
    n_experts: int
    layer: int | None = None
    num_layers: int | None = None
    seed: int = 0
    stats: dict = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: per-expert statistics of the ``stats`` stage for this tensor: ``{kind: [tensor or None per
    #: expert]}`` (float32 on ``device``), for methods that declare ``MethodSpec.data_stats``
    expert_stats: dict = field(default_factory=dict)

    def stats_of(self, kind: str) -> list | None:
        """``expert_stats[kind]`` when any expert has it for this tensor (then every expert must:
        MergeError otherwise), else None (the tensor has no such statistic: a method's fallback)."""
        vals = self.expert_stats.get(kind)
        if vals is None or all(v is None for v in vals):
            return None
        missing = [i for i, v in enumerate(vals) if v is None]
        if missing:
            from mergesweep.errors import MergeError

            have = [i for i, v in enumerate(vals) if v is not None]
            raise MergeError(
                f"tensor '{self.name}': the statistics of expert(s) {', '.join(map(str, missing))} have no '{kind}' "
                f"for it, those of expert(s) {', '.join(map(str, have))} do (statistics of different models or "
                "settings?)")
        return list(vals)

    def generator(self, expert: int) -> torch.Generator:
        """A CPU generator seeded from (seed, tensor name, expert index).

        Random masks are always drawn on the CPU from this generator (then moved to the compute
        device), so a merge is bit-identical across runs, thread counts and devices.
        """
        return seeded_generator(self.seed, self.name, expert)


def seeded_generator(seed: int, name: str, expert: int) -> torch.Generator:
    """A CPU generator seeded with the first 63 bits of ``sha256(seed, name, expert)``."""
    digest = hashlib.sha256(f"{int(seed)}\x00{name}\x00{int(expert)}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g
