"""RegMean: merge each linear layer by the weights that best reproduce every expert on its own inputs.

For a linear weight ``W`` (torch layout ``[out, in]``, ``y = x W^T``) with per-expert input Gram
matrices ``G_i = X_i^T X_i`` (the ``stats`` stage's ``gram``, divided by its token count
``gram_count``):

    G~_i = alpha G_i + (1 - alpha) diag(G_i)              alpha = reduce_non_diagonal_ratio
    W*   = (sum_i W_i G~_i) (sum_i G~_i)^-1              (paper: W* = (sum G~_i)^-1 sum G~_i W_i, [in, out])

``alpha = 1`` solves ``min_W sum_i ||X_i W^T - X_i W_i^T||^2`` exactly; smaller ``alpha`` shrinks
the off-diagonal entries (``alpha = 0``: each input column is the average of the experts'
columns weighted by ``G_i[j, j]``). Every other tensor (embeddings, norms, biases, and any
weight without Gram statistics) takes the ``fallback``: ``average`` (``mean_i theta_i``) or
``task_arithmetic`` (``theta_0 + lambda sum_i (theta_i - theta_0)``, needs a base).

Paper: Jin, Ren, Preotiuc-Pietro, Cheng, "Dataless Knowledge Fusion by Merging Weights of
Language Models", ICLR 2023 (arXiv:2212.09849).

The solve (:func:`mergesweep.merge.methods._regmean.regmean_solve`) regularises:
``W* = W_bar + [sum_i (W_i - W_bar) G~_i] (sum_i G~_i + rho I)^-1`` with ``W_bar`` the experts'
average and ``rho = ridge * mean diag(sum_i G~_i)``: ``ridge = 0`` is RegMean exactly; a singular
system (an input no calibration token activated, fewer tokens than inputs at ``alpha = 1``)
keeps the undetermined directions at the average, never NaN (a pseudo-inverse when ``ridge = 0``).

Names and defaults against MergeBench (``merging/merging_methods/regmean.py``) and MergeLM /
FusionBench: ``reduce_non_diagonal_ratio`` is MergeBench's ``--reduction`` (no default there; its
``scripts/merge.sh`` runs RegMean with 0.5, our default) and MergeLM's
``reduce_non_diagonal_ratio`` (default 1.0). Grams are per-token means, as in MergeBench and the
paper's code. Departures: MergeBench applies RegMean to every ``nn.Linear`` except ``lm_head``
and keeps the *base's* embeddings and ``lm_head`` (averaging every other tensor); here every
tensor the statistics have a Gram for is solved (``lm_head`` too when the stats stage records
it) and every other tensor, embeddings included, takes the fallback. MergeBench inverts in
float32 (``pinv`` when ``cond > 1e8``); here float64 Cholesky with the ``ridge`` regulariser.
"""

from __future__ import annotations

from typing import Sequence

from mergesweep.errors import MergeError
from mergesweep.merge.methods._regmean import regmean_params, validate_fallback
from mergesweep.merge.spec import Identity, MethodSpec, Param



def fallback_merge(base, experts: Sequence, fallback: str, lam: float = 1.0):
    """A tensor without Gram statistics: the experts' mean, or ``base + lam * sum_i (theta_i - base)``."""
    from mergesweep.merge.methods._parts import combine_task_vectors, weighted_sum

    n = len(experts)
    if fallback == "average":
        return weighted_sum(experts, [1.0] * n, True)
    if base is None:
        raise MergeError("fallback task_arithmetic needs the base model's tensor (params.fallback)")
    return combine_task_vectors(base, experts, [1.0] * n, lam, False)


def regmean(base, experts: Sequence, grams, alpha: float, ridge: float, counts=None,
            fallback: str = "average", lam: float = 1.0, name: str = "tensor"):
    """RegMean of one float32 tensor: the solve when ``grams`` is given, else the fallback."""
    if grams is None:
        return fallback_merge(base, experts, fallback, lam)
    from mergesweep.merge.methods._regmean import regmean_solve

    if experts[0].dim() != 2:
        raise MergeError(f"tensor '{name}': Gram statistics given for a tensor of shape "
                         f"{list(experts[0].shape)} (RegMean needs a linear weight [out, in])")
    return regmean_solve(experts, grams, alpha, ridge, counts, name=name)


def _merge(base, experts, p, ctx):
    grams = ctx.stats_of("gram")
    counts = ctx.stats_of("gram_count") if grams is not None else None
    return regmean(base, experts, grams, p["reduce_non_diagonal_ratio"], p["ridge"], counts,
                   p["fallback"], p["lambda"], ctx.name)



SPEC = MethodSpec(
    name="regmean",
    summary="per linear layer, the least-squares weights reproducing every expert on its own inputs (Gram "
            "statistics); other tensors averaged",
    paper="Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models (arXiv:2212.09849)",
    params=regmean_params(
        0.5,
        "alpha: off-diagonal Gram entries are multiplied by it (1: plain RegMean; 0: per-input-feature "
        "weighted average); MergeBench --reduction (merge.sh: 0.5), MergeLM reduce_non_diagonal_ratio",
        "tensors without Gram statistics (embeddings, norms, biases): the experts' mean, or task "
        "arithmetic base + lambda * sum of task vectors (needs a base)"),
    merge=_merge,
    base="optional",
    min_experts=1,
    validate=validate_fallback,
    data_stats=lambda p: ("gram",),
    deviations="Grams divided by their token counts (as MergeBench and the paper's code); a ridge regulariser "
               "towards the experts' average (default 1e-6 relative; 0 is exact RegMean); every tensor with a "
               "Gram is solved and every other one (embeddings included) takes the fallback, where MergeBench "
               "skips lm_head and keeps the base's embeddings and lm_head",
    doc=__doc__,
    formula="linear weights: `(sum_i W_i G~_i)(sum_i G~_i)^-1`, `G~ = alpha G + (1-alpha) diag G`; "
            "other tensors: `fallback` (mean, or `theta_0 + lambda sum_i tau_i`)",
    order_invariant=True,
    identities=(
        Identity({}, "expert", 1),
        Identity({"fallback": "task_arithmetic"}, "expert", 1, atol=2e-6),
    ),
)
