"""What every strategy shares: proposals, the objective, the strategy interface, budget checks.

A strategy is an object built from its config (a :class:`~mergesweep.search.space.SearchSpace`,
an :class:`Objective`, a budget, a seed and its own options) with three methods:

* ``initial_state() -> dict``: the state before generation 0;
* ``propose(state, observations) -> (proposals, new_state)``: ``observations`` are the
  :class:`~mergesweep.search.observations.Observation` of the proposals of the previous call
  (validation scores only; none for generation 0). Every previous proposal must have one (a
  failed evaluation is an observation with the failed suites missing); observations of other
  candidates are ignored. ``new_state`` is JSON-serialisable (numbers, strings, lists, dicts;
  the CMA-ES object as base64 of its pickle) and ``propose`` is a pure function of
  ``(config, state, observations)``: the same inputs give the same proposals, so a search resumed
  from a generation file proposes exactly what an uninterrupted one would. An empty proposal list
  means the search is finished (``new_state["done"]`` is true);
* ``result(state) -> dict``: what the search found (best candidate, fronts, archives, the best
  validation objective per generation), JSON-serialisable.

The budget counts evaluations: every proposal counts one (a proposal equal to an earlier one is
a cache hit in the workflow but still counts, so the number of generations does not depend on
the cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from mergesweep.errors import ConfigError, MergesweepError
from mergesweep.ids import canonical_json, short_hash
from mergesweep.search.space import SearchSpace


class SearchError(MergesweepError):
    """A search cannot go on (a generation file is missing or corrupt, an observation is
    missing, a resumed search's config changed). The message names the file or the candidate."""


def params_key(params: Mapping[str, Any]) -> str:
    """The identity of a candidate's parameters (the canonical JSON the model ids hash)."""
    return canonical_json(dict(params))


def short_id(params: Mapping[str, Any]) -> str:
    """10 hex digits of :func:`params_key` (for names in tests and logs; the workflow's model ids
    come from :func:`mergesweep.ids.merge_model_id`)."""
    return short_hash(dict(params))


# --------------------------------------------------------------------------------------------
# proposals
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Proposal:
    """One candidate to merge and evaluate: its merge ``params`` (rounded by the space), its
    point ``x`` in ``[0, 1]^d`` (the point of the rounded params) and ``info`` about how it was
    made (e.g. MAP's predicted scores, CycleQD's parents and quality task)."""

    params: dict
    x: list[float]
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"params": self.params, "x": [float(v) for v in self.x], "info": self.info}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Proposal":
        return cls(params=dict(data["params"]), x=[float(v) for v in data["x"]], info=dict(data.get("info", {})))


def make_proposal(space: SearchSpace, x, info: Mapping[str, Any] | None = None) -> Proposal:
    params = space.to_params(x)
    return Proposal(params=params, x=[float(v) for v in space.to_vector(params)], info=dict(info or {}))


def match_observations(pending: Sequence[Mapping[str, Any]], observations: Sequence, generation: int) -> list:
    """The observation of each pending proposal (dicts from a state), in the same order;
    :class:`SearchError` naming the first proposal without one."""
    by_key = {}
    for o in observations:
        by_key.setdefault(params_key(o.params), o)
    out = []
    for p in pending:
        o = by_key.get(params_key(p["params"]))
        if o is None:
            raise SearchError(
                f"generation {generation}: no observation for proposal {canonical_json(p['params'])} "
                f"({len(observations)} observation(s) given); a failed evaluation is an observation "
                f"without scores"
            )
        out.append(o)
    return out


def generation_rng(seed: int, generation: int, stream: int = 0) -> np.random.Generator:
    """The random generator of one generation: a function of (seed, generation, stream) only,
    so a resumed search draws what an uninterrupted one would."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(generation), int(stream)]))


def rng_record(rng: np.random.Generator, seed: int, generation: int, stream: int = 0) -> dict:
    """The RNG state recorded in a generation file (its state before drawing)."""
    st = rng.bit_generator.state
    return {"seed_sequence": [int(seed), int(generation), int(stream)], "bit_generator": st["bit_generator"],
            "state": {k: int(v) for k, v in st["state"].items()}}


# --------------------------------------------------------------------------------------------
# objective
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Objective:
    """The validation objective: ``f(m) = sum_q w_q s(m, q) / r_q / sum_q w_q`` over ``suites``,
    where ``s(m, q)`` is the validation score on suite ``q`` and ``r_q`` the reference (the
    validation score of the suite's expert: the leaderboard's normalised score, so the default is
    the *mean normalised validation score*; 1 when not normalising). Higher is better. A
    candidate missing any suite with a non-zero weight has no value (``None``)."""

    suites: tuple[str, ...]
    weights: tuple[float, ...]
    reference: tuple[float, ...] | None = None

    @classmethod
    def from_config(
        cls,
        spec: Mapping[str, Any] | Sequence[str] | None,
        plan_suites: Sequence[str],
        key: str = "search.objective",
        reference: Mapping[str, float] | None = None,
    ) -> "Objective":
        """``spec``: ``None`` (every plan suite, equal weights), a list of suites, or
        ``{suites: [...], weights: {suite: w}, normalise: true|false}``. ``reference``: the
        validation score of each suite's expert (needed when ``normalise`` is true, the default
        when given). A suite not in ``plan_suites`` is a ConfigError naming the key."""
        plan_suites = list(plan_suites)
        if spec is None:
            spec = {}
        elif isinstance(spec, (list, tuple)):
            spec = {"suites": list(spec)}
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{key}: expected a list of suites or {{suites, weights, normalise}}, got {spec!r}")
        unknown = [k for k in spec if k not in ("suites", "weights", "normalise")]
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}: unknown key (the objective takes suites, weights, normalise)")
        suites = spec.get("suites", plan_suites)
        if not isinstance(suites, (list, tuple)) or not suites:
            raise ConfigError(f"{key}.suites: expected a non-empty list of suites")
        for i, s in enumerate(suites):
            if s not in plan_suites:
                raise ConfigError(
                    f"{key}.suites[{i}]: suite {s!r} is not in the plan (suites: {', '.join(plan_suites)})"
                )
        if len(set(suites)) != len(suites):
            raise ConfigError(f"{key}.suites: a suite is listed twice ({', '.join(suites)})")
        weights = spec.get("weights", {})
        if not isinstance(weights, Mapping):
            raise ConfigError(f"{key}.weights: expected a mapping suite -> weight")
        for s, w in weights.items():
            if s not in suites:
                where = "is not in the plan" if s not in plan_suites else "is not one of the objective's suites"
                raise ConfigError(f"{key}.weights.{s}: suite {s!r} {where} (suites: {', '.join(suites)})")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ConfigError(f"{key}.weights.{s}: expected a number >= 0, got {w!r}")
        ws = tuple(float(weights.get(s, 1.0)) for s in suites)
        if sum(ws) <= 0:
            raise ConfigError(f"{key}.weights: the weights sum to 0")
        normalise = spec.get("normalise", reference is not None)
        if not isinstance(normalise, bool):
            raise ConfigError(f"{key}.normalise: expected true or false, got {normalise!r}")
        ref = None
        if normalise:
            reference = dict(reference or {})
            missing = [s for s in suites if s not in reference]
            if missing:
                raise ConfigError(
                    f"{key}.normalise: no validation score of the expert of suite {missing[0]!r} to normalise by"
                )
            for s in suites:
                r = reference[s]
                if not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
                    raise ConfigError(f"{key}.normalise: the expert of suite {s!r} scores {r!r} on validation; cannot divide by it")
            ref = tuple(float(reference[s]) for s in suites)
        return cls(tuple(suites), ws, ref)

    def value(self, scores: Mapping[str, float]) -> float | None:
        total = 0.0
        for i, (s, w) in enumerate(zip(self.suites, self.weights)):
            if w == 0:
                continue
            v = scores.get(s)
            if v is None or not math.isfinite(v):
                return None
            total += w * (v / self.reference[i] if self.reference else v)
        return total / sum(self.weights)

    def to_dict(self) -> dict:
        return {"suites": list(self.suites), "weights": list(self.weights),
                "reference": None if self.reference is None else list(self.reference)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Objective":
        ref = data.get("reference")
        return cls(tuple(data["suites"]), tuple(float(w) for w in data["weights"]),
                   None if ref is None else tuple(float(r) for r in ref))


# --------------------------------------------------------------------------------------------
# checks of options
# --------------------------------------------------------------------------------------------
def check_int(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: expected an integer >= {minimum}, got {value!r}")
    return value


def check_float(value: Any, where: str, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    v = float(value)
    if (low is not None and (v < low or (low_open and v == low))) or (high is not None and v > high):
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ConfigError(f"{where}: {v:g} is out of range {'(' if low_open else '['}{lo}, {hi}]")
    return v


def check_budget(budget: Any, population: Any, key: str) -> tuple[int, int]:
    """``population >= 2`` and ``budget >= population`` (at least one generation)."""
    population = check_int(population, f"{key}.population", 1)
    if population < 2:
        raise ConfigError(f"{key}.population: {population} is too small; a generation needs at least 2 candidates")
    budget = check_int(budget, f"{key}.budget", 1)
    if budget < population:
        raise ConfigError(
            f"{key}.budget: {budget} evaluations is smaller than one generation ({key}.population: {population})"
        )
    return budget, population


def check_options(options: Mapping[str, Any], known: Sequence[str], key: str, strategy: str) -> None:
    for k in options:
        if k not in known:
            raise ConfigError(f"{key}.{k}: unknown option of strategy {strategy!r} (its options: {', '.join(known)})")


class Strategy:
    """Base class: the attributes every strategy has and the config recorded in its generation
    files (:meth:`config`; a resumed search refuses a different one)."""

    name = ""

    def __init__(self, space: SearchSpace, objective: Objective, budget: int, seed: int):
        self.space = space
        self.objective = objective
        self.budget = budget
        self.seed = seed

    def options(self) -> dict:  # pragma: no cover - each strategy overrides
        return {}

    def config(self) -> dict:
        return {"strategy": self.name, "space": self.space.to_dict(), "objective": self.objective.to_dict(),
                "budget": self.budget, "seed": self.seed, "options": self.options()}

    def initial_state(self) -> dict:
        raise NotImplementedError

    def propose(self, state: Mapping[str, Any], observations: Sequence) -> tuple[list[Proposal], dict]:
        raise NotImplementedError

    def result(self, state: Mapping[str, Any]) -> dict:
        raise NotImplementedError

    # helpers -------------------------------------------------------------------------------
    def _remaining(self, state: Mapping[str, Any]) -> int:
        return self.budget - int(state["spent"])
