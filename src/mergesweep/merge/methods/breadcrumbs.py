"""Model Breadcrumbs: drop both the largest outliers and the small entries of each task vector.

Per tensor, with n entries and magnitudes |tau_i|:

    n_top  = floor(gamma * n)      the largest entries, removed (outliers)
    n_keep = floor(density * n)    the next entries, kept; the remaining smallest are removed
    high   = the n_top-th largest |tau_i|              (no upper cut when n_top = 0)
    low    = the (n_top + n_keep)-th largest |tau_i|
    m_i    = [low <= |tau_i| < high]
    theta  = theta_base + lambda * sum_i w_i m_i tau_i    [/ sum_i w_i if normalize]

The mask is defined by these two magnitude thresholds, not by ranks: entries tied in magnitude
with the n_top-th largest are all removed with it, entries tied with the (n_top + n_keep)-th
largest are all kept with it. With distinct magnitudes exactly ranks n_top+1 .. n_top+n_keep
are kept; with ties the counts can differ from n_top and n_keep (the mask never depends on the
order in which a sort happens to put equal values).

Paper: Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks", ECCV 2024 (arXiv:2312.06795). The paper masks per layer, which per tensor is. Parameter
names as in mergekit: the paper's top fraction beta is ``gamma`` here and its kept fraction is
``density``; ``density + gamma <= 1``.

Parts (:mod:`._taskvector`): the breadcrumbs magnitude band, no sign election, weighted sum.
"""

from __future__ import annotations

from typing import Sequence

from mergesweep.merge.methods._taskvector import breadcrumbs_band, task_vector_method
from mergesweep.merge.spec import Identity

SPEC = task_vector_method(
    "breadcrumbs",
    summary="mask out the largest (gamma) and smallest task-vector entries per tensor, then add",
    paper="Davari & Belilovsky 2024, Model Breadcrumbs (arXiv:2312.06795)",
    formula="drop the top `gamma` and the entries below the next `density` by magnitude (thresholds: ties go "
            "with the rank they tie); task arithmetic",
    doc=__doc__,
    sparsify=breadcrumbs_band(0.9, 0.01),
    elect=False,
    normalize=False,
    identities=(Identity({"density": 1.0, "gamma": 0.0}, "expert", 1, atol=2e-6),
                Identity({"lambda": 0.0}, "base", 3)),
    deviations="masks per tensor (the paper's per-layer rule); mergekit's parameter names (`gamma` = the paper's "
               "top fraction beta, `density` = the kept fraction)",
    mergekit="`density` defaults to 0.9 (mergekit: 1, which in mergekit skips the method's masking, gamma "
             "included); `density + gamma > 1` is an error (mergekit shrinks the outlier cut); magnitudes tied "
             "with a threshold go with the rank they tie (mergekit: the order of its sort)",
)


def breadcrumbs(base, experts: Sequence, weights: Sequence[float], densities: Sequence[float],
                gammas: Sequence[float], lam: float = 1.0, normalize: bool = False):
    """Breadcrumbs on one float32 tensor (the kernel behind ``SPEC``)."""
    from mergesweep.merge.methods import _parts

    maskers = [_parts.threshold_masker(*_parts.breadcrumbs_band(e, base, d, g))
               for e, d, g in zip(experts, densities, gammas)]
    return _parts.combine_task_vectors(base, experts, weights, lam, normalize, maskers)


def breadcrumbs_mask(delta, density: float, gamma: float):
    """The boolean mask of one task vector (``None``: keep all)."""
    from mergesweep.merge.methods._parts import breadcrumbs_mask as mask

    return mask(delta, density, gamma)
