"""TIES-merging: trim, elect sign, disjoint merge.

    tau_i   = theta_i - theta_base
    trim    tau_i <- tau_i * [|tau_i| >= k-th largest |tau_i|],  k = floor(density_i * n)
    elect   gamma = sign(sum_i w_i tau_i)            (+1 where the sum is 0)
    merge   tau   = sum_i [sign(w_i tau_i) = gamma] w_i tau_i / sum_i [sign(w_i tau_i) = gamma] w_i
    theta   = theta_base + lambda * tau

(``normalize: false`` drops the division, giving a sign-filtered sum.)

Paper: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023
(arXiv:2306.01708).

Parts (:mod:`._taskvector`): magnitude top-k sparsification, TIES sign election, weighted sum
divided by the agreeing weights.

Deviation: the paper keeps the top-k% of each task vector over the *whole model*; the default
``scope: tensor`` ranks magnitudes within each tensor, as mergekit does (so mergekit recipes
give the same model). ``scope: model`` follows the paper: the engine makes two extra streaming
passes to find each expert's exact whole-model magnitude threshold. Ties at the threshold are
all kept (as the TIES reference code, ``>=`` the k-th value).

``normalize: true`` divides each entry by the sum of the weights of the experts agreeing there;
weights of which a non-empty subset sums to 0 (``[1, -1]``) could make that 0 and are rejected.
``density: 0`` keeps nothing of that expert (a warning says so; all zero: the base).
"""

from __future__ import annotations

from typing import Sequence

from mergesweep.merge.methods._taskvector import magnitude_topk, task_vector_method
from mergesweep.merge.spec import Identity

SPEC = task_vector_method(
    "ties",
    summary="trim small task-vector entries, elect a sign per entry, average the agreeing ones",
    paper="Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)",
    formula="trim `tau_i` to its top `density` by magnitude; `gamma = sign(sum_i w_i tau_i)`; weighted mean of "
            "the entries agreeing with `gamma`; `theta_0 + lambda tau`",
    doc=__doc__,
    sparsify=magnitude_topk(0.2),
    elect=True,
    normalize=True,
    identities=(Identity({"density": 1.0}, "expert", 1, atol=2e-6), Identity({"lambda": 0.0}, "base", 3)),
    deviations="per-tensor top-k by default (`scope: tensor`, as mergekit); `scope: model` is the paper's "
               "whole-model top-k (exact thresholds, two extra streaming passes); entries tied with the "
               "threshold are all kept",
    mergekit="`density` defaults to 0.2, the paper's k (mergekit: 1, no trimming); entries tied with the "
             "threshold are all kept (mergekit keeps an arbitrary k of them); k = floor(density n) can be 0 "
             "on a small tensor (mergekit keeps at least one entry); `normalize: true` with weights of which "
             "some subset sums to 0 is an error (mergekit divides by 1 where the agreeing weights sum to 0); "
             "`weight` defaults to 1; `scope: model` is not in mergekit",
)


def ties(base, experts: Sequence, weights: Sequence[float], densities: Sequence[float], lam: float = 1.0,
         normalize: bool = True, thresholds: Sequence[float | None] | None = None):
    """TIES on one float32 tensor. ``thresholds`` (whole-model magnitude thresholds, ``inf``:
    keep nothing) replace the per-tensor top-k when given."""
    from mergesweep.merge.methods import _parts

    if thresholds is None:
        thresholds = [_parts.magnitude_threshold(e, base, d) for e, d in zip(experts, densities)]
    maskers = [_parts.threshold_masker(t) for t in thresholds]
    return _parts.combine_task_vectors(base, experts, weights, lam, normalize, maskers, elect=True)
