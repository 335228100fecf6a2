"""MAP: amortised Pareto fronts of the merging coefficients from quadratic surrogates.

Li, Zhang, Bu, Wang, He, Fu, Wu, Bian, Chen, Bengio, "MAP: Low-compute Model Merging with
Amortized Pareto Fronts via Quadratic Approximation" (arXiv:2406.07529, 2024; first titled "Model
merging with Amortized Pareto Fronts using Limited Computation"); authors' code
github.com/luli-git/MAP.

Three generations:

0. **Design**: ``N = n_samples`` coefficient vectors ``c`` in ``[0, 1]^d`` (``d`` coordinates of
   the space; for task arithmetic with per-expert ``weight`` in ``[0, 1]``, ``c`` is the paper's
   vector of task-vector scalings). ``design: map`` (the default) is the authors' design (their
   ``Sampling.generate_combined_points`` with no isotropic or perturbed points, as ``run_MAP``
   calls it): the ``d`` one-hot vectors (each expert alone), then points of a regular grid with
   ``g = ceil((2 n)^(1/d))`` levels per axis (``n`` the points still wanted; at least 3 levels,
   so a quadratic is identifiable) without its one-hot, isotropic (all coordinates equal) and
   sum-to-one points, ``n`` of them drawn without replacement (seeded). ``design: sobol`` is a
   scrambled Sobol sequence (``scipy.stats.qmc.Sobol``, seeded), ``design: uniform`` i.i.d.
   uniform points. If the design's quadratic features are rank-deficient, points are replaced by
   seeded uniform ones until they are not.
1. **Fit and front**: for each task ``t`` (suite of the objective) the surrogate

       m_t(c) = b_0 + sum_i b_i c_i + sum_{i <= j} b_ij c_i c_j

   is fitted by ordinary least squares to the design's validation scores (``p = (d+1)(d+2)/2``
   coefficients; ``N >= p`` is checked at config time). Its error estimate is the leave-one-out
   RMSE, exact for least squares: ``e_i = r_i / (1 - h_ii)``, ``h = diag(F (F^T F)^+ F^T)``
   (undefined, ``None``, when ``N = p``). The Pareto set of ``(m_1, ..., m_T)`` over the box is
   computed by NSGA-II (pymoo, ``pop_size`` x ``n_gen``, seeded) maximising every surrogate; it is
   the *predicted front* (kept in the state for reports). ``n_front`` of its points are chosen to
   cover it (the extreme point of each task, then farthest-point sampling in the front's
   objective space normalised to ``[0, 1]`` per task) and proposed, with their predicted scores.
2. **Measure**: the measured validation scores of those points are compared with the prediction
   (:func:`predicted_vs_measured`: per point and task the error, per task the RMSE of those
   errors next to the surrogate's own LOO RMSE). The search ends.

The tasks are the objective's suites (their weights and normalisation do not change the front;
they only score the candidates in ``history``).

Departures from the paper / authors' code, and why:

* The surrogate is the plain quadratic fitted by linear least squares; the authors' code passes
  it through a sigmoid (accuracy) or softplus (loss) and fits it with ``scipy.optimize.curve_fit``.
  Linear least squares has a unique solution, an exact leave-one-out error and no initial guess,
  so a resumed or repeated search fits the same coefficients; scores here are already bounded
  suite means.
* NSGA-II (pymoo) instead of DEAP's NSGA-III with the authors' reference points, and the box
  ``[0, 1]^d`` of the space instead of their ``[-3, 3]``: the search never proposes a merge
  outside the bounds the config gives.
* The paper shows the whole amortised front; a workflow must evaluate a finite set, so
  ``n_front`` points of it are proposed and measured (the paper's "MAP, real" front).
* The nested and Bayesian variants of the paper are not implemented.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from mergesweep.errors import ConfigError
from mergesweep.search.base import (
    Objective, Proposal, SearchError, Strategy, check_int, check_options, generation_rng, make_proposal,
    match_observations, params_key, rng_record,
)
from mergesweep.search.space import SearchSpace

OPTIONS = ("n_front", "n_samples", "design", "pop_size", "n_gen")
DESIGNS = ("map", "sobol", "uniform")


# --------------------------------------------------------------------------------------------
# the quadratic surrogate
# --------------------------------------------------------------------------------------------
def n_coefficients(d: int) -> int:
    """``(d + 1)(d + 2) / 2``: constant, ``d`` linear, ``d (d + 1) / 2`` quadratic terms."""
    return (d + 1) * (d + 2) // 2


def quadratic_terms(d: int) -> list[tuple[int, ...]]:
    """The terms in feature order: ``()``, ``(i,)`` for ``c_i``, ``(i, j)`` (``i <= j``) for
    ``c_i c_j``."""
    return [()] + [(i,) for i in range(d)] + [(i, j) for i in range(d) for j in range(i, d)]


def quadratic_features(X) -> np.ndarray:
    """``[1, c_1..c_d, c_i c_j (i <= j)]`` per row of ``X`` (N x d) -> N x p."""
    X = np.atleast_2d(np.asarray(X, dtype=float))
    n, d = X.shape
    cols = [np.ones(n)] + [X[:, i] for i in range(d)] + [X[:, i] * X[:, j] for i in range(d) for j in range(i, d)]
    return np.column_stack(cols)


@dataclass(frozen=True)
class QuadraticFit:
    """A fitted surrogate: ``coef`` in :func:`quadratic_terms` order, training RMSE, leave-one-out
    RMSE (None when ``n <= p`` or a point has leverage 1), number of points and the feature
    matrix's rank."""

    coef: tuple[float, ...]
    rmse: float
    loo_rmse: float | None
    n: int
    rank: int

    def predict(self, X) -> np.ndarray:
        return quadratic_features(X) @ np.asarray(self.coef)

    def to_dict(self) -> dict:
        return {"coef": list(self.coef), "rmse": self.rmse, "loo_rmse": self.loo_rmse, "n": self.n, "rank": self.rank}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuadraticFit":
        return cls(tuple(float(c) for c in data["coef"]), float(data["rmse"]),
                   None if data["loo_rmse"] is None else float(data["loo_rmse"]), int(data["n"]), int(data["rank"]))


def fit_quadratic(X, y) -> QuadraticFit:
    """Least-squares quadratic surrogate of ``y`` over ``X`` (see the module docstring)."""
    F = quadratic_features(X)
    y = np.asarray(y, dtype=float)
    coef, _, rank, _ = np.linalg.lstsq(F, y, rcond=None)
    resid = y - F @ coef
    n, p = F.shape
    loo = None
    if n > p and rank == p:
        h = np.einsum("ij,ji->i", F, np.linalg.pinv(F))  # diag(F F^+)
        if np.all(1.0 - h > 1e-10):
            loo = float(np.sqrt(np.mean((resid / (1.0 - h)) ** 2)))
    return QuadraticFit(tuple(float(c) for c in coef), float(np.sqrt(np.mean(resid**2))), loo, int(n), int(rank))


# --------------------------------------------------------------------------------------------
# designs, fronts
# --------------------------------------------------------------------------------------------
def map_design(d: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """The authors' design (module docstring): one-hot vectors, then grid points."""
    corners = np.eye(d)[: min(d, n)]
    rest = n - len(corners)
    if rest <= 0:
        return corners
    g = max(3, int(math.ceil((rest / 0.5) ** (1.0 / d))))
    grid = np.stack(np.meshgrid(*[np.linspace(0.0, 1.0, g)] * d, indexing="ij"), -1).reshape(-1, d)
    onehot = (np.sum(grid == 1.0, axis=1) == 1) & (np.sum(grid == 0.0, axis=1) == d - 1)
    isotropic = np.all(grid == grid[:, :1], axis=1)
    sum_one = np.isclose(grid.sum(axis=1), 1.0)
    grid = grid[~(onehot | isotropic | sum_one)]
    if len(grid) > rest:
        grid = grid[np.sort(rng.choice(len(grid), rest, replace=False))]
    fill = rng.random((rest - len(grid), d))
    return np.vstack([corners, grid, fill])


def design_points(kind: str, d: int, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "map":
        X = map_design(d, n, rng)
    elif kind == "sobol":
        import warnings

        from scipy.stats import qmc

        try:
            sobol = qmc.Sobol(d, scramble=True, rng=rng)
        except TypeError:  # scipy < 1.15
            sobol = qmc.Sobol(d, scramble=True, seed=rng)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # n not a power of 2: balance properties
            X = sobol.random(n)
    else:
        X = rng.random((n, d))
    p = n_coefficients(d)
    for _ in range(1000):  # make the quadratic identifiable (n >= p is checked at config time)
        if np.linalg.matrix_rank(quadratic_features(X)) >= p:
            break
        i = int(rng.integers(d if kind == "map" else 0, n))  # keep the one-hot corners
        X[i] = rng.random(d)
    return X


def non_dominated(F) -> np.ndarray:
    """Indices of the rows of ``F`` (maximised) not dominated by another row (equal rows: the
    first is kept)."""
    F = np.asarray(F, dtype=float)
    keep = []
    for i in range(len(F)):
        ge = np.all(F >= F[i], axis=1)
        gt = np.any(F > F[i], axis=1)
        dominated = np.any(ge & gt)
        duplicate_before = np.any(np.all(F[:i] == F[i], axis=1)) if i else False
        if not dominated and not duplicate_before:
            keep.append(i)
    return np.asarray(keep, dtype=int)


def surrogate_front(fits: Sequence[QuadraticFit], d: int, seed: int, pop_size: int = 100,
                    n_gen: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """The Pareto set ``X`` (in ``[0, 1]^d``) and predicted front ``F`` (maximised) of the
    surrogates, by pymoo's NSGA-II, sorted by the first task."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.problem import Problem
    from pymoo.optimize import minimize

    coefs = np.array([f.coef for f in fits])  # T x p

    class _Surrogates(Problem):
        def __init__(self):
            super().__init__(n_var=d, n_obj=len(fits), xl=0.0, xu=1.0)

        def _evaluate(self, X, out, *args, **kwargs):
            out["F"] = -(quadratic_features(X) @ coefs.T)

    res = minimize(_Surrogates(), NSGA2(pop_size=pop_size), ("n_gen", n_gen), seed=int(seed), verbose=False)
    X = np.atleast_2d(res.X)
    F = -np.atleast_2d(res.F)
    keep = non_dominated(F)
    X, F = X[keep], F[keep]
    order = np.lexsort(F.T[::-1])
    return X[order], F[order]


def spread_points(F, k: int) -> list[int]:
    """``k`` indices of rows of ``F`` covering it: each objective's best row, then farthest-point
    sampling in ``F`` normalised to ``[0, 1]`` per column (deterministic: ties to the lowest
    index)."""
    F = np.asarray(F, dtype=float)
    if len(F) == 0 or k <= 0:
        return []
    span = F.max(axis=0) - F.min(axis=0)
    G = (F - F.min(axis=0)) / np.where(span > 0, span, 1.0)
    chosen: list[int] = []
    for t in range(F.shape[1]):
        i = int(np.argmax(F[:, t]))
        if i not in chosen and len(chosen) < k:
            chosen.append(i)
    while len(chosen) < min(k, len(F)):
        dist = np.min(np.linalg.norm(G[:, None, :] - G[None, chosen, :], axis=2), axis=1)
        dist[chosen] = -1.0
        chosen.append(int(np.argmax(dist)))
    return chosen


def predicted_vs_measured(
    predicted: Sequence[Mapping[str, float]],
    measured: Sequence[Mapping[str, float]],
    loo_rmse: Mapping[str, float | None],
) -> dict:
    """Per point and task: predicted, measured and ``error = measured - predicted`` (None where
    the measurement is missing); per task: the RMSE and largest absolute error over the points,
    the surrogate's own LOO RMSE, and how many points lie within 2 LOO RMSE of the prediction."""
    suites = list(loo_rmse)
    points = []
    for pred, meas in zip(predicted, measured):
        row = {}
        for s in suites:
            m = meas.get(s)
            row[s] = {"predicted": pred[s], "measured": m, "error": None if m is None else m - pred[s]}
        points.append(row)
    summary = {}
    for s in suites:
        errs = np.array([r[s]["error"] for r in points if r[s]["error"] is not None], dtype=float)
        loo = loo_rmse[s]
        summary[s] = {
            "n": int(errs.size),
            "rmse": float(np.sqrt(np.mean(errs**2))) if errs.size else None,
            "max_abs_error": float(np.max(np.abs(errs))) if errs.size else None,
            "loo_rmse": loo,
            "within_2_loo": None if loo is None else int(np.sum(np.abs(errs) <= 2 * loo)),
        }
    return {"points": points, "summary": summary}


# --------------------------------------------------------------------------------------------
# the strategy
# --------------------------------------------------------------------------------------------
class MAP(Strategy):
    name = "map"

    def __init__(self, space: SearchSpace, objective: Objective, budget: int, seed: int = 0, *,
                 n_front: int = 5, n_samples: int | None = None, design: str = "map", pop_size: int = 100,
                 n_gen: int = 200, key: str = "search"):
        budget = check_int(budget, f"{key}.budget", 1)
        n_front = check_int(n_front, f"{key}.n_front", 1)
        if n_front > budget:
            raise ConfigError(f"{key}.n_front: {n_front} front points is more than the budget ({key}.budget: {budget})")
        if len(objective.suites) < 2:
            raise ConfigError(f"{key}.objective: MAP needs at least 2 suites (tasks) to trade off; got "
                              f"{', '.join(objective.suites) or 'none'}")
        p = n_coefficients(space.d)
        if n_samples is None:
            n_samples = budget - n_front
            where = f"{key}.budget"
            if n_samples < p:
                raise ConfigError(
                    f"{where}: {budget} evaluations leave {n_samples} design points after {key}.n_front: {n_front}; "
                    f"a quadratic surrogate over {space.d} coordinates needs at least {p} (budget >= {p + n_front})"
                )
        else:
            n_samples = check_int(n_samples, f"{key}.n_samples", 1)
            if n_samples < p:
                raise ConfigError(f"{key}.n_samples: {n_samples} design points; a quadratic surrogate over "
                                  f"{space.d} coordinates needs at least {p}")
            if n_samples + n_front > budget:
                raise ConfigError(f"{key}.budget: {budget} is less than {key}.n_samples + {key}.n_front "
                                  f"({n_samples} + {n_front})")
        if design not in DESIGNS:
            raise ConfigError(f"{key}.design: {design!r} is not one of {', '.join(DESIGNS)}")
        super().__init__(space, objective, budget, int(seed))
        self.n_front, self.n_samples, self.design = n_front, n_samples, design
        self.pop_size = check_int(pop_size, f"{key}.pop_size", 4)
        self.n_gen = check_int(n_gen, f"{key}.n_gen", 1)

    @classmethod
    def from_config(cls, options: Mapping[str, Any], space: SearchSpace, objective: Objective, *, budget: int,
                    seed: int = 0, key: str = "search") -> "MAP":
        check_options(options, OPTIONS, key, cls.name)
        return cls(space, objective, budget, seed, key=key, **dict(options))

    def options(self) -> dict:
        return {"n_front": self.n_front, "n_samples": self.n_samples, "design": self.design,
                "pop_size": self.pop_size, "n_gen": self.n_gen}

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.objective.suites

    def initial_state(self) -> dict:
        return {"generation": -1, "spent": 0, "done": False, "phase": "design", "pending": [],
                "design": [], "fits": None, "front": None, "measured": [], "report": None, "history": []}

    def propose(self, state: Mapping[str, Any], observations: Sequence) -> tuple[list[Proposal], dict]:
        state = copy.deepcopy(dict(state))
        if state["done"]:
            return [], state
        gen = state["generation"] + 1
        matched = match_observations(state["pending"], observations, gen) if state["pending"] else []
        rows = [{"params": p["params"], "x": p["x"], "info": p.get("info", {}), "scores": dict(o.scores),
                 "model_id": o.model_id} for p, o in zip(state["pending"], matched)]
        self._history(state, rows)
        state["pending"] = []
        phase = state["phase"]
        if phase == "design":
            rng = generation_rng(self.seed, gen)
            record = rng_record(rng, self.seed, gen)
            X = design_points(self.design, self.space.d, self.n_samples, rng)
            proposals = [make_proposal(self.space, x, {"generation": gen, "role": "design"}) for x in X]
            state.update(phase="fit", rng=record)
        elif phase == "fit":
            state["design"] = rows
            proposals = self._fit_and_pick(state, gen)
            state["phase"] = "measure"
        else:  # measure
            state["measured"] = rows
            predicted = [r["info"]["predicted"] for r in rows]
            state["report"] = predicted_vs_measured(
                predicted, [r["scores"] for r in rows],
                {s: state["fits"][s]["loo_rmse"] for s in self.tasks})
            proposals = []
        state["generation"] = gen
        state["spent"] += len(proposals)
        state["pending"] = [p.to_dict() for p in proposals]
        if not proposals:
            state["done"] = True
        return proposals, state

    def _history(self, state: dict, rows: list[dict]) -> None:
        if not rows:
            return
        values = [self.objective.value(r["scores"]) for r in rows]
        prev = state["history"][-1]["best_so_far"] if state["history"] else None
        best = max([v for v in values if v is not None] + ([prev] if prev is not None else []), default=None)
        state["history"].append({"generation": state["generation"], "values": values,
                                 "best_value": max((v for v in values if v is not None), default=None),
                                 "best_so_far": best})

    def _fit_and_pick(self, state: dict, gen: int) -> list[Proposal]:
        fits = {}
        for s in self.tasks:
            pts = [(r["x"], r["scores"][s]) for r in state["design"] if s in r["scores"]]
            p = n_coefficients(self.space.d)
            if len(pts) < p:
                raise SearchError(
                    f"MAP generation {gen}: suite {s!r} has {len(pts)} validation score(s) among the "
                    f"{len(state['design'])} design points; the quadratic surrogate needs {p}"
                )
            X = np.array([x for x, _ in pts])
            y = np.array([v for _, v in pts])
            fits[s] = fit_quadratic(X, y)
        front_seed = int(np.random.SeedSequence([self.seed, gen, 2]).generate_state(1)[0])
        X, F = surrogate_front([fits[s] for s in self.tasks], self.space.d, front_seed, self.pop_size, self.n_gen)
        state["fits"] = {s: {**f.to_dict(), "terms": [list(t) for t in quadratic_terms(self.space.d)]}
                         for s, f in fits.items()}
        state["front"] = {"x": X.tolist(), "predicted": F.tolist(), "tasks": list(self.tasks),
                          "seed": front_seed}
        proposals, seen = [], set()
        order = spread_points(F, len(F))  # all of them, in coverage order: skip rounding duplicates
        for i in order:
            if len(proposals) == self.n_front:
                break
            p = make_proposal(self.space, X[i])
            k = params_key(p.params)
            if k in seen:
                continue
            seen.add(k)
            # the prediction at the rounded point actually merged
            pred = {s: float(fits[s].predict([p.x])[0]) for s in self.tasks}
            proposals.append(Proposal(p.params, p.x, {"generation": gen, "role": "front", "predicted": pred}))
        return proposals

    # ---------------------------------------------------------------------------------------
    def fits(self, state: Mapping[str, Any]) -> dict[str, QuadraticFit]:
        return {s: QuadraticFit.from_dict(f) for s, f in (state.get("fits") or {}).items()}

    def result(self, state: Mapping[str, Any]) -> dict:
        """The fits, the predicted front (coefficients, params and predicted scores), the measured
        front points and the predicted-vs-measured report."""
        front = state.get("front")
        predicted_front = None
        if front is not None:
            predicted_front = [{"x": x, "params": self.space.to_params(x),
                                "predicted": dict(zip(front["tasks"], f))}
                               for x, f in zip(front["x"], front["predicted"])]
        return {"strategy": self.name, "tasks": list(self.tasks), "fits": state.get("fits"),
                "predicted_front": predicted_front, "measured": state.get("measured"),
                "report": state.get("report"), "history": state.get("history", []),
                "spent": state.get("spent", 0), "done": state.get("done", False)}
