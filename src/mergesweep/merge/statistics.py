"""Whole-model statistics: the streaming passes a method's ``StatRequest``s need before merging.

A request is a maximum, a minimum, a sum or an exact k-th value over one quantity of every merged
tensor, per expert (a global top-k threshold, a global quantile, a global norm). Requests of one *stage* share
their passes; a later stage may use an earlier one's results (they are in ``ctx.stats``). ``max``,
``min`` and ``sum`` need one pass; ``kth`` two (:class:`mergesweep.merge.select.StreamingKth`: a
histogram of the high 16 bits of an order-preserving key locates the bucket of the wanted rank,
a second of the low 16 bits inside that bucket pins the value).
"""

from __future__ import annotations

import math
from contextlib import closing
from typing import Sequence

import torch
from tqdm.auto import tqdm

from mergesweep.merge.select import StreamingKth
from mergesweep.merge.spec import StatRequest
from mergesweep.merge.streaming import Streaming, prefetched
from mergesweep.merge.tensor_plan import TensorPlan


def whole_model_statistics(stream: Streaming, requests: Sequence[StatRequest],
                           plan: Sequence[TensorPlan]) -> dict[str, list[float]]:
    """``{request key: [value per expert]}`` over the merged tensors of ``plan``."""
    stats: dict[str, list[float]] = {}
    work = [tp for tp in plan if tp.merge]
    n = stream.n_experts
    for stage in sorted({r.stage for r in requests}):
        reqs = [r for r in requests if r.stage == stage]
        accs = {(r.key, i): StreamingKth(stream.device) for r in reqs for i in range(n)}
        sums = {(r.key, i): 0.0 for r in reqs if r.kind == "sum" for i in range(n)}
        _stream_pass(stream, stage, reqs, accs, work, stats, 1, sums)
        ranks = _locate_ranks(reqs, accs, n)
        if any(r.kind == "kth" for r in reqs):
            _stream_pass(stream, stage, reqs, accs, work, stats, 2)
        for r in reqs:
            stats[r.key] = [sums[(r.key, i)] if r.kind == "sum" else _value(r, accs[(r.key, i)], ranks.get((r.key, i)))
                            for i in range(n)]
    return stats


def _stream_pass(stream: Streaming, stage, reqs, accs, work, stats, pass_no: int, sums=None) -> None:
    """Feed every merged tensor's per-expert values of ``stage`` to the accumulators."""
    bar = tqdm(work, desc=f"{stream.spec.name}: statistics stage {stage} pass {pass_no}", leave=False,
               disable=None)
    with closing(prefetched(bar, stream.load)) as items:
        for tp, (base_t, exps) in items:
            values = stream.spec.stat_values(stage, base_t, exps, stream.kparams, stream.context(tp.name, stats, tp))
            for r in reqs:
                for i, v in enumerate(values[r.key]):
                    if v is None:
                        continue
                    if r.kind == "sum":
                        if pass_no == 1:
                            sums[(r.key, i)] += float(v.sum(dtype=torch.float64))
                    elif pass_no == 1:
                        accs[(r.key, i)].add_pass1(v)
                    elif r.kind == "kth":
                        accs[(r.key, i)].add_pass2(v)


def _locate_ranks(reqs, accs, n: int) -> dict[tuple[str, int], int]:
    """After pass 1: the wanted rank of each ``kth`` request and expert, its bucket located."""
    ranks: dict[tuple[str, int], int] = {}
    for r in reqs:
        if r.kind != "kth":
            continue
        for i in range(n):
            acc = accs[(r.key, i)]
            if not acc.count:
                continue
            rank = r.rank(acc.count, i)
            if 0 <= rank < acc.count:
                acc.locate(rank)
            ranks[(r.key, i)] = rank
    return ranks


def _value(r: StatRequest, acc: StreamingKth, rank: int | None) -> float:
    if r.kind == "max":
        return acc.max
    if r.kind == "min":
        return acc.min
    if rank is None or rank >= acc.count:  # nothing to rank, or a rank past the end: keep nothing
        return math.inf
    if rank < 0:  # keep everything
        return -math.inf
    return acc.result()
