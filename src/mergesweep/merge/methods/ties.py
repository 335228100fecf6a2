"""TIES-merging: trim, elect sign, disjoint merge.

    tau_i   = theta_i - theta_base
    trim    tau_i <- tau_i * [|tau_i| >= k-th largest |tau_i|],  k = floor(density_i * n)
    elect   gamma = sign(sum_i w_i tau_i)            (+1 where the sum is 0)
    merge   tau   = sum_i [sign(w_i tau_i) = gamma] w_i tau_i / sum_i [sign(w_i tau_i) = gamma] w_i
    theta   = theta_base + lambda * tau

(``normalize: false`` drops the division, giving a sign-filtered sum.)

Paper: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023
(arXiv:2306.01708).

Deviation: the paper keeps the top-k% of each task vector over the *whole model*; the default
``scope: tensor`` ranks magnitudes within each tensor, as mergekit does (so mergekit recipes
give the same model). ``scope: model`` follows the paper: the engine makes two extra streaming
passes to find each expert's exact whole-model magnitude threshold. Ties at the threshold are
all kept.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesweep.merge.methods._common import (
    check_weight_sum,
    density_param,
    elect_and_merge,
    global_topk_requests,
    lambda_param,
    magnitude_threshold,
    normalize_param,
    scope_param,
    weight_param,
)
from mergesweep.merge.select import blocks
from mergesweep.merge.spec import MethodSpec


def ties(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    lam: float = 1.0,
    normalize: bool = True,
    thresholds: Sequence[float] | None = None,
) -> torch.Tensor:
    """TIES on one tensor. ``thresholds`` (whole-model magnitude thresholds) replace per-tensor
    top-k when given."""
    if thresholds is None:
        thresholds = [magnitude_threshold(e, base, d) for e, d in zip(experts, densities)]
    out = torch.empty_like(base)
    o, b = out.view(-1), base.reshape(-1)
    flats = [e.reshape(-1) for e in experts]
    for sl in blocks(o.numel()):  # elementwise from here on: block by block, in cache
        bc = b[sl]
        deltas = []
        for e, thr in zip(flats, thresholds):
            d = e[sl] - bc
            if thr is not None:
                if thr == float("inf"):
                    d.zero_()
                else:  # keep |d| >= thr; a float mask (CPU boolean kernels are slow)
                    d.mul_(torch.ge(d.abs(), thr, out=torch.empty_like(d)))
            deltas.append(d)
        merged = elect_and_merge(deltas, weights, normalize)
        torch.add(bc, merged, alpha=lam, out=o[sl])
    return out


def _merge(base, experts, p, ctx):
    thresholds = ctx.stats.get("trim") if p["scope"] == "model" else None
    return ties(base, experts, p["weight"], p["density"], p["lambda"], p["normalize"], thresholds)


def _statistics(p, n):
    return global_topk_requests("trim", p["density"]) if p["scope"] == "model" else []


def _stat_values(stage, base, experts, p, ctx):
    return {"trim": [(e - base).abs_() for e in experts]}


SPEC = MethodSpec(
    name="ties",
    summary="trim small task-vector entries, elect a sign per entry, average the agreeing ones",
    paper="Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)",
    params=(weight_param(), density_param(0.2), lambda_param(), normalize_param(True), scope_param()),
    merge=_merge,
    base="required",
    statistics=_statistics,
    stat_values=_stat_values,
    validate=check_weight_sum,
    deviations="per-tensor top-k by default (scope: tensor, as mergekit); scope: model is the paper's whole-model top-k",
    doc=__doc__,
)
