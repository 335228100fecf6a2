"""Consensus task arithmetic with TALL masks.

    tau_i   = theta_i - theta_base,      tau_MTL = sum_i w_i tau_i    (the task-arithmetic vector)
    m_i     = [ |tau_i| >= mask_lambda_i * |tau_MTL - tau_i| ]        (TALL mask of task i)
    m_cons  = [ sum_i m_i >= k ]                                      (kept where >= k tasks use it)
    theta   = theta_base + lambda * m_cons * tau_MTL

``k: 2`` is the paper's consensus; ``k: 0`` gives plain task arithmetic and ``k: 1`` removes
only the entries no task claims ("selfish" weights are those with exactly one claimant).

Paper: Wang, Dimitriadis, Favero, Ortiz-Jimenez, Fleuret, Frossard, "Localizing Task
Information for Improved Model Merging and Compression", ICML 2024 (arXiv:2405.07813). The paper
picks each mask_lambda on the task's validation data; here it is a (per-expert) parameter to
sweep. The consensus is applied to the task-arithmetic vector (the paper's "Consensus TA").
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesweep.errors import ConfigError
from mergesweep.merge.methods._common import lambda_param, weight_param
from mergesweep.merge.spec import MethodSpec, Param


def tall_masks(deltas: Sequence[torch.Tensor], mtl: torch.Tensor, mask_lambdas: Sequence[float]) -> list[torch.Tensor]:
    return [d.abs() >= (mtl - d).abs_().mul_(lam) for d, lam in zip(deltas, mask_lambdas)]


def consensus(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    mask_lambdas: Sequence[float],
    k: int = 2,
    lam: float = 1.0,
) -> torch.Tensor:
    deltas = [e - base for e in experts]
    mtl = torch.zeros_like(base)
    for d, w in zip(deltas, weights):
        mtl.add_(d, alpha=float(w))
    if k > 0:
        votes = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
        for m in tall_masks(deltas, mtl, mask_lambdas):
            votes += m
        mtl.mul_(votes >= k)
    del deltas
    return mtl.mul_(lam).add_(base)


def _validate(p, n, has_base):
    if p["k"] > n:
        raise ConfigError(f"params.k: {p['k']} is more than the number of experts ({n}); nothing would be kept")


def _merge(base, experts, p, ctx):
    return consensus(base, experts, p["weight"], p["mask_lambda"], p["k"], p["lambda"])


SPEC = MethodSpec(
    name="consensus",
    summary="task arithmetic restricted to entries that at least k experts' TALL masks select",
    paper="Wang et al. 2024, Localizing Task Information (TALL masks / Consensus TA, arXiv:2405.07813)",
    params=(
        weight_param(),
        Param("mask_lambda", "float", 0.4, "TALL-mask threshold lambda_t of each expert", per_expert=True, low=0.0),
        Param("k", "int", 2, "minimum number of experts whose mask selects an entry", low=0),
        lambda_param(),
    ),
    merge=_merge,
    base="required",
    validate=_validate,
    doc=__doc__,
)
