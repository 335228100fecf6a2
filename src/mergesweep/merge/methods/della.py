"""DELLA: magnitude-based random drop (MAGPRUNE), rescale, then elect sign and fuse.

For each row of a task vector (the last dimension; a 1-D tensor is one row) with m entries,
rank the entries by magnitude, r = 0 (smallest) ... m-1 (largest), and keep entry j with
probability

    p_j = (density - epsilon) + 2 * epsilon * r_j / (m - 1)      (p_j = density when m = 1)

so larger entries are dropped less often; survivors are rescaled by 1 / p_j (``rescale``).
``della`` then elects a sign per entry and takes the weighted disjoint mean (as TIES);
``della_linear`` sums the weighted pruned task vectors instead. Finally
``theta = theta_base + lambda * tau``.

Paper: Deep, Bhardwaj, Majumder, Poria, "DELLA-Merging: Reducing Interference in Model Merging
through Magnitude-Based Sampling", 2024 (arXiv:2406.11617).

Randomness is seeded per (seed, tensor name, expert index) as in DARE. Needs
``0 < density - epsilon`` and ``density + epsilon <= 1``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesweep.errors import ConfigError
from mergesweep.merge.methods._common import (
    check_weight_sum,
    density_param,
    elect_and_merge,
    lambda_param,
    normalize_param,
    rescale_param,
    seed_param,
    weight_param,
    weighted_sum,
)
from mergesweep.merge.spec import MethodSpec, Param, TensorContext


def magprune_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per-entry keep probabilities from within-row magnitude ranks (same shape as ``delta``)."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    m = rows.shape[1]
    if m == 1:
        return torch.full_like(delta, density)
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(rows)
    steps = torch.arange(m, dtype=rows.dtype, device=rows.device).expand_as(rows)
    ranks.scatter_(1, order, steps)
    del order
    probs = ranks.mul_(2.0 * epsilon / (m - 1)).add_(density - epsilon)
    return probs.reshape(delta.shape)


def magprune(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator,
             rescale: bool = True) -> torch.Tensor:
    if density >= 1.0 and epsilon == 0.0:
        return delta
    probs = magprune_probabilities(delta, density, epsilon)
    u = torch.rand(delta.shape, generator=generator, dtype=torch.float32).to(delta.device)
    keep = u < probs
    del u
    out = delta * keep
    if rescale:
        out.div_(probs)
    return out


def della(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    epsilons: Sequence[float],
    generators: Sequence[torch.Generator],
    lam: float = 1.0,
    normalize: bool = True,
    rescale: bool = True,
    sign_consensus: bool = True,
) -> torch.Tensor:
    deltas = [magprune(e - base, densities[i], epsilons[i], generators[i], rescale) for i, e in enumerate(experts)]
    merged = elect_and_merge(deltas, weights, normalize) if sign_consensus else weighted_sum(deltas, weights, normalize)
    del deltas
    return merged.mul_(lam).add_(base)


def validate(p, n, has_base):
    check_weight_sum(p, n, has_base)
    for i, (d, e) in enumerate(zip(p["density"], p["epsilon"])):
        if not (d - e > 0 and d + e <= 1 + 1e-12):
            raise ConfigError(
                f"params.epsilon: density - epsilon must be > 0 and density + epsilon <= 1 "
                f"(expert {i}: density {d}, epsilon {e})"
            )


def make_merge(sign_consensus: bool):
    def _merge(base, experts, p, ctx: TensorContext):
        gens = [ctx.generator(i) for i in range(len(experts))]
        return della(base, experts, p["weight"], p["density"], p["epsilon"], gens, p["lambda"],
                     p["normalize"], p["rescale"], sign_consensus)

    return _merge


def della_params(normalize: bool):
    return (
        weight_param(),
        density_param(0.5, "mean keep probability"),
        Param("epsilon", "float", 0.1, "half-width of the keep-probability range around density",
              per_expert=True, low=0.0, high=0.5),
        lambda_param(),
        normalize_param(normalize),
        rescale_param(),
        seed_param(),
    )


SPEC = MethodSpec(
    name="della",
    summary="magnitude-ranked random drop + rescale, then sign election and disjoint merge",
    paper="Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)",
    params=della_params(normalize=True),
    merge=make_merge(sign_consensus=True),
    base="required",
    validate=validate,
    deviations="magnitude ranks are taken within each row of each tensor (as mergekit)",
    doc=__doc__,
)
