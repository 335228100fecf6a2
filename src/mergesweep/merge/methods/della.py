"""DELLA: magnitude-based random drop (MAGPRUNE), rescale, then elect sign and fuse.

For each row of a task vector (a 2-D tensor's rows; a tensor of more dimensions is split along
its first index; a 1-D tensor is one row) with m entries, rank the entries by magnitude,
r = 0 (smallest) ... m-1 (largest), and keep entry j with probability

    p_j = (density - epsilon) + 2 * epsilon * r_j / (m - 1)      (p_j = density when m = 1)

so larger entries are dropped less often; survivors are divided by p_j (``rescale``). Then,
as TIES, ``gamma = sign(sum_i w_i tau_i)`` and
``tau = sum_i [sign(w_i tau_i) = gamma] w_i tau_i`` [/ the agreeing weights if ``normalize``],
``theta = theta_base + lambda * tau``.

Paper: Deep, Bhardwaj, Majumder, Poria, "DELLA-Merging: Reducing Interference in Model Merging
through Magnitude-Based Sampling", 2024 (arXiv:2406.11617).

Parts (:mod:`._taskvector`): DELLA magnitude-ranked random drop with 1/p_j rescaling, TIES sign
election, weighted sum divided by the agreeing weights.

Randomness is seeded per (seed, tensor name, expert index) as in DARE (not order-invariant).
Needs ``0 < density - epsilon`` and ``density + epsilon <= 1``. Ranks are taken within each
row of each tensor, as mergekit does (the paper ranks within each parameter block).
"""

from __future__ import annotations

from typing import Sequence

from mergesweep.merge.methods._taskvector import della_magprune, task_vector_method
from mergesweep.merge.spec import Identity

PAPER = "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)"
DEVIATIONS = "magnitude ranks are taken within each row of each tensor (as mergekit)"
MERGEKIT = ("`epsilon` defaults to 0.1 (mergekit 0.15); `rescale` divides by each entry's keep probability "
            "p_j, the paper's rule (mergekit 0.1.5 rescales the masked task vector to the L1 norm of the "
            "unmasked one); `density + epsilon = 1` is allowed (mergekit needs < 1); masks are seeded per "
            "(seed, tensor, expert)")

SPEC = task_vector_method(
    "della",
    summary="magnitude-ranked random drop + rescale, then sign election and disjoint merge",
    paper=PAPER,
    formula="keep entry with prob. `density - epsilon + 2 epsilon rank/(m-1)` (rank of magnitude within its "
            "row), rescale by `1/p`; TIES election and disjoint merge",
    doc=__doc__,
    sparsify=della_magprune(0.5, 0.1),
    elect=True,
    normalize=True,
    identities=(Identity({"density": 1.0, "epsilon": 0.0}, "expert", 1, atol=2e-6),
                Identity({"lambda": 0.0}, "base", 3)),
    deviations=DEVIATIONS,
    mergekit=MERGEKIT,
)


def della(base, experts: Sequence, weights: Sequence[float], densities: Sequence[float], epsilons: Sequence[float],
          generators: Sequence, lam: float = 1.0, normalize: bool = True, rescale: bool = True,
          sign_consensus: bool = True):
    """DELLA on one float32 tensor (``sign_consensus: false`` is :mod:`.della_linear`)."""
    from mergesweep.merge.methods import _parts

    maskers = [_parts.della_masker(e - base, d, eps, g, rescale)
               for e, d, eps, g in zip(experts, densities, epsilons, generators)]
    return _parts.combine_task_vectors(base, experts, weights, lam, normalize, maskers, elect=sign_consensus)
