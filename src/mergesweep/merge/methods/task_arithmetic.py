"""Task arithmetic: add scaled task vectors to the base.

    tau_i = theta_i - theta_base
    theta = theta_base + lambda * sum_i w_i * tau_i             (normalize: false, the default)
    theta = theta_base + lambda * sum_i w_i * tau_i / sum_i w_i (normalize: true)

Paper: Ilharco et al., "Editing models with task arithmetic", ICLR 2023 (arXiv:2212.04089).

Parts (:mod:`._taskvector`): no sparsification, no sign election, weighted sum.
"""

from __future__ import annotations

from typing import Sequence

from mergesweep.merge.methods._taskvector import no_sparsify, task_vector_method
from mergesweep.merge.spec import Identity

SPEC = task_vector_method(
    "task_arithmetic",
    summary="base + lambda * weighted sum of task vectors",
    paper="Ilharco et al. 2023, Editing models with task arithmetic (arXiv:2212.04089)",
    formula="`theta_0 + lambda sum_i w_i tau_i` (`normalize` divides by `sum w`)",
    doc=__doc__,
    sparsify=no_sparsify(),
    elect=False,
    normalize=False,
    identities=(Identity({"lambda": 0.0}, "base", 3), Identity({}, "expert", 1, atol=2e-6)),
    mergekit="`weight` defaults to 1 (mergekit requires it); `normalize: true` with weights summing to 0 is an "
             "error (mergekit then skips the division)",
)


def task_arithmetic(base, experts: Sequence, weights: Sequence[float], lam: float = 1.0, normalize: bool = False):
    """Task arithmetic on one float32 tensor (the kernel behind ``SPEC``)."""
    from mergesweep.merge.methods._parts import combine_task_vectors

    return combine_task_vectors(base, experts, weights, lam, normalize)
