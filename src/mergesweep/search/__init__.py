"""Searching the merge space: MAP Pareto fronts, CMA-ES and CycleQD, one generation at a time.

This package is the workflow-independent core of a search; the workflow plans each generation
as a Snakemake checkpoint and calls :func:`~mergesweep.search.driver.plan_next`. Nothing here
imports torch, cma or pymoo at import time (the plan imports the package on every snakemake
call); the strategies import their libraries when they first run.

Design
======

**Space** (:mod:`.space`). ``SearchSpace.from_config(method, params_spec, experts, key)``
describes which parameters of a base merge method are searched and between which bounds
(``{name: {low, high}}`` or ``{name: {per_expert: true, low, high}}``), validated against the
method's :class:`~mergesweep.merge.spec.MethodSpec`; every error is a ConfigError naming the key
(``search[0].params.densty: ties has no parameter 'densty' (its parameters: ...)``). A point
``x`` of ``[0, 1]^d`` maps affinely onto the parameters (``to_params``: per-expert values as
lists in expert order, rounded to ``digits`` significant digits so that nearly equal proposals
are the same merge with the same content id) and back (``to_vector``). Strategies work in
``[0, 1]^d`` only.

**Observations** (:mod:`.observations`). ``Observation(params, scores, model_id)``: a candidate's
merge parameters and its *validation* score per suite. **A strategy never receives a test
score**: :func:`~.observations.observations_from_scores` builds observations from a scores table
(``results/tables/scores.parquet``'s columns) after dropping every row whose ``split`` is not
``validation``, and refuses to be asked for another split.

**Objective** (:class:`~.base.Objective`): the mean normalised validation score over the
objective's suites (each suite's score divided by its expert's validation score), or a weighted
mean (``weights`` per suite), or raw scores (``normalise: false``). A suite not in the plan is a
ConfigError naming the key.

**Strategies** (one module each, formula, paper and departures in its docstring), all with
``initial_state()``, ``propose(state, observations) -> (proposals, new_state)`` and
``result(state)``; ``propose`` is a pure function of the strategy's config, the JSON state and the
observations of the previous generation's proposals (see :mod:`.base`):

* ``map`` (:mod:`.map`): a design of ``n_samples`` coefficient vectors (the authors' one-hot +
  grid design, or Sobol/uniform), per-task quadratic surrogates by least squares with their
  leave-one-out RMSE, the surrogates' Pareto set by NSGA-II (pymoo), ``n_front`` points of it
  evaluated, predicted vs measured reported. Three generations.
* ``cmaes`` (:mod:`.cmaes`): ``cma.CMAEvolutionStrategy`` in ``[0, 1]^d``, seeded, the CMA-ES
  object pickled into each generation's state, maximising the objective.
* ``cycleqd`` (:mod:`.cycleqd`): MAP-Elites archives per task (cells: the other tasks' scores),
  parent selection, crossover = convex combination of two parent recipes with sampled
  coefficients, mutation along the principal directions of the archive's elite recipes, the
  quality task cycling per generation.

Budgets: ``budget`` counts evaluations (proposals). A budget smaller than one generation, a
population below 2, ``n_front`` above the budget, or a MAP design too small for its quadratic
are ConfigErrors naming the key.

**State** (:mod:`.state`). One JSON file per generation, ``<dir>/generation-NNNN.json``, written
atomically: strategy, generation index, seed, config, the observations it saw, its proposals
(params, ``x``, info) and the strategy's serialised state (RNG records, archives, fits, the
CMA-ES object as base64 of its pickle). ``resume(dir)`` returns the last generation; a missing
or corrupt file is a SearchError naming it. A resumed search proposes exactly what an
uninterrupted one would.

**Driver** (:mod:`.driver`). ``plan_next(strategy, dir, observations)`` reads the last
generation, checks the config did not change, calls ``propose`` and writes the next generation
(an empty one: the search is finished). ``run_loop(strategy, evaluate, dir)`` runs a search
in-process (tests, synthetic objectives).

What the workflow integration has to do
=======================================

1. Config: a ``search`` list; per entry ``strategy`` (:data:`STRATEGIES`), ``method``,
   ``params`` (the space), ``fixed``, ``experts``, ``objective``, ``budget``, ``seed`` and the
   strategy's options; build with :func:`make_search` (all checks, errors naming
   ``search[i]...``). The objective's normalisation needs the experts' validation scores
   (:func:`~.observations.reference_scores`), so the experts' validation evaluations come first.
2. One checkpoint per generation: read the scores of the last generation's proposals (their
   merges are ordinary plan merges: ``space.to_params`` gives the params, the plan gives the
   ids), build observations with :func:`~.observations.observations_from_scores`, call
   ``plan_next``; the new file's proposals are the next generation's merges. Stop when a
   generation proposes nothing.
3. Reports: ``strategy.result(state)`` of the last generation (best candidate, MAP's predicted
   and measured fronts and report, CycleQD's archives, ``history`` = best validation objective per
   generation for the convergence plot); the leaderboard selects among the search's candidates on
   validation and ranks on test.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping, Sequence

from mergesweep.errors import ConfigError
from mergesweep.search.base import Objective, Proposal, SearchError, Strategy
from mergesweep.search.observations import Observation, observations_from_scores, reference_scores
from mergesweep.search.space import SearchSpace

#: strategy name -> (module, class)
STRATEGIES = {"map": ("mergesweep.search.map", "MAP"),
              "cmaes": ("mergesweep.search.cmaes", "CMAES"),
              "cycleqd": ("mergesweep.search.cycleqd", "CycleQD")}


def strategy_class(name: str, key: str = "search"):
    if name not in STRATEGIES:
        raise ConfigError(f"{key}.strategy: unknown search strategy {name!r} (known: {', '.join(STRATEGIES)})")
    module, cls = STRATEGIES[name]
    return getattr(importlib.import_module(module), cls)


_COMMON = ("strategy", "method", "params", "fixed", "digits", "objective", "budget", "seed")


def make_search(entry: Mapping[str, Any], *, experts: Sequence[str], suites: Sequence[str],
                reference: Mapping[str, float] | None = None, key: str = "search[0]",
                has_base: bool = True) -> Strategy:
    """Build a strategy from one config entry ``{strategy, method, params, fixed?, digits?,
    objective?, budget, seed?, <strategy options>}`` (every check, errors naming ``key``).
    ``experts``: the merge's experts in plan order; ``suites``: the plan's suites;
    ``reference``: the experts' validation score per suite (for the normalised objective)."""
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{key}: expected a mapping")
    for k in ("strategy", "method", "params", "budget"):
        if k not in entry:
            raise ConfigError(f"{key}.{k}: missing")
    cls = strategy_class(entry["strategy"], key)
    space = SearchSpace.from_config(entry["method"], entry["params"], experts, key,
                                    fixed=entry.get("fixed"), digits=entry.get("digits", 4), has_base=has_base)
    objective = Objective.from_config(entry.get("objective"), suites, f"{key}.objective", reference)
    seed = entry.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{key}.seed: expected an integer >= 0, got {seed!r}")
    options = {k: v for k, v in entry.items() if k not in _COMMON}
    return cls.from_config(options, space, objective, budget=entry["budget"], seed=seed, key=key)


__all__ = ["STRATEGIES", "Objective", "Observation", "Proposal", "SearchError", "SearchSpace", "Strategy",
           "make_search", "observations_from_scores", "reference_scores", "strategy_class"]
