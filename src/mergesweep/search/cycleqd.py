"""CycleQD: quality-diversity search over merge recipes, cycling which task is the quality.

Kuroki, Nakamura, Akiba, Tang, "Agent Skill Acquisition for Large Language Models via CycleQD"
(arXiv:2410.14735, ICLR 2025); authors' code github.com/SakanaAI/CycleQD.

**Candidates are recipes.** A candidate is a point ``r`` of the search space ``[0, 1]^d``: for
task arithmetic with per-expert ``weight``, the weights over the experts (the merged model is
``theta_0 + lambda sum_e w_e tau_e``). Every candidate is therefore an ordinary plan merge with a
content id, evaluated by the ordinary evaluation jobs.

**Archives.** With tasks ``t_1..t_T`` (the objective's suites, ``T >= 2``), each task ``q`` has a
MAP-Elites archive: a grid whose cell of a candidate is given by its validation scores on the
*other* tasks (behaviour descriptors), each binned into ``bins`` equal bins over ``bd_range``
(``[0, 1]`` by default; bin ``floor((s - low) / (high - low) * bins)``, clipped to the grid);
a cell holds the candidate with the highest validation score on ``q`` (the quality) seen in it. A
newcomer replaces a cell's elite only with a strictly higher quality. Every evaluated candidate
is offered to every task's archive (it was evaluated on all tasks), as in the authors' code; a
candidate missing the quality or a descriptor score (a failed evaluation) is not placed there.

**Generations.** Generation 0 evaluates the seed recipes: with ``init: corners`` (the default)
the ``d`` unit vectors of the space -- with per-expert weights in ``[0, 1]`` (and nothing else
searched, or ``lambda`` fixed at 1) these are the experts themselves, the paper's seed models --
then uniform random points up to ``population``. Generation ``g >= 1`` optimises the quality task
``q = tasks[(g - 1) mod T]`` (the cycle) and proposes ``population`` children, each:

1. **Parent selection** from ``q``'s archive. ``sampling: elite`` (the paper's): elite ``e`` is
   drawn with probability proportional to ``a(quality_e) * prod_k a(bin_e,k)``, each factor the
   value mapped linearly onto ``[0.5, 0.8]`` over the archive (1 when all are equal), two distinct
   parents without replacement; ``sampling: random``: uniformly. One elite: both parents are it.
2. **Crossover = a merge of the two parents with sampled coefficients**: as the paper's
   model-wise linear merge ``tau = (w_1 tau_1 + w_2 tau_2) / (w_1 + w_2)``,
   ``w_i ~ N(1, crossover_std)`` (clipped to ``>= 1e-3``), applied to recipes:
   ``r = a r_1 + (1 - a) r_2``, ``a = w_1 / (w_1 + w_2)`` -- a convex combination (task
   arithmetic is linear in the weights, so the recipe of the merged parents is the merge of their
   recipes).
3. **Mutation**: ``r <- clip(r + delta, 0, 1)``, ``delta = sum_k xi_k (sigma_k + floor) v_k``,
   where ``v_k`` are the principal directions (right singular vectors of the SVD of the centred
   matrix of ``q``'s elite recipes, completed to a basis of ``R^d``), ``sigma_k = S_k / sqrt(n)``
   the elites' spread along them (0 for directions they do not span), ``xi_k ~
   U(-mutation_scale, mutation_scale)`` and ``floor = mutation_floor`` keeps every direction
   explorable.

**How this departs from the paper, and why.** The paper's mutation perturbs the child *model*:
``tau_child += U diag(s * u) V^T`` per weight matrix, with ``U, s, V`` the SVD of the quality
task's expert task vector and ``u_i ~ U(0, mutation_rate)``, i.e. it adds random fractions of that
expert's singular components. Such a child is no longer a merge of the experts with parameters:
it has no recipe, so it could not be a plan merge with a content id, be cached or be re-created
from the config. Here the mutation stays in recipe space and the SVD is taken over the archive's
elite recipes, so the perturbation follows the directions in which good recipes of the quality
task differ (a low-dimensional analogue of perturbing along principal components). Also: the
paper's crossover merges parent *models*, which for recipes is the convex combination above;
children are proposed a population per generation (the paper runs one merge per worker and
cycles the task per merge); the optional CMA-ES adaptation of the merge parameters in the
authors' code is not implemented; a child is kept in the archives only through its validation
scores, never test.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping, Sequence

import numpy as np

from mergesweep.errors import ConfigError
from mergesweep.search.base import (
    Objective, Proposal, Strategy, check_budget, check_float, check_int, check_options, generation_rng,
    make_proposal, match_observations, rng_record,
)
from mergesweep.search.space import SearchSpace

OPTIONS = ("population", "bins", "bd_range", "sampling", "crossover_std", "mutation_scale", "mutation_floor", "init")
SAMPLINGS = ("elite", "random")
INITS = ("corners", "random")
_ELITE_RANGE = (0.5, 0.8)


# --------------------------------------------------------------------------------------------
# archives (plain dicts, so they live in a JSON state)
# --------------------------------------------------------------------------------------------
def bin_of(value: float, low: float, high: float, bins: int) -> int:
    return int(min(max(math.floor((value - low) / (high - low) * bins), 0), bins - 1))


def cell_of(scores: Mapping[str, float], quality: str, tasks: Sequence[str], bins: int,
            ranges: Mapping[str, Sequence[float]]) -> tuple[int, ...] | None:
    """The cell of a candidate in ``quality``'s archive (bins of the other tasks' scores, in task
    order); None when a descriptor score is missing."""
    out = []
    for t in tasks:
        if t == quality:
            continue
        if t not in scores:
            return None
        lo, hi = ranges[t]
        out.append(bin_of(scores[t], lo, hi, bins))
    return tuple(out)


def cell_key(cell: Sequence[int]) -> str:
    return ",".join(str(int(c)) for c in cell)


def parse_cell(key: str) -> tuple[int, ...]:
    return tuple(int(c) for c in key.split(",")) if key else ()


def offer(archive: dict, cell: Sequence[int], entry: Mapping[str, Any]) -> bool:
    """Put ``entry`` (with ``quality``) in ``cell`` if the cell is empty or its elite's quality
    is strictly lower; returns whether it was placed."""
    k = cell_key(cell)
    old = archive.get(k)
    if old is None or entry["quality"] > old["quality"]:
        archive[k] = dict(entry)
        return True
    return False


def _affine(values: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(values)), float(np.max(values))
    if hi == lo:
        return np.ones_like(values, dtype=float)
    return _ELITE_RANGE[0] + (values - lo) / (hi - lo) * (_ELITE_RANGE[1] - _ELITE_RANGE[0])


def select_parents(archive: Mapping[str, Mapping[str, Any]], rng: np.random.Generator, sampling: str) -> tuple[str, str]:
    """Two cells of ``archive`` (sorted keys; see the module docstring)."""
    keys = sorted(archive, key=lambda k: parse_cell(k))
    if len(keys) == 1:
        return keys[0], keys[0]
    if sampling == "random":
        i, j = rng.choice(len(keys), 2, replace=False)
    else:
        probs = _affine(np.array([archive[k]["quality"] for k in keys], dtype=float))
        cells = np.array([parse_cell(k) for k in keys], dtype=float)
        for c in range(cells.shape[1]):
            probs = probs * _affine(cells[:, c])
        probs = probs / probs.sum()
        i, j = rng.choice(len(keys), 2, replace=False, p=probs)
    return keys[int(i)], keys[int(j)]


def crossover(r1, r2, rng: np.random.Generator, std: float) -> tuple[np.ndarray, float]:
    """``(a r1 + (1 - a) r2, a)`` with ``a = w1 / (w1 + w2)``, ``w_i ~ N(1, std)`` (>= 1e-3)."""
    w = np.maximum(rng.normal(1.0, std, size=2), 1e-3)
    a = float(w[0] / w.sum())
    return a * np.asarray(r1, dtype=float) + (1.0 - a) * np.asarray(r2, dtype=float), a


def principal_directions(elites) -> tuple[np.ndarray, np.ndarray]:
    """``(V, sigma)``: rows of ``V`` an orthonormal basis of ``R^d`` (principal directions of the
    centred elite recipes first), ``sigma`` the elites' standard deviation along each."""
    R = np.atleast_2d(np.asarray(elites, dtype=float))
    n, d = R.shape
    C = R - R.mean(axis=0)
    _, S, Vt = np.linalg.svd(C, full_matrices=True)
    sigma = np.zeros(d)
    sigma[: len(S)] = S / math.sqrt(n)
    return Vt, sigma


def mutate(r, elites, rng: np.random.Generator, scale: float, floor: float) -> np.ndarray:
    V, sigma = principal_directions(elites)
    xi = rng.uniform(-scale, scale, size=len(sigma))
    return np.clip(np.asarray(r, dtype=float) + (xi * (sigma + floor)) @ V, 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# the strategy
# --------------------------------------------------------------------------------------------
class CycleQD(Strategy):
    name = "cycleqd"

    def __init__(self, space: SearchSpace, objective: Objective, budget: int, seed: int = 0, *,
                 population: int = 8, bins: int = 10, bd_range: Mapping[str, Sequence[float]] | Sequence[float] | None = None,
                 sampling: str = "elite", crossover_std: float = 0.01, mutation_scale: float = 0.5,
                 mutation_floor: float = 0.02, init: str = "corners", key: str = "search"):
        budget, population = check_budget(budget, population, key)
        tasks = objective.suites
        if len(tasks) < 2:
            raise ConfigError(f"{key}.objective: CycleQD needs at least 2 suites (a quality and a behaviour "
                              f"descriptor); got {', '.join(tasks) or 'none'}")
        if init not in INITS:
            raise ConfigError(f"{key}.init: {init!r} is not one of {', '.join(INITS)}")
        n_init = max(population, space.d) if init == "corners" else population
        if budget < n_init:
            raise ConfigError(f"{key}.budget: {budget} evaluations is smaller than the first generation "
                              f"({n_init}: the {space.d} seed corners, filled up to {key}.population)")
        if sampling not in SAMPLINGS:
            raise ConfigError(f"{key}.sampling: {sampling!r} is not one of {', '.join(SAMPLINGS)}")
        super().__init__(space, objective, budget, int(seed))
        self.population = population
        self.bins = check_int(bins, f"{key}.bins", 1)
        self.ranges = self._ranges(bd_range, tasks, key)
        self.sampling = sampling
        self.crossover_std = check_float(crossover_std, f"{key}.crossover_std", 0.0)
        self.mutation_scale = check_float(mutation_scale, f"{key}.mutation_scale", 0.0)
        self.mutation_floor = check_float(mutation_floor, f"{key}.mutation_floor", 0.0)
        self.init = init

    @staticmethod
    def _ranges(spec, tasks, key) -> dict[str, list[float]]:
        def pair(v, where):
            if (not isinstance(v, (list, tuple)) or len(v) != 2
                    or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) for b in v)
                    or not v[0] < v[1]):
                raise ConfigError(f"{where}: expected [low, high] with low < high, got {v!r}")
            return [float(v[0]), float(v[1])]

        if spec is None:
            return {t: [0.0, 1.0] for t in tasks}
        if isinstance(spec, Mapping):
            for t in spec:
                if t not in tasks:
                    raise ConfigError(f"{key}.bd_range.{t}: suite {t!r} is not one of the objective's suites "
                                      f"({', '.join(tasks)})")
            return {t: pair(spec[t], f"{key}.bd_range.{t}") if t in spec else [0.0, 1.0] for t in tasks}
        r = pair(spec, f"{key}.bd_range")
        return {t: list(r) for t in tasks}

    @classmethod
    def from_config(cls, options: Mapping[str, Any], space: SearchSpace, objective: Objective, *, budget: int,
                    seed: int = 0, key: str = "search") -> "CycleQD":
        check_options(options, OPTIONS, key, cls.name)
        return cls(space, objective, budget, seed, key=key, **dict(options))

    def options(self) -> dict:
        return {"population": self.population, "bins": self.bins, "bd_range": self.ranges,
                "sampling": self.sampling, "crossover_std": self.crossover_std,
                "mutation_scale": self.mutation_scale, "mutation_floor": self.mutation_floor, "init": self.init}

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.objective.suites

    def quality_task(self, generation: int) -> str | None:
        """The quality task of a generation (None for the seed generation 0)."""
        return None if generation == 0 else self.tasks[(generation - 1) % len(self.tasks)]

    # ---------------------------------------------------------------------------------------
    def initial_state(self) -> dict:
        return {"generation": -1, "spent": 0, "done": False, "pending": [],
                "archives": {t: {} for t in self.tasks}, "history": [], "best": None}

    def propose(self, state: Mapping[str, Any], observations: Sequence) -> tuple[list[Proposal], dict]:
        state = copy.deepcopy(dict(state))
        if state["done"]:
            return [], state
        gen = state["generation"] + 1
        if state["pending"]:
            self._observe(state, match_observations(state["pending"], observations, gen))
        state["pending"] = []
        remaining = self._remaining(state)
        if remaining <= 0:
            state.update(generation=gen, done=True)
            return [], state
        rng = generation_rng(self.seed, gen)
        state["rng"] = rng_record(rng, self.seed, gen)
        if gen == 0:
            xs, infos = self._seeds(rng)
        else:
            xs, infos = self._children(state, gen, rng, min(self.population, remaining))
        n = min(len(xs), remaining)
        proposals = [make_proposal(self.space, x, info) for x, info in zip(xs[:n], infos[:n])]
        state.update(generation=gen, spent=state["spent"] + n, pending=[p.to_dict() for p in proposals])
        return proposals, state

    def _seeds(self, rng) -> tuple[list, list]:
        d = self.space.d
        xs, infos = [], []
        if self.init == "corners":
            for i in range(d):
                xs.append(np.eye(d)[i])
                infos.append({"generation": 0, "role": "seed", "corner": self.space.names[i]})
        while len(xs) < self.population:
            xs.append(rng.random(d))
            infos.append({"generation": 0, "role": "random"})
        return xs, infos

    def _children(self, state: dict, gen: int, rng, n: int) -> tuple[list, list]:
        q = self.quality_task(gen)
        archive = state["archives"][q]
        xs, infos = [], []
        if not archive:  # nothing placed yet (every evaluation failed): random recipes
            for _ in range(n):
                xs.append(rng.random(self.space.d))
                infos.append({"generation": gen, "role": "random", "quality_task": q})
            return xs, infos
        elites = np.array([archive[k]["x"] for k in sorted(archive, key=parse_cell)])
        for _ in range(n):
            k1, k2 = select_parents(archive, rng, self.sampling)
            child, a = crossover(archive[k1]["x"], archive[k2]["x"], rng, self.crossover_std)
            mutated = mutate(child, elites, rng, self.mutation_scale, self.mutation_floor)
            xs.append(mutated)
            infos.append({"generation": gen, "role": "child", "quality_task": q,
                          "parents": [archive[k1]["params"], archive[k2]["params"]],
                          "parent_cells": [k1, k2], "coefficient": a,
                          "crossover_x": [float(v) for v in child]})
        return xs, infos

    def _observe(self, state: dict, matched: list) -> None:
        placed = {t: 0 for t in self.tasks}
        values = []
        best = state["best"]
        for p, o in zip(state["pending"], matched):
            entry_base = {"x": p["x"], "params": p["params"], "scores": dict(o.scores),
                          "generation": state["generation"], "model_id": o.model_id}
            for q in self.tasks:
                if q not in o.scores:
                    continue
                cell = cell_of(o.scores, q, self.tasks, self.bins, self.ranges)
                if cell is None:
                    continue
                if offer(state["archives"][q], cell, {**entry_base, "quality": o.scores[q]}):
                    placed[q] += 1
            v = self.objective.value(o.scores)
            values.append(v)
            if v is not None and (best is None or v > best["value"]):
                best = {**entry_base, "value": v}
        state["best"] = best
        state["history"].append({
            "generation": state["generation"], "quality_task": self.quality_task(state["generation"]),
            "values": values, "best_value": max((v for v in values if v is not None), default=None),
            "best_so_far": None if best is None else best["value"], "placed": placed,
            "archive_sizes": {t: len(a) for t, a in state["archives"].items()},
        })

    def result(self, state: Mapping[str, Any]) -> dict:
        """Per task the best elite of its archive (highest quality) and the archive's coverage;
        the best candidate on the objective; the history per generation."""
        per_task = {}
        for t, archive in state.get("archives", {}).items():
            if archive:
                k = max(sorted(archive, key=parse_cell), key=lambda c: archive[c]["quality"])
                per_task[t] = {"cell": k, **archive[k], "cells": len(archive),
                               "grid": self.bins ** (len(self.tasks) - 1)}
            else:
                per_task[t] = None
        return {"strategy": self.name, "tasks": list(self.tasks), "best_per_task": per_task,
                "best": state.get("best"), "archives": state.get("archives"),
                "history": state.get("history", []), "spent": state.get("spent", 0), "done": state.get("done", False)}
