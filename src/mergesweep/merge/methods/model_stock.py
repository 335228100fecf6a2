"""Model Stock: interpolate between the base and the experts' average by an angle-derived ratio.

Per tensor (the paper's per-layer rule), with tau_i = theta_i - theta_base and N experts:

    cos   = mean over pairs i < j of <tau_i, tau_j> / (|tau_i| |tau_j|)
    t     = N cos / (1 + (N - 1) cos)
    theta = t * mean_i theta_i + (1 - t) * theta_base

``filter_wise: true`` computes cos and t per row (output unit) instead of per tensor.

Paper: Jang, Yun, Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024
(arXiv:2403.19522).

Conventions beyond the paper: cos is clamped to [0, 1] (the derivation assumes a non-negative
angle cosine; a negative one would give a negative or unbounded t), a zero task vector counts
as cos = 0 (t = 0, the base), and with a single expert t = 1 (the expert itself).
"""

from __future__ import annotations

from typing import Sequence

from mergesweep.merge.spec import Identity, MethodSpec, Param


def model_stock(base, experts: Sequence, filter_wise: bool = False):
    """Model Stock on one float32 tensor."""
    import torch

    n = len(experts)
    avg = torch.stack(list(experts)).mean(0) if n > 1 else experts[0].clone()
    if n == 1:
        return avg
    rowwise = filter_wise and base.dim() >= 2
    shape = (base.shape[0], -1) if rowwise else (1, -1)
    deltas = [(e - base).reshape(shape) for e in experts]
    norms = [torch.linalg.vector_norm(d, dim=1) for d in deltas]
    cos_sum = torch.zeros_like(norms[0])
    pairs = 0
    for i in range(n):
        for j in range(i + 1, n):
            den = norms[i] * norms[j]
            c = (deltas[i] * deltas[j]).sum(1) / den.clamp_min(1e-30)
            cos_sum += torch.where(den > 0, c, torch.zeros_like(c))
            pairs += 1
    cos = (cos_sum / pairs).clamp(0.0, 1.0)
    t = n * cos / (1 + (n - 1) * cos)
    if rowwise:
        t = t.reshape((-1,) + (1,) * (base.dim() - 1))
    else:
        t = t.reshape(())
    return torch.lerp(base, avg, t.to(base.dtype))


def _merge(base, experts, p, ctx):
    return model_stock(base, experts, p["filter_wise"])


SPEC = MethodSpec(
    name="model_stock",
    summary="base-to-average interpolation with a ratio from the angle between task vectors",
    paper="Jang et al. 2024, Model Stock (arXiv:2403.19522)",
    params=(Param("filter_wise", "bool", False, "compute the ratio per row instead of per tensor"),),
    merge=_merge,
    base="required",
    min_experts=1,
    deviations="the angle cosine is clamped to [0, 1] (the derivation assumes it non-negative); a zero task "
               "vector gives t = 0, a single expert t = 1; `filter_wise: true` works per row",
    doc=__doc__,
    formula="`t = N cos/(1 + (N-1) cos)`, `cos` = mean pairwise cosine of task vectors; `t avg + (1-t) theta_0`",
    order_invariant=True,
    identities=(Identity({}, "expert", 1),),
    mergekit="the cosine is clamped to [0, 1] (mergekit: [-1, 1], t = 0 where 1 + (N-1) cos is near 0); one "
             "expert is allowed (mergekit needs two)",
)
