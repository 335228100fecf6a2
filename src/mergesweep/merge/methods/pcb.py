"""PCB-merging: parameter competition balancing.

With T experts, task vectors d_i = theta_i - theta_base (all flattened over the model), and the
quantile helpers q_i(x, r) = value of ascending rank floor(r * n) of x over expert i's entries:

    a_i     = clamp(|d_i|, q_i(|d_i|, c), q_i(|d_i|, 1 - c) )          c = clamp_ratio (1e-4)
    intra_i = exp(T * ((a_i - min a_i) / (max a_i - min a_i))^2)        intra-balancing
    inter_i = tanh(d_i * sum_j d_j)                                     inter-balancing
    b_i     = intra_i * inter_i
    s_i     = (max(b_i, q_i(b_i, 1 - density)) - q_i(b_i, 1 - density)) / (max b_i - q_i(b_i, 1 - density))
    tau     = sum_i s_i sign(d_i) a_i / max(sum_i s_i, 1e-12)
    theta   = theta_base + lambda * tau

so the lowest (1 - density) fraction of each expert's balancing scores is dropped (s_i = 0) and the
rest weight a normalised sum of the (outlier-clamped) task vectors.

Paper: Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024
(arXiv:2410.02396). The formulas above follow the authors' released implementation
(github.com/duguodong7/pcb-merging), which replaces the paper's Softmax/Norm by exp, tanh and
min-max normalisation; the evolutionary search of per-task lambdas is not included (lambda is a
parameter to sweep).

``scope: model`` (default, as the paper) takes min/max/quantiles over each expert's whole task
vector: the engine makes four extra streaming passes (two radix-select stages).
``scope: tensor`` takes them within each tensor (one pass, an approximation).
"""

from __future__ import annotations

from typing import Sequence

from mergesweep.merge.methods._common import all_of, density_param, lambda_param, scope_param, warn_zero_density
from mergesweep.merge.spec import Identity, MethodSpec, Param, StatRequest


def _rank(fraction: float, n: int) -> int:
    from mergesweep.merge.select import count_for_fraction

    return min(n - 1, count_for_fraction(fraction, n))


def _upper_rank(c: float, n: int) -> int:
    from mergesweep.merge.select import count_for_fraction

    # the reference implementation's max index: int(n * (1 - c)) - 1
    return max(0, min(n - 1, count_for_fraction(1.0 - c, n) - 1))


def _clamped_abs(d, lo: float, hi: float):
    return d.abs().clamp_(lo, hi)


def balancing_scores(deltas: Sequence, clamp_lo: Sequence[float], clamp_hi: Sequence[float]) -> list:
    """b_i = exp(T * norm(a_i)^2) * tanh(d_i * sum_j d_j) for each expert."""
    import torch

    t = len(deltas)
    total = torch.zeros_like(deltas[0])
    for d in deltas:
        total.add_(d)
    scores = []
    for d, lo, hi in zip(deltas, clamp_lo, clamp_hi):
        span = hi - lo
        if span > 0:
            intra = _clamped_abs(d, lo, hi).sub_(lo).div_(span).square_().mul_(t).exp_()
        else:
            intra = torch.ones_like(d)
        scores.append(intra.mul_(torch.tanh(d * total)))
    return scores


def pcb(base, experts: Sequence, densities: Sequence[float], lam: float = 1.0, clamp_ratio: float = 1e-4,
        stats: dict | None = None):
    """PCB on one float32 tensor; ``stats`` holds whole-model quantities (``scope: model``), else
    they are taken within this tensor."""
    import torch

    from mergesweep.merge.select import kth_smallest

    deltas = [e - base for e in experts]
    n = base.numel()
    if stats is None:
        lo = [float(kth_smallest(d.abs(), _rank(clamp_ratio, n))) for d in deltas]
        hi = [float(kth_smallest(d.abs(), _upper_rank(clamp_ratio, n))) for d in deltas]
    else:
        lo, hi = stats["abs_lo"], stats["abs_hi"]
    scores = balancing_scores(deltas, lo, hi)
    if stats is None:
        q = [float(kth_smallest(s, _rank(1.0 - dens, n))) for s, dens in zip(scores, densities)]
        top = [float(s.max()) for s in scores]
    else:
        q, top = stats["score_q"], stats["score_max"]
    num = torch.zeros_like(base)
    den = torch.zeros_like(base)
    for i, (d, s) in enumerate(zip(deltas, scores)):
        span = top[i] - q[i]
        if span > 0:
            s = s.clamp_(min=q[i]).sub_(q[i]).div_(span)
        else:
            s = torch.zeros_like(s)
        den.add_(s)
        num.add_(s.mul_(torch.sign(d)).mul_(_clamped_abs(d, lo[i], hi[i])))
    del deltas, scores
    return num.div_(den.clamp_(min=1e-12)).mul_(lam).add_(base)


def _merge(base, experts, p, ctx):
    stats = ctx.stats if p["scope"] == "model" else None
    return pcb(base, experts, p["density"], p["lambda"], p["clamp_ratio"], stats)


def _statistics(p, n_experts):
    if p["scope"] != "model":
        return []
    c = p["clamp_ratio"]
    dens = p["density"]
    return [
        StatRequest("abs_lo", "kth", 0, lambda n, i: _rank(c, n)),
        StatRequest("abs_hi", "kth", 0, lambda n, i: _upper_rank(c, n)),
        StatRequest("score_q", "kth", 1, lambda n, i: _rank(1.0 - dens[i], n)),
        StatRequest("score_max", "max", 1),
    ]


def _stat_values(stage, base, experts, p, ctx):
    deltas = [e - base for e in experts]
    if stage == 0:
        mags = [d.abs_() for d in deltas]
        return {"abs_lo": mags, "abs_hi": mags}
    scores = balancing_scores(deltas, ctx.stats["abs_lo"], ctx.stats["abs_hi"])
    return {"score_q": scores, "score_max": scores}


SPEC = MethodSpec(
    name="pcb",
    summary="parameter competition balancing: intra/inter-task scores, drop the low ones, weighted mean",
    paper="Du et al. 2024, Parameter Competition Balancing for Model Merging (arXiv:2410.02396)",
    params=(
        density_param(0.1, "fraction of entries kept per expert (the paper's ratio r)"),
        lambda_param(),
        Param("clamp_ratio", "float", 1e-4, "fraction of extreme magnitudes clamped at each end", low=0.0,
              high=0.5, high_open=True),
        scope_param("model"),
    ),
    merge=_merge,
    base="required",
    statistics=_statistics,
    stat_values=_stat_values,
    validate=all_of(lambda p, n, has_base: warn_zero_density(p, "pcb")),
    deviations="follows the authors' released implementation (exp/tanh/min-max normalisation) rather than the "
               "paper's Softmax notation, without its evolutionary search of per-task lambdas; `scope: model` "
               "(default) is the whole-model version, `scope: tensor` an approximation",
    doc=__doc__,
    formula="intra `exp(T norm(clamp|tau|)^2)` x inter `tanh(tau_i sum_j tau_j)` scores; drop the lowest "
            "`1 - density`; score-weighted mean",
    order_invariant=True,
    identities=(Identity({"lambda": 0.0}, "base", 3),),
)
