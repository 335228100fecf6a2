"""CMA-ES over the search space: maximise the validation objective.

Covariance Matrix Adaptation Evolution Strategy (Hansen & Ostermeier 2001, "Completely
derandomized self-adaptation in evolution strategies", Evolutionary Computation 9(2); Hansen
2016, "The CMA Evolution Strategy: A Tutorial", arXiv:1604.00772), through the ``cma`` package
(``cma.CMAEvolutionStrategy``, ask/tell), the optimiser mergekit-evolve also uses.

Each generation samples ``lambda`` (``population``) points ``x_k = m + sigma * B D z_k``,
``z_k ~ N(0, I)``, in ``[0, 1]^d`` (``bounds: [0, 1]``: cma's BoundTransform maps every sample
into the box), each rounded by the space to a merge; the merges are evaluated on validation and
the strategy minimises ``-f(x)``, ``f`` the :class:`~mergesweep.search.base.Objective` (by default
the mean normalised validation score, or a weighted mean per suite). ``tell`` then updates the
mean ``m``, the step size ``sigma`` (cumulative step-size adaptation) and the covariance ``C = B
D^2 B^T`` (rank-one and rank-mu updates) from the ranking of the population.

* Start: ``x0`` (merge params, mapped into the space; default the centre of the box) and
  ``sigma0`` (default 0.25 of the box's width).
* Randomness: cma draws its normal samples from ``randn`` = a NumPy ``Generator`` seeded by
  ``SeedSequence([seed, 0, 1])``, kept inside the CMA-ES object, which is pickled (base64) into
  every generation's state: a resumed search continues the same random stream and proposes
  exactly what an uninterrupted one would. cma's own seeding of NumPy's global RNG is not used,
  and it writes no files (``verb_log: 0``).
* ``tell`` receives the solutions exactly as ``ask`` returned them (kept in the state), with the
  objective of their rounded merge; a candidate whose validation score is missing on a suite of
  the objective (a failed evaluation) gets the worst fitness of its generation plus 1.
* The last generation is cut to the budget left (``ask`` draws a full population; the first
  ones are proposed); a cut generation is not told (the search ends with it). The search also
  ends when cma's termination criteria fire (e.g. ``tolfun``), recorded as ``stop``.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import numpy as np

from mergesweep.errors import ConfigError
from mergesweep.search.base import (
    Objective, Proposal, Strategy, check_budget, check_float, check_options, make_proposal,
    match_observations,
)
from mergesweep.search.space import SearchSpace
from mergesweep.search.state import pack, unpack

OPTIONS = ("population", "sigma0", "x0")
_STREAM = 1


class _Randn:
    """cma's ``randn(*shape)`` from a NumPy Generator (picklable with the CMA-ES object)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0, _STREAM]))

    def __call__(self, *shape):
        return self.rng.standard_normal(shape)


def rehash_solution_dicts(es):
    """``es`` (a CMA-ES object just unpickled) with every ``cma`` solution archive re-keyed.

    cma's archives (``sent_solutions``, ``archive``, the boundary handler's repaired solutions)
    key each solution by ``hash(x.tobytes())``, and Python salts bytes hashes per process: in
    another process (a resumed search, the next generation's job) ``tell`` would no longer find
    the genotypes ``ask`` archived and would fall back to the inverse boundary transformation, so
    a resumed search would propose other candidates than an uninterrupted one. Every archive's
    entries are moved to this process's keys of their own solutions (kept in ``_unhashed_keys``)."""
    from cma.utilities.utils import SolutionDict

    seen: set[int] = set()

    def rekey(d) -> None:
        data, same, unhashed = dict(d.data), dict(d.data_with_same_key), dict(d._unhashed_keys)
        d.data.clear()
        d.data_with_same_key.clear()
        d._unhashed_keys.clear()
        for k, v in data.items():
            new = d.key(unhashed[k]) if k in unhashed else k
            d.data[new] = v
            if k in unhashed:
                d._unhashed_keys[new] = unhashed[k]
            if k in same:
                d.data_with_same_key[new] = same[k]

    def walk(obj, depth: int) -> None:
        if id(obj) in seen or depth > 4:
            return
        seen.add(id(obj))
        if isinstance(obj, SolutionDict):
            rekey(obj)
            return
        if type(obj).__module__.split(".")[0] != "cma" or not hasattr(obj, "__dict__"):
            return
        for value in vars(obj).values():
            walk(value, depth + 1)

    walk(es, 0)
    return es


def default_population(d: int) -> int:
    """cma's default ``4 + floor(3 ln d)``."""
    return 4 + int(3 * np.log(max(d, 1)))


class CMAES(Strategy):
    name = "cmaes"

    def __init__(self, space: SearchSpace, objective: Objective, budget: int, seed: int = 0, *,
                 population: int | None = None, sigma0: float = 0.25, x0: Mapping[str, Any] | None = None,
                 key: str = "search"):
        if population is None:
            population = max(2, default_population(space.d))
        budget, population = check_budget(budget, population, key)
        super().__init__(space, objective, budget, int(seed))
        self.population = population
        self.sigma0 = check_float(sigma0, f"{key}.sigma0", 0.0, 1.0, low_open=True)
        if x0 is None:
            self.x0 = [0.5] * space.d
        else:
            if not isinstance(x0, Mapping):
                raise ConfigError(f"{key}.x0: expected merge parameters (a mapping), got {x0!r}")
            try:
                self.x0 = [float(v) for v in space.to_vector(x0)]
            except ValueError as e:
                raise ConfigError(f"{key}.x0: {e}") from None

    @classmethod
    def from_config(cls, options: Mapping[str, Any], space: SearchSpace, objective: Objective, *, budget: int,
                    seed: int = 0, key: str = "search") -> "CMAES":
        check_options(options, OPTIONS, key, cls.name)
        return cls(space, objective, budget, seed, key=key, **dict(options))

    def options(self) -> dict:
        return {"population": self.population, "sigma0": self.sigma0, "x0": self.x0}

    # ---------------------------------------------------------------------------------------
    def _new_es(self):
        import cma

        opts = {
            "bounds": [0.0, 1.0],
            "popsize": self.population,
            "randn": _Randn(self.seed),
            "seed": np.nan,  # no global seeding: randn above is the only source
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
        }
        return cma.CMAEvolutionStrategy(list(self.x0), self.sigma0, opts)

    def initial_state(self) -> dict:
        return {"generation": -1, "spent": 0, "done": False, "pending": [], "es": None, "history": [],
                "best": None, "stop": None}

    def propose(self, state: Mapping[str, Any], observations: Sequence) -> tuple[list[Proposal], dict]:
        state = copy.deepcopy(dict(state))
        if state["done"]:
            return [], state
        gen = state["generation"] + 1
        es = self._new_es() if state["es"] is None else rehash_solution_dicts(unpack(state["es"], "CMA-ES object"))
        if state["pending"]:
            self._observe(es, state, match_observations(state["pending"], observations, gen))
        state["pending"] = []
        stop = dict(es.stop()) if state["generation"] >= 0 else {}
        remaining = self._remaining(state)
        if remaining <= 0 or stop:
            state.update(generation=gen, done=True, es=pack(es), stop=stop or None)
            return [], state
        asked = es.ask()
        n = min(len(asked), remaining)
        proposals = []
        for x in asked[:n]:
            p = make_proposal(self.space, np.clip(x, 0.0, 1.0), {"generation": gen})
            proposals.append(p)
            state["pending"].append({**p.to_dict(), "asked": [float(v) for v in x]})
        state.update(generation=gen, spent=state["spent"] + n, es=pack(es),
                     sigma=float(es.sigma), mean=[float(v) for v in es.mean])
        return proposals, state

    def _observe(self, es, state: dict, matched: list) -> None:
        values = [self.objective.value(o.scores) for o in matched]
        finite = [-v for v in values if v is not None]
        penalty = (max(finite) + 1.0) if finite else 0.0
        fitness = [(-v if v is not None else penalty) for v in values]
        if len(matched) == self.population:
            es.tell([np.asarray(p["asked"], dtype=float) for p in state["pending"]], fitness)
        entry = {"generation": state["generation"], "values": values,
                 "best_value": max((v for v in values if v is not None), default=None)}
        best = state["best"]
        for p, o, v in zip(state["pending"], matched, values):
            if v is not None and (best is None or v > best["value"]):
                best = {"params": p["params"], "value": v, "scores": dict(o.scores),
                        "generation": state["generation"], "model_id": o.model_id}
        state["best"] = best
        entry["best_so_far"] = None if best is None else best["value"]
        state["history"].append(entry)

    def result(self, state: Mapping[str, Any]) -> dict:
        """The best candidate observed (validation objective), and the best value per generation."""
        return {"strategy": self.name, "best": state.get("best"), "history": state.get("history", []),
                "spent": state.get("spent", 0), "done": state.get("done", False), "stop": state.get("stop"),
                "mean": None if state.get("mean") is None else self.space.to_params(np.clip(state["mean"], 0, 1))}


__all__ = ["CMAES", "OPTIONS", "default_population"]
