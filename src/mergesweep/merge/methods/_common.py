"""Parameters and validation shared by several methods (no torch: imported with the registry)."""

from __future__ import annotations

import bisect
import itertools
import logging
from typing import Sequence

from mergesweep.errors import ConfigError
from mergesweep.merge.spec import Param, StatRequest

log = logging.getLogger("mergesweep.merge.methods")


# -- parameters shared by many methods, named as in mergekit ---------------------------------
def weight_param(default: float = 1.0, help: str = "per-expert weight of the task vector") -> Param:
    return Param("weight", "float", default, help, per_expert=True)


def density_param(default: float, help: str = "fraction of task-vector entries kept") -> Param:
    return Param("density", "float", default, help, per_expert=True, low=0.0, high=1.0)


def lambda_param(default: float = 1.0) -> Param:
    return Param("lambda", "float", default, "scaling of the merged task vector")


def normalize_param(default: bool, help: str = "divide the merged task vector by the sum of (kept) weights") -> Param:
    return Param("normalize", "bool", default, help)


def seed_param() -> Param:
    return Param("seed", "int", 0, "seed of the random masks (combined with tensor name and expert index)", low=0)


def rescale_param() -> Param:
    return Param("rescale", "bool", True,
                 "divide kept entries by their keep probability (the papers' 1/p; mergekit 0.1.5 matches the L1 norm)")


def scope_param(default: str = "tensor") -> Param:
    return Param(
        "scope", "str", default,
        "where magnitudes are ranked: per tensor (as mergekit) or over the whole model (as the paper)",
        choices=("tensor", "model"),
    )


# -- validation --------------------------------------------------------------------------------
def check_total_weight(params: dict, n_experts: int, has_base: bool) -> None:
    """``normalize`` with a weighted sum divides by ``sum_i w_i``: reject a zero sum."""
    if params.get("normalize") and abs(sum(params["weight"])) < 1e-12:
        raise ConfigError("params.weight: the weights sum to 0, so normalize: true cannot divide by them")


_MAX_SUBSETS = 1 << 20


def check_kept_weight_sums(params: dict, n_experts: int, has_base: bool) -> None:
    """``normalize`` after a TIES sign election divides each entry by the sum of the weights of
    the experts that agree with the elected sign there. Any non-empty set of experts with
    non-zero weights can be that set (expert i agrees where ``sign(w_i tau_i)`` is the elected
    sign, whatever the other entries), so reject exactly the weights of which some non-empty
    subset sums to 0: e.g. ``[1, -1]`` (the divisor is 0 wherever the two task vectors have
    opposite signs), or ``[1, -1, 0.5]``; ``[1, -0.5]`` or any weights of one sign are fine.
    Experts with weight 0 never take part; all-zero weights keep nothing (the base)."""
    if not params.get("normalize"):
        return
    ws = [float(w) for w in params["weight"]]
    pos = [(i, w) for i, w in enumerate(ws) if w > 0]
    neg = [(i, -w) for i, w in enumerate(ws) if w < 0]
    if not pos or not neg:
        return  # one sign: every subset sum is non-zero
    if (1 << len(pos)) + (1 << len(neg)) > _MAX_SUBSETS:
        raise ConfigError(
            "params.weight: too many experts with weights of both signs to check that no agreeing "
            "set of experts has weights summing to 0; use normalize: false or weights of one sign"
        )
    tol = 1e-9 * max(abs(w) for w in ws)

    def sums(items):
        return {
            sum(w for _, w in combo): [i for i, _ in combo]
            for r in range(1, len(items) + 1) for combo in itertools.combinations(items, r)
        }

    neg_sums = sorted(sums(neg).items())
    keys = [s for s, _ in neg_sums]
    for s, members in sorted(sums(pos).items()):
        j = bisect.bisect_left(keys, s - tol)
        if j < len(keys) and keys[j] <= s + tol:
            group = sorted(members + neg_sums[j][1])
            raise ConfigError(
                f"params.weight: the weights of experts {', '.join(map(str, group))} sum to 0, so where "
                "exactly these experts agree with the elected sign normalize: true would divide by 0 "
                "(use normalize: false, or weights no subset of which sums to 0)"
            )


def warn_zero_density(params: dict, method: str) -> None:
    """``density: 0`` keeps no entry of that expert's task vector: say so, it is easy to miss."""
    dens = params.get("density")
    if dens is None:
        return
    zero = [i for i, d in enumerate(dens) if d == 0]
    if not zero:
        return
    if len(zero) == len(dens):
        log.warning("params.density: 0 keeps no task-vector entry of any expert, so method '%s' "
                    "returns the base unchanged", method)
    else:
        log.warning("params.density: 0 for expert(s) %s keeps none of their task-vector entries, so "
                    "method '%s' ignores them", ", ".join(map(str, zero)), method)


def all_of(*checks):
    """One ``validate`` hook running several checks in order."""

    def validate(params: dict, n_experts: int, has_base: bool) -> None:
        for check in checks:
            check(params, n_experts, has_base)

    return validate


# -- whole-model statistics --------------------------------------------------------------------
def global_topk_requests(key: str, densities: Sequence[float]) -> list[StatRequest]:
    """A whole-model "k-th largest magnitude" per expert, k = floor(density * n)."""

    def rank(n: int, i: int) -> int:
        from mergesweep.merge.select import count_for_fraction

        return n - count_for_fraction(densities[i], n)  # ascending rank of the k-th largest

    return [StatRequest(key, "kth", 0, rank)]
