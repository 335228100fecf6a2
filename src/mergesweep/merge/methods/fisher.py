"""Fisher merging: a per-entry average of the experts weighted by their diagonal Fisher information.

With ``F_i`` expert i's diagonal Fisher (the ``stats`` stage's ``fisher_model`` or ``fisher``, per
``fisher_target``), per-expert weights ``w_i`` and the floor ``eps`` (``minimal_fisher_weight``):

    F^_i  = max(F_i, eps)                       (normalize_fisher_weight: false, the default)
    F^_i  = max(F_i / ||F_i||, eps)             (normalize_fisher_weight: true; ||F_i||: the L2 norm of
                                                 expert i's Fisher over the whole model)
    theta = sum_i w_i F^_i theta_i / sum_i w_i F^_i        (every entry)

An entry no expert's Fisher sees (all ``F_i <= eps``) gets the weighted average of the experts; an
expert whose Fisher is 0 everywhere only contributes through the floor. Tensors without Fisher
statistics take the weighted average ``sum_i w_i theta_i / sum_i w_i`` (equal Fishers).

Paper: Matena, Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022
(arXiv:2111.09832). The base is not used: the paper averages the experts' weights (for weights
that sum to 1 over an entry, averaging the task vectors and adding them to a base is the same).

``fisher_target`` chooses the Fisher: ``model`` (``fisher_model``: log-likelihood gradients of
labels sampled from the model's own output distribution, a Monte Carlo estimate of the true
Fisher the paper uses; MergeBench's ``FisherTrainer`` default ``hard`` takes the model's argmax
prediction) or ``labels`` (``fisher``: the empirical Fisher of the calibration data's own next
tokens). Both are token-level means of squared gradients (the stats stage).

Names against MergeBench (``merging/merging_methods/fisher.py``) and MergeLM / FusionBench
(``fisher_merging``): ``weight`` is MergeLM's ``fisher_scaling_coefficients`` (default 1/n; here 1,
the scale cancels) and MergeBench's ``--model_coeff_value`` (one value for every expert, so it
cancels); ``normalize_fisher_weight`` and ``minimal_fisher_weight`` are MergeLM's names.
Departures: the floor is ``max(F, eps)`` as in the paper's code (``fisher_floor``, 1e-6), where
MergeLM adds it (``F + eps``) and MergeBench adds 1e-10; with ``normalize_fisher_weight``
MergeLM scales expert i by ``1 / (||F_i|| + eps)`` and adds ``eps`` to the raw Fisher, here the
Fisher is divided by its norm first and floored after (``eps`` then relative to a unit-norm
Fisher). MergeBench merges no embedding (keeps the base's ``model.embed*`` and ``lm_head``) and
does not normalise; here every tensor with a Fisher is Fisher-averaged.
"""

from __future__ import annotations

from typing import Sequence

from mergesweep.errors import ConfigError, MergeError
from mergesweep.merge.spec import Identity, MethodSpec, Param, StatRequest

#: the whole-model statistic: per expert, the sum of F_i^2 over every merged tensor
NORM_KEY = "fisher_sq"
TARGETS = {"model": "fisher_model", "labels": "fisher"}


def fisher_kind(p: dict) -> str:
    """The stats kind these parameters read: ``fisher_model`` or ``fisher``."""
    return TARGETS[p["fisher_target"]]


def fisher_merge(experts: Sequence, fishers: Sequence, weights: Sequence[float], floor: float,
                 norms: Sequence[float] | None = None, name: str = "tensor"):
    """``sum_i w_i F^_i theta_i / sum_i w_i F^_i`` per entry, ``F^_i = max(F_i / norms[i], floor)``
    (``norms`` None: no division; a norm of 0 leaves that Fisher as it is). Float64 arithmetic,
    block by block; float32 result."""
    import torch

    from mergesweep.merge.select import blocks

    if not floor > 0:
        raise ValueError(f"fisher_merge: the floor must be > 0, got {floor!r}")
    if any(w < 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"fisher_merge: weights must be >= 0 with a positive sum, got {list(weights)}")
    out = torch.empty_like(experts[0], dtype=torch.float32)
    o = out.view(-1)
    flats = [e.reshape(-1) for e in experts]
    fflats = [f.reshape(-1) for f in fishers]
    for i, (e, f) in enumerate(zip(flats, fflats)):
        if f.numel() != e.numel():
            raise MergeError(f"tensor '{name}': expert {i}'s Fisher has {f.numel()} entries, the tensor {e.numel()}")
    scales = [1.0 if (norms is None or not norms[i] > 0) else 1.0 / float(norms[i]) for i in range(len(experts))]
    f64 = torch.float64
    for sl in blocks(o.numel()):
        num = den = None
        for i, (e, f, w) in enumerate(zip(flats, fflats, weights)):
            if w == 0:
                continue
            fi = f[sl].to(f64)
            if not torch.isfinite(fi).all():
                raise MergeError(f"tensor '{name}': expert {i}'s Fisher has non-finite values")
            if scales[i] != 1.0:
                fi.mul_(scales[i])
            fi.clamp_min_(floor).mul_(float(w))
            if num is None:
                num = fi * e[sl].to(f64)
                den = fi
            else:
                num.addcmul_(fi, e[sl].to(f64))
                den.add_(fi)
        o[sl] = num.div_(den)
    return out


def fisher(experts: Sequence, fishers, weights: Sequence[float], floor: float, norms=None, name: str = "tensor"):
    """Fisher merging of one float32 tensor; ``fishers`` None: the weighted average."""
    if fishers is None:
        from mergesweep.merge.methods._parts import weighted_sum

        return weighted_sum(experts, weights, True)
    return fisher_merge(experts, fishers, weights, floor, norms, name)


def _norms(p: dict, ctx) -> list[float] | None:
    if not p["normalize_fisher_weight"]:
        return None
    sums = (ctx.stats or {}).get(NORM_KEY)
    if sums is None:
        raise MergeError(f"tensor '{ctx.name}': normalize_fisher_weight needs the whole-model Fisher norms "
                         f"(statistic '{NORM_KEY}'), which were not computed")
    return [float(s) ** 0.5 for s in sums]


def _merge(base, experts, p, ctx):
    fishers = ctx.stats_of(fisher_kind(p))
    norms = _norms(p, ctx) if fishers is not None else None
    return fisher(experts, fishers, p["weight"], p["minimal_fisher_weight"], norms, ctx.name)


def _statistics(p: dict, n: int) -> list[StatRequest]:
    return [StatRequest(NORM_KEY, "sum", 0)] if p["normalize_fisher_weight"] else []


def _stat_values(stage, base, experts, p, ctx):
    import torch

    fishers = ctx.stats_of(fisher_kind(p))
    if fishers is None:
        return {NORM_KEY: [None] * len(experts)}
    return {NORM_KEY: [f.to(torch.float64).square_() for f in fishers]}


def _validate(p: dict, n_experts: int, has_base: bool) -> None:
    if not sum(p["weight"]) > 0:
        raise ConfigError("params.weight: the weights sum to 0, so no expert takes part (give at least one "
                          "expert a positive weight)")


SPEC = MethodSpec(
    name="fisher",
    summary="per-entry average weighted by each expert's diagonal Fisher information",
    paper="Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging (arXiv:2111.09832)",
    params=(
        Param("weight", "float", 1.0,
              "per-expert weight multiplying its Fisher (MergeLM fisher_scaling_coefficients, MergeBench "
              "--model_coeff_value)", per_expert=True, low=0.0),
        Param("fisher_target", "str", "model",
              "which Fisher: 'model' (labels sampled from the model's outputs: stats kind fisher_model) or "
              "'labels' (the data's own next tokens, empirical Fisher: stats kind fisher)",
              choices=tuple(TARGETS)),
        Param("normalize_fisher_weight", "bool", False,
              "divide each expert's Fisher by its L2 norm over the whole model (an extra streaming pass)"),
        Param("minimal_fisher_weight", "float", 1e-6,
              "the floor eps: F^ = max(F, eps) (after normalisation, if any)", low=0.0, low_open=True),
    ),
    merge=_merge,
    base="unused",
    min_experts=1,
    statistics=_statistics,
    stat_values=_stat_values,
    validate=_validate,
    data_stats=lambda p: (fisher_kind(p),),
    deviations="floor max(F, eps) as the paper's code (MergeLM: F + eps; MergeBench: F + 1e-10); normalisation "
               "divides F by its global norm before the floor; every tensor with a Fisher is merged (MergeBench "
               "keeps the base's embeddings and lm_head); tensors without a Fisher take the weighted average",
    doc=__doc__,
    formula="`sum_i w_i F^_i theta_i / sum_i w_i F^_i` per entry, `F^ = max(F, eps)` (`normalize_fisher_weight`: "
            "`F / ||F||` first)",
    order_invariant=True,
    identities=(Identity({}, "expert", 1), Identity({"weight": [1.0, 0.0, 0.0]}, "expert", 3)),
)
