"""Task arithmetic: add scaled task vectors to the base.

    tau_i = theta_i - theta_base
    theta = theta_base + lambda * sum_i w_i * tau_i            (normalize: false, the default)
    theta = theta_base + lambda * sum_i w_i * tau_i / sum_i w_i (normalize: true)

Paper: Ilharco et al., "Editing models with task arithmetic", ICLR 2023 (arXiv:2212.04089).
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesweep.merge.methods._common import (
    check_weight_sum,
    lambda_param,
    normalize_param,
    weight_param,
    weighted_sum,
)
from mergesweep.merge.spec import MethodSpec


def task_arithmetic(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    lam: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    out = torch.zeros_like(base)
    for e, w in zip(experts, weights):
        out.add_(e, alpha=float(w))
    wsum = float(sum(weights))
    # sum_i w_i (e_i - b) = sum_i w_i e_i - (sum_i w_i) b, computed without per-expert copies
    out.sub_(base, alpha=wsum)
    if normalize and abs(wsum) >= 1e-12:
        out.div_(wsum)
    return out.mul_(lam).add_(base)


def _merge(base, experts, p, ctx):
    return task_arithmetic(base, experts, p["weight"], p["lambda"], p["normalize"])


SPEC = MethodSpec(
    name="task_arithmetic",
    summary="base + lambda * weighted sum of task vectors",
    paper="Ilharco et al. 2023, Editing models with task arithmetic (arXiv:2212.04089)",
    params=(weight_param(), lambda_param(), normalize_param(False)),
    merge=_merge,
    base="required",
    validate=check_weight_sum,
    doc=__doc__,
)
