"""The task-vector family, composed from shared parts (no torch here; the tensor code of every
part is in :mod:`mergesweep.merge.methods._parts`, imported when a kernel first runs).

Every method of the family computes, per tensor, with ``tau_i = theta_i - theta_base``:

    tau_i' = rescale(sparsify_i(tau_i))                  per expert
    tau    = combine(tau_1', ..., tau_n'; w, elect, normalize)
    tau    = filter(tau)                                 (consensus only)
    theta  = theta_base + lambda * tau

and :func:`task_vector_method` builds its :class:`MethodSpec` from a choice of parts:

* **sparsify** (:class:`Sparsifier`): :func:`no_sparsify`, :func:`magnitude_topk` (TIES trim),
  :func:`dare_random` (DARE), :func:`della_magprune` (DELLA), :func:`breadcrumbs_band`;
  each brings its parameters (``density``, ``epsilon``, ``gamma``, ``rescale``, ``seed``,
  ``scope``) and their checks;
* **sign election**: ``elect=True`` is TIES' ``gamma = sign(sum_i w_i tau_i')``, after which only
  entries agreeing with ``gamma`` take part; ``normalize`` then divides by the sum of the
  agreeing weights (the disjoint mean). ``elect=False``: all entries take part and ``normalize``
  divides by ``sum_i w_i``;
* **filter**: ``consensus=True`` adds the TALL-mask consensus (``mask_lambda``, ``k``).

A method module of the family is then a docstring (formula, paper, deviations) and one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from mergesweep.errors import ConfigError
from mergesweep.merge.methods._common import (
    all_of,
    check_kept_weight_sums,
    check_total_weight,
    density_param,
    global_topk_requests,
    lambda_param,
    normalize_param,
    rescale_param,
    scope_param,
    seed_param,
    warn_zero_density,
    weight_param,
)
from mergesweep.merge.spec import Identity, MethodSpec, Param


@dataclass(frozen=True)
class Sparsifier:
    """One sparsify part: its parameters, checks and the name of its masker factory in
    :mod:`._parts` (``maskers(base, experts, params, ctx) -> [masker or None per expert]``)."""

    name: str
    text: str
    maskers: str | None = None
    params_before: tuple[Param, ...] = ()  # listed after ``weight``
    params_after: tuple[Param, ...] = ()   # listed after ``normalize``
    random: bool = False                    # masks seeded by expert index
    rescale: str = ""
    validate: Callable[[dict, int, bool], None] | None = None
    statistics: Callable | None = None
    stat_values: Callable | None = None


def no_sparsify() -> Sparsifier:
    return Sparsifier("none", "none (every entry kept)")


def magnitude_topk(density: float = 0.2) -> Sparsifier:
    def statistics(p, n):
        return global_topk_requests("trim", p["density"]) if p["scope"] == "model" else []

    def stat_values(stage, base, experts, p, ctx):
        return {"trim": [(e - base).abs_() for e in experts]}

    return Sparsifier(
        "magnitude",
        "magnitude top-k: keep |tau_i| >= its floor(density n)-th largest value (ties kept), per tensor "
        "or (scope: model) over the whole model",
        "magnitude_maskers",
        params_before=(density_param(density),),
        params_after=(scope_param(),),
        statistics=statistics,
        stat_values=stat_values,
    )


def dare_random(density: float = 0.5) -> Sparsifier:
    return Sparsifier(
        "dare",
        "DARE random drop: keep each entry with probability density (mask seeded by seed, tensor, expert)",
        "dare_maskers",
        params_before=(density_param(density, "keep probability (1 - drop rate)"),),
        params_after=(rescale_param(), seed_param()),
        random=True,
        rescale="divide survivors by density (rescale: true)",
    )


def _check_della(p, n, has_base):
    for i, (d, e) in enumerate(zip(p["density"], p["epsilon"])):
        if not (d - e > 0 and d + e <= 1 + 1e-12):
            raise ConfigError(
                f"params.epsilon: density - epsilon must be > 0 and density + epsilon <= 1 "
                f"(expert {i}: density {d}, epsilon {e})"
            )


def della_magprune(density: float = 0.5, epsilon: float = 0.1) -> Sparsifier:
    return Sparsifier(
        "della",
        "DELLA MAGPRUNE: keep entry j with probability density - epsilon + 2 epsilon r_j/(m-1), r_j its "
        "magnitude rank in its row (mask seeded by seed, tensor, expert)",
        "della_maskers",
        params_before=(
            density_param(density, "mean keep probability"),
            Param("epsilon", "float", epsilon, "half-width of the keep-probability range around density",
                  per_expert=True, low=0.0, high=0.5),
        ),
        params_after=(rescale_param(), seed_param()),
        random=True,
        rescale="divide each survivor by its keep probability p_j (rescale: true)",
        validate=_check_della,
    )


def _check_breadcrumbs(p, n, has_base):
    for i, (d, g) in enumerate(zip(p["density"], p["gamma"])):
        if d + g > 1 + 1e-12:
            raise ConfigError(f"params.gamma: density + gamma must be <= 1 (expert {i}: density {d}, gamma {g})")


def breadcrumbs_band(density: float = 0.9, gamma: float = 0.01) -> Sparsifier:
    return Sparsifier(
        "breadcrumbs",
        "breadcrumbs band: keep low <= |tau_i| < high, high = its floor(gamma n)-th largest magnitude, "
        "low = its floor(gamma n) + floor(density n)-th largest (ties go with the rank they tie)",
        "breadcrumbs_maskers",
        params_before=(
            density_param(density, "fraction of entries kept (after removing the top gamma)"),
            Param("gamma", "float", gamma, "fraction of largest-magnitude entries removed", per_expert=True,
                  low=0.0, high=1.0),
        ),
        validate=_check_breadcrumbs,
    )


def _merge_adapter(maskers: str | None, elect: bool, consensus: bool) -> Callable:
    def merge(base, experts, p, ctx):
        from mergesweep.merge.methods import _parts  # torch: only when a tensor is merged

        ms = getattr(_parts, maskers)(base, experts, p, ctx) if maskers else None
        cons = _parts.tall_consensus(p["mask_lambda"], p["k"]) if consensus and p["k"] > 0 else None
        return _parts.combine_task_vectors(base, experts, p["weight"], p["lambda"], p.get("normalize", False),
                                           ms, elect, cons)

    return merge


def _check_k(p, n, has_base):
    if p["k"] > n:
        raise ConfigError(f"params.k: {p['k']} is more than the number of experts ({n}); nothing would be kept")


def task_vector_method(
    name: str,
    *,
    summary: str,
    paper: str,
    formula: str,
    doc: str,
    sparsify: Sparsifier,
    elect: bool,
    normalize: bool | None,
    identities: Sequence[Identity],
    consensus: bool = False,
    deviations: str = "",
    mergekit: str = "",
) -> MethodSpec:
    """A :class:`MethodSpec` of the task-vector family.

    ``normalize``: the default of the ``normalize`` parameter (``None``: no such parameter,
    never normalised). Parameters come in the order ``weight``, the sparsifier's (``density``
    ...), the consensus' (``mask_lambda``, ``k``), ``lambda``, ``normalize``, then the
    sparsifier's options (``rescale``, ``seed``, ``scope``).
    """
    params: list[Param] = [weight_param(), *sparsify.params_before]
    checks: list[Callable] = []
    if consensus:
        params += [
            Param("mask_lambda", "float", 0.4, "TALL-mask threshold lambda_t of each expert", per_expert=True,
                  low=0.0),
            Param("k", "int", 2, "minimum number of experts whose mask selects an entry", low=0),
        ]
        checks.append(_check_k)
    params.append(lambda_param())
    if normalize is not None:
        if elect:
            params.append(normalize_param(normalize, "divide by the sum of the weights of the experts agreeing "
                                                     "with the elected sign (the disjoint mean)"))
            checks.append(check_kept_weight_sums)
        else:
            params.append(normalize_param(normalize, "divide the merged task vector by the sum of the weights"))
            checks.append(check_total_weight)
    params += sparsify.params_after
    if sparsify.validate:
        checks.append(sparsify.validate)
    if any(p.name == "density" for p in params):
        checks.append(lambda p, n, has_base: warn_zero_density(p, name))

    if elect:
        combine = ("sum_i [agree_i] w_i tau_i' / sum_i [agree_i] w_i (normalize: true; no division when false)")
    elif normalize is None:
        combine = "sum_i w_i tau_i'"
    else:
        combine = "sum_i w_i tau_i' / sum_i w_i (normalize: true; no division when false)"
    composition = {
        "sparsify": sparsify.text,
        "rescale": sparsify.rescale or "none",
        "sign election": "TIES: gamma = sign(sum_i w_i tau_i'), +1 where 0; entries of another sign are "
                         "left out" if elect else "none",
        "combine": combine,
    }
    if consensus:
        composition["filter"] = "TALL consensus: keep entries where >= k masks |tau_i| > mask_lambda_i |tau - tau_i|"
    return MethodSpec(
        name=name,
        summary=summary,
        paper=paper,
        params=tuple(params),
        merge=_merge_adapter(sparsify.maskers, elect, consensus),
        base="required",
        statistics=sparsify.statistics,
        stat_values=sparsify.stat_values,
        validate=all_of(*checks) if checks else None,
        deviations=deviations,
        doc=doc,
        formula=formula,
        order_invariant=not sparsify.random,
        identities=tuple(identities),
        composition=composition,
        mergekit=mergekit,
    )
