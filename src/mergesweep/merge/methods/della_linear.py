"""DELLA drop + task arithmetic: magnitude-ranked random drop and rescale, then a weighted sum.

    p_j = (density - epsilon) + 2 epsilon r_j / (m - 1)     (r_j: rank of |tau_j| within its row)
    tau <- Bernoulli(p) * tau / p;   theta = theta_base + lambda * sum_i w_i tau_i  [/ sum_i w_i]

Paper: Deep, Bhardwaj, Majumder, Poria, "DELLA-Merging: Reducing Interference in Model Merging
through Magnitude-Based Sampling", 2024 (arXiv:2406.11617) - its "DELLA without elect" variant.
Kernel and details: :mod:`mergesweep.merge.methods.della`.
"""

from mergesweep.merge.methods.della import della_params, make_merge, validate
from mergesweep.merge.spec import MethodSpec

SPEC = MethodSpec(
    name="della_linear",
    summary="magnitude-ranked random drop + rescale, then task arithmetic",
    paper="Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)",
    params=della_params(normalize=False),
    merge=make_merge(sign_consensus=False),
    base="required",
    validate=validate,
    deviations="magnitude ranks are taken within each row of each tensor (as mergekit)",
    doc=__doc__,
)
