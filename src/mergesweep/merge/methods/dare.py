"""DARE: drop task-vector entries at random and rescale the survivors (``dare_linear``), then
optionally TIES sign election (``dare_ties``).

    tau_i   = theta_i - theta_base
    m_i     ~ Bernoulli(density_i)                  (density = 1 - drop rate p)
    tau_i  <- m_i * tau_i / density_i               (rescale: true)
    dare_linear:  theta = theta_base + lambda * sum_i w_i tau_i   [/ sum_i w_i if normalize]
    dare_ties:    theta = theta_base + lambda * TIES-elect-and-disjoint-merge(w_i tau_i)

Paper: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models
as a Free Lunch", ICML 2024 (arXiv:2311.03099).

Randomness: the mask of expert ``i`` on tensor ``name`` is drawn on the CPU from a generator
seeded with ``sha256(seed, name, i)``, so a merge is bit-identical across runs, thread counts and
tensor order, and the masks are the same on every device. ``density: 1`` keeps everything
(``dare_linear`` is then exactly task arithmetic).

The methods are ``dare_linear`` and ``dare_ties`` (their own modules); this module holds the
kernels.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesweep.merge.methods._common import (
    density_param,
    elect_and_merge,
    lambda_param,
    normalize_param,
    random_keep_mask,
    rescale_param,
    seed_param,
    weight_param,
    weighted_sum,
)
from mergesweep.merge.spec import TensorContext


def dare_drop(delta: torch.Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """Random drop (keep probability ``density``) and rescale by ``1/density``; in place."""
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return delta.zero_()
    keep = random_keep_mask(delta.shape, density, generator, delta.device)
    delta.mul_(keep)
    if rescale:
        delta.div_(density)
    return delta


def dare(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    generators: Sequence[torch.Generator],
    lam: float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    sign_consensus: bool = False,
) -> torch.Tensor:
    deltas = [dare_drop(e - base, densities[i], generators[i], rescale) for i, e in enumerate(experts)]
    if sign_consensus:
        merged = elect_and_merge(deltas, weights, normalize)
    else:
        merged = weighted_sum(deltas, weights, normalize)
    del deltas
    return merged.mul_(lam).add_(base)


def make_merge(sign_consensus: bool):
    def _merge(base, experts, p, ctx: TensorContext):
        gens = [ctx.generator(i) for i in range(len(experts))]
        return dare(base, experts, p["weight"], p["density"], gens, p["lambda"], p["normalize"], p["rescale"], sign_consensus)

    return _merge


def dare_params(normalize: bool):
    return (weight_param(), density_param(0.5, "keep probability (1 - drop rate)"), lambda_param(),
            normalize_param(normalize), rescale_param(), seed_param())


PAPER = "Yu et al. 2024, Language Models are Super Mario (arXiv:2311.03099)"
