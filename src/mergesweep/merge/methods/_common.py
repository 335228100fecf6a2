"""Building blocks shared by the task-vector methods (all float32 tensor ops, no I/O)."""

from __future__ import annotations

from typing import Sequence

import torch

from mergesweep.errors import ConfigError
from mergesweep.merge.spec import Param, StatRequest
from mergesweep.merge.select import blocks, count_for_fraction, kth_smallest_of

# -- parameters shared by many methods, named as in mergekit ---------------------------------
def weight_param(default: float = 1.0) -> Param:
    return Param("weight", "float", default, "per-expert weight of the task vector", per_expert=True)


def density_param(default: float, help: str = "fraction of task-vector entries kept") -> Param:
    return Param("density", "float", default, help, per_expert=True, low=0.0, high=1.0)


def lambda_param(default: float = 1.0) -> Param:
    return Param("lambda", "float", default, "scaling of the merged task vector")


def normalize_param(default: bool) -> Param:
    return Param("normalize", "bool", default, "divide the merged task vector by the sum of (kept) weights")


def seed_param() -> Param:
    return Param("seed", "int", 0, "seed of the random masks (combined with tensor name and expert index)", low=0)


def rescale_param() -> Param:
    return Param("rescale", "bool", True, "rescale kept entries by 1/keep-probability")


def scope_param(default: str = "tensor") -> Param:
    return Param(
        "scope", "str", default,
        "where magnitudes are ranked: per tensor (as mergekit) or over the whole model (as the paper)",
        choices=("tensor", "model"),
    )


# -- kernels -----------------------------------------------------------------------------------
def task_vectors(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """tau_i = theta_i - theta_base."""
    return [e - base for e in experts]


def check_weight_sum(params: dict, n_experts: int, has_base: bool) -> None:
    if params.get("normalize") and abs(sum(params["weight"])) < 1e-12:
        raise ConfigError("params.weight: the weights sum to 0, so normalize: true cannot divide by them")


def weighted_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """sum_i w_i * d_i, divided by sum_i w_i when ``normalize`` (block by block)."""
    scale = 1.0
    if normalize:
        total = float(sum(weights))
        if abs(total) >= 1e-12:
            scale = 1.0 / total
    out = torch.empty_like(deltas[0])
    o = out.view(-1)
    flats = [d.reshape(-1) for d in deltas]
    for sl in blocks(o.numel()):
        oc = o[sl]
        torch.mul(flats[0][sl], float(weights[0]) * scale, out=oc)
        for d, w in zip(flats[1:], weights[1:]):
            oc.add_(d[sl], alpha=float(w) * scale)
    return out


def magnitude_threshold(expert: torch.Tensor, base: torch.Tensor, density: float) -> float | None:
    """The k-th largest ``|expert - base|``, k = floor(density * n), computed block by block
    without materialising the task vector. ``None``: keep everything; ``inf``: keep nothing."""
    e, b = expert.reshape(-1), base.reshape(-1)
    n = e.numel()
    k = count_for_fraction(density, n)
    if k >= n:
        return None
    if k <= 0:
        return float("inf")
    return float(kth_smallest_of(lambda s, t, step: (e[s:t:step] - b[s:t:step]).abs_(), n, n - k))


def elect_and_merge(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool
) -> torch.Tensor:
    """TIES "elect sign" + "disjoint merge".

    With ``s_i = w_i * d_i``: the elected sign is ``gamma = +1 where sum_i s_i >= 0 else -1``;
    entry ``i`` takes part where ``sign(s_i) == gamma`` (zeros never take part). The result is
    ``sum_i [agree_i] s_i`` divided, when ``normalize``, by ``sum_i [agree_i] w_i`` (1 where no
    expert agrees) - the weighted disjoint mean of the TIES paper.

    With non-negative weights this runs on float arithmetic only (CPU boolean kernels are slow):
    ``relu(gamma * d_i)`` is ``|d_i|`` where expert i agrees and 0 elsewhere, so
    ``num = gamma * sum_i w_i relu(gamma d_i)`` and ``den = sum_i w_i sign(relu(gamma d_i))``.
    """
    ws = [float(w) for w in weights]
    if any(w < 0 for w in ws):
        return _elect_and_merge_signed(deltas, ws, normalize)
    total = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, ws):
        total.add_(d, alpha=w)
    gamma = torch.ones_like(total).copysign_(total)  # +1 where the sum is +0
    del total
    num = torch.zeros_like(gamma)
    den = torch.zeros_like(gamma) if normalize else None
    for d, w in zip(deltas, ws):
        if w == 0.0:
            continue
        agreeing = torch.mul(d, gamma).relu_()
        num.add_(agreeing, alpha=w)
        if den is not None:
            den.add_(agreeing.sign_(), alpha=w)
    num.mul_(gamma)
    if den is not None:
        positive = [w for w in ws if w > 0]
        if positive:
            # den is 0 exactly where num is 0; any sum of kept weights is >= the smallest weight
            num.div_(den.clamp_min_(min(positive)))
    return num


def _elect_and_merge_signed(deltas: Sequence[torch.Tensor], ws: Sequence[float], normalize: bool) -> torch.Tensor:
    total = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, ws):
        total.add_(d, alpha=w)
    sign = torch.where(total >= 0, 1.0, -1.0)
    del total
    out = torch.zeros_like(deltas[0])
    den = torch.zeros_like(deltas[0]) if normalize else None
    for d, w in zip(deltas, ws):
        if w == 0.0:
            continue
        prod = d * sign  # sign(w * d) == gamma  <=>  w * d * gamma > 0
        agree = (prod > 0 if w > 0 else prod < 0).to(d.dtype)
        del prod
        out.addcmul_(d, agree, value=w)
        if den is not None:
            den.add_(agree, alpha=w)
    if den is not None:
        den.masked_fill_(den == 0, 1.0)
        out.div_(den)
    return out


def global_topk_requests(key: str, densities: Sequence[float]) -> list[StatRequest]:
    """A whole-model "k-th largest magnitude" per expert, k = floor(density * n)."""

    def rank(n: int, i: int) -> int:
        return n - count_for_fraction(densities[i], n)  # ascending rank of the k-th largest

    return [StatRequest(key, "kth", 0, rank)]


def random_keep_mask(shape, keep_prob: float, generator: torch.Generator, device) -> torch.Tensor:
    """Bernoulli(keep_prob) mask drawn on the CPU from ``generator`` (reproducible), on ``device``."""
    u = torch.rand(shape, generator=generator, dtype=torch.float32)
    return (u < keep_prob).to(device)
