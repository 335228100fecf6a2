"""Streaming inputs: one output tensor's inputs, read as float32 on the compute device, one
tensor ahead of the kernel.

:class:`Streaming` is what the statistics passes (:mod:`mergesweep.merge.statistics`) and the
merge loop (:mod:`mergesweep.merge.engine`) share: the method, its kernel parameters, the
inputs' loader and the per-tensor :class:`~mergesweep.merge.context.TensorContext`.
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from mergesweep.checkpoints.layout import CheckpointReader
from mergesweep.errors import MergeError
from mergesweep.merge.context import TensorContext
from mergesweep.merge.names import layer_index
from mergesweep.merge.spec import MethodSpec
from mergesweep.merge.tensor_plan import TensorPlan


def nonfinite(t: torch.Tensor) -> str | None:
    """``"NaN"``/``"inf"`` if ``t`` has such values, else None. One summing pass; the exact check
    runs only when the sum is not finite (NaN/inf present, or a float32 overflow)."""
    if t.numel() == 0 or math.isfinite(float(t.sum(dtype=torch.float32))):
        return None
    if bool(torch.isnan(t).any()):
        return "NaN"
    if bool(torch.isinf(t).any()):
        return "inf"
    return None


class TensorLoader:
    """Reads one input's tensor for an output tensor as float32 on the device: vocabulary rows
    cropped or padded (from the reference), the alignment map applied, values checked finite."""

    def __init__(self, reference: CheckpointReader, inputs: Sequence[CheckpointReader | None],
                 device: torch.device, align_maps: Mapping[int, Any], config: Mapping[str, Any]):
        self.reference = reference
        self.inputs = list(inputs)  # [base or None, experts...]
        self.ref_slot = next(i for i, inp in enumerate(self.inputs) if inp is reference)
        self.device = device
        self.align_maps = align_maps  # {expert index: perm map}
        self.config = config

    def load(self, tp: TensorPlan, slot: int) -> torch.Tensor:
        inp = self.inputs[slot]
        src = tp.sources[slot]
        t = inp.get(src.name)
        if t.dtype != torch.float32:
            t = t.to(torch.float32)
        if src.rows is not None:
            have = t.shape[0]
            if have > src.rows:
                t = t[: src.rows]
            elif have < src.rows:  # vocab_policy base: the reference's rows (it is the base)
                fill = self.reference.get(tp.sources[self.ref_slot].name)[have : src.rows].to(torch.float32)
                t = torch.cat([t, fill], dim=0)
        expert = slot - 1
        if expert in self.align_maps:
            from mergesweep.align.apply import permute_tensor

            t = permute_tensor(tp.name, t, self.align_maps[expert], self.config)
            if tuple(t.shape) != tuple(tp.shape):
                raise MergeError(f"{inp.label}: alignment changed the shape of '{tp.name}' to {list(t.shape)}")
        t = t.to(self.device)
        bad = nonfinite(t)
        if bad:
            raise MergeError(f"{inp.label}: tensor '{src.name}' in {inp.path} contains {bad} values")
        return t


@dataclass
class Streaming:
    """One merge's method, kernel parameters and inputs, as the streaming passes need them."""

    spec: MethodSpec
    kparams: dict
    n_experts: int
    num_layers: int | None
    seed: int
    device: torch.device
    loader: TensorLoader
    uses_base: bool  # the method reads the base (and one was given)
    stats_readers: list | None = None  # per expert: StatsReader of the stats stage (data-aware methods)
    stats_kinds: tuple = ()

    def context(self, name: str, stats: dict, tp: TensorPlan | None = None) -> TensorContext:
        ctx = TensorContext(name, self.n_experts, layer_index(name), self.num_layers, self.seed, stats,
                            self.device)
        if self.stats_readers:
            ctx.expert_stats = self.expert_stats(name, tp)
        return ctx

    def expert_stats(self, name: str, tp: TensorPlan | None) -> dict:
        """``{kind: [statistic or None per expert]}`` for output tensor ``name`` (each expert's own
        name for it: a tied head's statistics are its embedding's); ``gram`` comes with
        ``gram_count``. A statistic whose shape does not fit the tensor is a MergeError."""
        out: dict = {}
        for kind in self.stats_kinds:
            vals, counts = [], []
            for i, r in enumerate(self.stats_readers):
                src = tp.sources[i + 1].name if tp is not None and tp.sources[i + 1] is not None else name
                t = r.get(kind, src, self.device)
                if t is not None and tp is not None:
                    want = (tp.shape[1], tp.shape[1]) if kind == "gram" else tuple(tp.shape)
                    if len(tp.shape) < 2 and kind == "gram" or tuple(t.shape) != want:
                        raise MergeError(f"{r.label}: '{kind}/{src}' in {r.path} has shape {list(t.shape)}, but "
                                         f"tensor '{name}' needs {list(want)} (statistics of another architecture?)")
                vals.append(t)
                if kind == "gram":
                    c = r.count(src)
                    counts.append(None if c is None else torch.tensor([c], dtype=torch.float32, device=self.device))
            out[kind] = vals
            if kind == "gram":
                out["gram_count"] = counts
        return out

    def load(self, tp: TensorPlan, needed: Iterable[int] | None = None):
        """``(base tensor or None, [expert tensors])``; experts not in ``needed`` are ``None``."""
        keep = None if needed is None else set(needed)
        base_t = self.loader.load(tp, 0) if self.uses_base else None
        exps = [self.loader.load(tp, i + 1) if keep is None or i in keep else None for i in range(self.n_experts)]
        return base_t, exps


def prefetched(items: Iterable, load: Callable, depth: int = 1) -> Iterator[tuple[Any, Any]]:
    """Yield ``(item, load(item))`` with ``load`` running one item ahead in a background thread
    (reads, dtype conversion and input checks overlap the kernel). Exceptions are re-raised in
    the caller, in order; closing the generator early stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put((item, load(item), None))
        except BaseException as e:  # handed to the consumer
            q.put((None, None, e))
            return
        q.put((done, None, None))

    thread = threading.Thread(target=work, name="mergesweep-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, value, err = q.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item, value
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()
