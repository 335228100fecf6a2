"""DELLA drop + task arithmetic: magnitude-ranked random drop and rescale, then a weighted sum.

    p_j = (density - epsilon) + 2 epsilon r_j / (m - 1)     (r_j: rank of |tau_j| within its row)
    tau <- Bernoulli(p) * tau / p;   theta = theta_base + lambda * sum_i w_i tau_i  [/ sum_i w_i]

Paper: Deep, Bhardwaj, Majumder, Poria, "DELLA-Merging: Reducing Interference in Model Merging
through Magnitude-Based Sampling", 2024 (arXiv:2406.11617) - its "DELLA without elect" variant.

Parts (:mod:`._taskvector`): DELLA magnitude-ranked random drop with 1/p_j rescaling, no sign
election, weighted sum. Details (rows, seeding, constraints): :mod:`.della`.
"""

from __future__ import annotations

from mergesweep.merge.methods._taskvector import della_magprune, task_vector_method
from mergesweep.merge.methods.della import DEVIATIONS, MERGEKIT, PAPER
from mergesweep.merge.spec import Identity

SPEC = task_vector_method(
    "della_linear",
    summary="magnitude-ranked random drop + rescale, then task arithmetic",
    paper=PAPER,
    formula="the same drop/rescale; task arithmetic",
    doc=__doc__,
    sparsify=della_magprune(0.5, 0.1),
    elect=False,
    normalize=False,
    identities=(Identity({"density": 1.0, "epsilon": 0.0}, "expert", 1, atol=2e-6),
                Identity({"lambda": 0.0}, "base", 3)),
    deviations=DEVIATIONS,
    mergekit=MERGEKIT,
)

