"""DARE + TIES: random drop and rescale of each task vector, then sign election and disjoint merge.

    m_i ~ Bernoulli(density_i),  tau_i <- m_i * tau_i / density_i          (rescale: true)
    gamma = sign(sum_i w_i tau_i);  tau = sum_i [sign(w_i tau_i) = gamma] w_i tau_i
    theta = theta_base + lambda * tau      [tau / sum_i [sign(w_i tau_i) = gamma] w_i if normalize]

Paper: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models
as a Free Lunch", ICML 2024 (arXiv:2311.03099), with the sign election of TIES (Yadav et al. 2023).

Parts (:mod:`._taskvector`): DARE random drop with 1/density rescaling, TIES sign election,
weighted sum (divided by the agreeing weights when ``normalize``).

``normalize`` defaults to false, as in mergekit (earlier versions of mergesweep defaulted to
true; set ``normalize: true`` for their behaviour). Masks are seeded per (seed, tensor name,
expert index), as in :mod:`.dare_linear` (not order-invariant); ``rescale`` is the paper's
1/density, not mergekit's L1-norm matching.
"""

from __future__ import annotations

from typing import Sequence

from mergesweep.merge.methods._taskvector import dare_random, task_vector_method
from mergesweep.merge.methods.dare_linear import MERGEKIT, PAPER
from mergesweep.merge.spec import Identity

SPEC = task_vector_method(
    "dare_ties",
    summary="random drop + rescale of task vectors, then TIES sign election and disjoint merge",
    paper=PAPER,
    formula="DARE drop/rescale, then TIES sign election and disjoint merge",
    doc=__doc__,
    sparsify=dare_random(0.5),
    elect=True,
    normalize=False,
    identities=(Identity({"density": 1.0}, "expert", 1, atol=2e-6),
                Identity({"density": 1.0, "normalize": True}, "expert", 1, atol=2e-6),
                Identity({"lambda": 0.0}, "base", 3)),
    mergekit=MERGEKIT,
)


def dare_ties(base, experts: Sequence, weights: Sequence[float], densities: Sequence[float], generators: Sequence,
              lam: float = 1.0, normalize: bool = False, rescale: bool = True):
    """DARE + TIES on one float32 tensor; ``generators[i]`` draws expert i's mask."""
    from mergesweep.merge.methods import _parts

    maskers = [_parts.dare_masker(e.shape, d, g, e.device, rescale) for e, d, g in zip(experts, densities, generators)]
    return _parts.combine_task_vectors(base, experts, weights, lam, normalize, maskers, elect=True)
