"""Consensus task arithmetic with TALL masks.

    tau_i   = theta_i - theta_base,      tau_MTL = sum_i w_i tau_i    (the task-arithmetic vector)
    m_i     = [ |tau_i| > mask_lambda_i * |tau_MTL - tau_i| ]         (TALL mask of task i)
    m_cons  = [ sum_i m_i >= k ]                                      (kept where >= k tasks use it)
    theta   = theta_base + lambda * m_cons * tau_MTL

``k: 2`` is the paper's consensus; ``k: 0`` gives plain task arithmetic and ``k: 1`` removes
only the entries no task claims ("selfish" weights are those with exactly one claimant).

Paper: Wang, Dimitriadis, Favero, Ortiz-Jimenez, Fleuret, Frossard, "Localizing Task
Information for Improved Model Merging and Compression", ICML 2024 (arXiv:2405.07813). The paper
picks each mask_lambda on the task's validation data; here it is a (per-expert) parameter to
sweep. The consensus is applied to the task-arithmetic vector (the paper's "Consensus TA").

The mask comparison is strict (``>``), as in the authors' reference code; earlier versions of
mergesweep used ``>=``, which differs only where ``|tau_i| = mask_lambda_i |tau_MTL - tau_i|`` holds
exactly (e.g. two experts with the same value and ``mask_lambda: 1``, or an entry no expert
changes, which now gets no vote).

Parts (:mod:`._taskvector`): no sparsification, no sign election, weighted sum, then the TALL
consensus filter.
"""

from __future__ import annotations

from typing import Sequence

from mergesweep.merge.methods._taskvector import no_sparsify, task_vector_method
from mergesweep.merge.spec import Identity

SPEC = task_vector_method(
    "consensus",
    summary="task arithmetic restricted to entries that at least k experts' TALL masks select",
    paper="Wang et al. 2024, Localizing Task Information (TALL masks / Consensus TA, arXiv:2405.07813)",
    formula="TALL masks `|tau_i| > lambda_i |tau_MTL - tau_i|`; keep entries >= `k` masks select; "
            "`theta_0 + lambda m tau_MTL`",
    doc=__doc__,
    sparsify=no_sparsify(),
    elect=False,
    normalize=None,
    consensus=True,
    identities=(Identity({"k": 1}, "expert", 1, atol=2e-6), Identity({"k": 0}, "expert", 1, atol=2e-6),
                Identity({"lambda": 0.0}, "base", 3)),
    deviations="`mask_lambda` is a swept parameter (the paper tunes it on each task's validation data); the "
               "consensus is applied to the task-arithmetic vector (Consensus TA, not Consensus TIES)",
)


def consensus(base, experts: Sequence, weights: Sequence[float], mask_lambdas: Sequence[float], k: int = 2,
              lam: float = 1.0):
    """Consensus TA on one float32 tensor (the kernel behind ``SPEC``)."""
    from mergesweep.merge.methods import _parts

    cons = _parts.tall_consensus(mask_lambdas, k) if k > 0 else None
    return _parts.combine_task_vectors(base, experts, weights, lam, consensus=cons)
