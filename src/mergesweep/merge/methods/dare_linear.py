"""DARE + task arithmetic: random drop and rescale of each task vector, then a weighted sum.

    tau_i  = theta_i - theta_base
    m_i    ~ Bernoulli(density_i)                    (density = 1 - drop rate p)
    tau_i <- m_i * tau_i / density_i                 (rescale: true; no division when false)
    theta  = theta_base + lambda * sum_i w_i tau_i   [/ sum_i w_i if normalize]

Paper: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models
as a Free Lunch", ICML 2024 (arXiv:2311.03099).

Parts (:mod:`._taskvector`): DARE random drop with 1/density rescaling, no sign election,
weighted sum.

Randomness: the mask of expert ``i`` on tensor ``name`` is drawn on the CPU from a generator
seeded with ``sha256(seed, name, i)``, so a merge is bit-identical across runs, thread counts,
tensor order and devices. Because the mask follows the expert's index, permuting the experts
changes the masks (not order-invariant). ``density: 1`` keeps everything (exactly task
arithmetic); ``density: 0`` keeps nothing of that expert (a warning says so).

``rescale`` divides survivors by the keep probability, as the paper; mergekit 0.1.5's
``rescale`` instead rescales the masked task vector to the L1 norm of the unmasked one.
"""

from __future__ import annotations

from typing import Sequence

from mergesweep.merge.methods._taskvector import dare_random, task_vector_method
from mergesweep.merge.spec import Identity

PAPER = "Yu et al. 2024, Language Models are Super Mario (arXiv:2311.03099)"
MERGEKIT = ("`rescale` divides by density, the paper's 1/(1-p) (mergekit 0.1.5 rescales the masked task "
            "vector to the L1 norm of the unmasked one); masks are seeded per (seed, tensor, expert) (mergekit "
            "draws from torch's global generator); `weight` defaults to 1")

SPEC = task_vector_method(
    "dare_linear",
    summary="random drop + rescale of task vectors, then task arithmetic",
    paper=PAPER,
    formula="`tau_i <- Bernoulli(density) * tau_i / density`; task arithmetic",
    doc=__doc__,
    sparsify=dare_random(0.5),
    elect=False,
    normalize=False,
    identities=(Identity({"density": 1.0}, "expert", 1, atol=2e-6), Identity({"lambda": 0.0}, "base", 3)),
    mergekit=MERGEKIT,
)


def dare_linear(base, experts: Sequence, weights: Sequence[float], densities: Sequence[float], generators: Sequence,
                lam: float = 1.0, normalize: bool = False, rescale: bool = True):
    """DARE + task arithmetic on one float32 tensor; ``generators[i]`` draws expert i's mask."""
    from mergesweep.merge.methods import _parts

    maskers = [_parts.dare_masker(e.shape, d, g, e.device, rescale) for e, d, g in zip(experts, densities, generators)]
    return _parts.combine_task_vectors(base, experts, weights, lam, normalize, maskers)
