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
)
from mergesweep.merge.select import blocks
from mergesweep.merge.spec import MethodSpec


def task_arithmetic(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    lam: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    wsum = float(sum(weights))
    scale = lam / wsum if normalize and abs(wsum) >= 1e-12 else lam
    out = torch.empty_like(base)
    o, b = out.view(-1), base.reshape(-1)
    flats = [e.reshape(-1) for e in experts]
    for sl in blocks(o.numel()):  # block by block: temporaries stay in cache
        bc = b[sl]
        acc = torch.sub(flats[0][sl], bc).mul_(float(weights[0]))
        for e, w in zip(flats[1:], weights[1:]):
            acc.add_(e[sl].sub(bc), alpha=float(w))
        torch.add(bc, acc, alpha=scale, out=o[sl])
    return out


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
