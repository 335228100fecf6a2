"""Model Breadcrumbs: drop both the largest outliers and the small entries of each task vector.

Per tensor, with n entries ranked by magnitude (largest first):

    n_top  = floor(gamma * n)      largest entries removed (outliers)
    n_keep = floor(density * n)    next entries kept; the remaining smallest are removed
    m_i    = [n_top < rank(|tau_i|) <= n_top + n_keep]
    theta  = theta_base + lambda * sum_i w_i m_i tau_i    [/ sum_i w_i if normalize]

Paper: Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks", ECCV 2024 (arXiv:2312.06795). The paper masks per layer, which per tensor is. Parameter
names as in mergekit: the paper's top fraction beta is ``gamma`` here and its kept fraction is
``density``; ``density + gamma <= 1``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesweep.errors import ConfigError
from mergesweep.merge.methods._common import (
    check_weight_sum,
    density_param,
    lambda_param,
    normalize_param,
    weight_param,
    weighted_sum,
)
from mergesweep.merge.select import count_for_fraction, kth_largest
from mergesweep.merge.spec import MethodSpec, Param


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """Boolean mask keeping ranks (n_top, n_top + n_keep] by magnitude; None = keep all."""
    n = delta.numel()
    n_top = count_for_fraction(gamma, n)
    n_keep = min(count_for_fraction(density, n), n - n_top)
    if n_top == 0 and n_keep >= n:
        return None
    mag = delta.abs()
    if n_keep <= 0:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
    keep = mag >= kth_largest(mag, n_top + n_keep)
    if n_top > 0:
        keep &= mag < kth_largest(mag, n_top)
    return keep


def breadcrumbs(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    lam: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    deltas = []
    for i, e in enumerate(experts):
        d = e - base
        mask = breadcrumbs_mask(d, densities[i], gammas[i])
        deltas.append(d if mask is None else d.mul_(mask))
    merged = weighted_sum(deltas, weights, normalize)
    del deltas
    return merged.mul_(lam).add_(base)


def _validate(p, n, has_base):
    check_weight_sum(p, n, has_base)
    for i, (d, g) in enumerate(zip(p["density"], p["gamma"])):
        if d + g > 1 + 1e-12:
            raise ConfigError(f"params.gamma: density + gamma must be <= 1 (expert {i}: density {d}, gamma {g})")


def _merge(base, experts, p, ctx):
    return breadcrumbs(base, experts, p["weight"], p["density"], p["gamma"], p["lambda"], p["normalize"])


SPEC = MethodSpec(
    name="breadcrumbs",
    summary="mask out the largest (gamma) and smallest task-vector entries per tensor, then add",
    paper="Davari & Belilovsky 2024, Model Breadcrumbs (arXiv:2312.06795)",
    params=(
        weight_param(),
        density_param(0.9, "fraction of entries kept (after removing the top gamma)"),
        Param("gamma", "float", 0.01, "fraction of largest-magnitude entries removed", per_expert=True,
              low=0.0, high=1.0),
        lambda_param(),
        normalize_param(False),
    ),
    merge=_merge,
    base="required",
    validate=_validate,
    doc=__doc__,
)
