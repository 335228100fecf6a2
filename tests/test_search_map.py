"""MAP: the quadratic surrogates recover an exactly quadratic objective and its Pareto front."""

from __future__ import annotations

import numpy as np
import pytest

from mergesweep.search import make_search
from mergesweep.search.base import SearchError
from mergesweep.search.driver import plan_next, run_loop
from mergesweep.search.map import (
    fit_quadratic, map_design, n_coefficients, predicted_vs_measured, quadratic_features, quadratic_terms,
    spread_points,
)
from mergesweep.search.observations import Observation
from mergesweep.search.state import load_all


def make_map(experts, suites, budget, n_front, seed=0, **options):
    return make_search({"strategy": "map", "method": "task_arithmetic", "budget": budget, "seed": seed,
                        "n_front": n_front, "params": {"weight": {"per_expert": True, "low": 0.0, "high": 1.0}},
                        **options}, experts=experts, suites=suites)


def true_quadratic(coefs: dict, x) -> float:
    """b0 + sum_i b_i x_i + sum_{i<=j} b_ij x_i x_j, written out (independent of the module)."""
    x = np.asarray(x, dtype=float)
    d = len(x)
    v = coefs[()]
    for i in range(d):
        v += coefs[(i,)] * x[i]
        for j in range(i, d):
            v += coefs[(i, j)] * x[i] * x[j]
    return float(v)


def evaluator(space, funcs):
    def evaluate(proposals):
        out = []
        for p in proposals:
            x = space.to_vector(p.params)  # what the merge's parameters are, not the strategy's x
            out.append(Observation(p.params, {t: f(x) for t, f in funcs.items()}))
        return out
    return evaluate


def test_surrogates_recover_exact_quadratics(tmp_path):
    d, tasks = 3, ["t1", "t2", "t3"]
    rng = np.random.default_rng(11)
    coefs = {t: {term: float(rng.normal()) for term in quadratic_terms(d)} for t in tasks}
    funcs = {t: (lambda x, c=coefs[t]: true_quadratic(c, x)) for t in tasks}
    s = make_map(["e1", "e2", "e3"], tasks, budget=20, n_front=4, seed=5, n_gen=60)
    assert s.n_samples == 16
    last = run_loop(s, evaluator(s.space, funcs), tmp_path)
    assert last.done and last.state["spent"] == 20
    gens = load_all(tmp_path)
    assert [len(g.proposals) for g in gens] == [16, 4, 0]
    # the design: the one-hot vectors first (each expert alone)
    np.testing.assert_array_equal(np.array([p.x for p in gens[0].proposals[:3]]), np.eye(3))
    fits = s.fits(last.state)
    for t in tasks:
        want = np.array([coefs[t][term] for term in quadratic_terms(d)])
        np.testing.assert_allclose(fits[t].coef, want, atol=1e-8, rtol=0)
        assert fits[t].loo_rmse is not None and fits[t].loo_rmse < 1e-8
        assert fits[t].rank == n_coefficients(d) == 10
    # measured front points match their prediction (the surrogate is exact here)
    report = last.state["report"]
    assert len(report["points"]) == 4
    for t in tasks:
        assert report["summary"][t]["n"] == 4 and report["summary"][t]["max_abs_error"] < 1e-8
        assert report["summary"][t]["within_2_loo"] == 4
    res = s.result(last.state)
    assert res["predicted_front"] and set(res["predicted_front"][0]["predicted"]) == set(tasks)


def pareto_2d(F):
    """Non-dominated rows of F (maximised, 2 columns): sort by f1 descending (f2 descending on
    ties), keep a row when its f2 beats every row before it."""
    F = np.asarray(F, dtype=float)
    order = np.lexsort((-F[:, 1], -F[:, 0]))
    keep, best2 = [], -np.inf
    for i in order:
        if F[i, 1] > best2:
            keep.append(i)
            best2 = F[i, 1]
    return F[keep]


def hypervolume_2d(F, ref) -> float:
    """Area dominated by the (maximised) front F above the reference point."""
    P = pareto_2d(F)
    P = P[(P[:, 0] > ref[0]) & (P[:, 1] > ref[1])]
    P = P[np.argsort(-P[:, 0])]  # f1 descending -> f2 ascending
    area, prev2 = 0.0, ref[1]
    for f1, f2 in P:
        area += (f1 - ref[0]) * (f2 - prev2)
        prev2 = f2
    return area


def test_pareto_set_of_the_surrogates_matches_the_true_front(tmp_path):
    def f1(x):
        return 0.9 - (x[0] - 0.8) ** 2 - 0.5 * (x[1] - 0.2) ** 2 + 0.1 * x[0] * x[1]

    def f2(x):
        return 0.8 - 0.6 * (x[0] - 0.1) ** 2 - (x[1] - 0.9) ** 2 + 0.05 * x[0] * x[1]

    s = make_map(["e1", "e2"], ["a", "b"], budget=14, n_front=4, seed=1)
    last = run_loop(s, evaluator(s.space, {"a": f1, "b": f2}), tmp_path)
    # the true front: a dense grid and a non-dominated filter
    g = np.linspace(0, 1, 401)
    X0, X1 = np.meshgrid(g, g, indexing="ij")
    G = np.column_stack([f1((X0.ravel(), X1.ravel())), f2((X0.ravel(), X1.ravel()))])
    true_front = pareto_2d(G)
    ref = G.min(axis=0)
    hv_true = hypervolume_2d(true_front, ref)
    # the surrogates' predicted front, and the true values at its Pareto set
    front = last.state["front"]
    F_pred = np.array(front["predicted"])
    X_set = np.array(front["x"])
    F_real = np.column_stack([f1(X_set.T), f2(X_set.T)])
    hv_pred, hv_real = hypervolume_2d(F_pred, ref), hypervolume_2d(F_real, ref)
    assert len(F_pred) >= 20
    assert abs(hv_pred - hv_true) / hv_true < 0.01, (hv_pred, hv_true)
    assert abs(hv_real - hv_true) / hv_true < 0.01, (hv_real, hv_true)
    # every point of the Pareto set lies on (or within NSGA-II's convergence of) the true front:
    # the largest amount by which a grid point beats it in both tasks at once is small
    margins = np.array([np.max(np.min(G - f, axis=1)) for f in F_real])
    assert margins.max() < 1e-2 and margins.mean() < 2e-3, margins
    # pymoo's indicator agrees with the test's own 2-D computation
    from pymoo.indicators.hv import HV

    assert HV(ref_point=-ref)(-true_front) == pytest.approx(hv_true, rel=1e-9)
    # the proposed points cover the front: its two ends are among them
    measured = np.array([[o.scores["a"], o.scores["b"]] for o in evaluator(s.space, {"a": f1, "b": f2})(
        load_all(tmp_path)[1].proposals)])
    assert measured[:, 0].max() == pytest.approx(true_front[:, 0].max(), abs=2e-3)
    assert measured[:, 1].max() == pytest.approx(true_front[:, 1].max(), abs=2e-3)


def test_non_quadratic_objective_reports_errors_and_is_deterministic(tmp_path):
    def fa(x):
        return float(1 / (1 + np.exp(-4 * (x[0] - x[1]))))

    def fb(x):
        return float(np.cos(2 * x[0]) * 0.5 + x[1] * 0.3)

    runs = []
    for name, seed in (("a", 2), ("b", 2), ("c", 3)):
        s = make_map(["e1", "e2"], ["a", "b"], budget=15, n_front=5, seed=seed, design="sobol", n_gen=40, pop_size=40)
        last = run_loop(s, evaluator(s.space, {"a": fa, "b": fb}), tmp_path / name)
        runs.append([[p.params for p in g.proposals] for g in load_all(tmp_path / name)])
    rep = last.state["report"]
    for t in ("a", "b"):
        summ = rep["summary"][t]
        assert summ["n"] == 5 and summ["loo_rmse"] > 1e-6 and summ["rmse"] > 1e-6  # not exact any more
    # the error reported per point is measured - predicted
    pt = rep["points"][0]["a"]
    assert pt["error"] == pytest.approx(pt["measured"] - pt["predicted"])
    assert runs[0] == runs[1]  # same seed, same proposals
    assert runs[0][0] != runs[2][0]  # another seed, another Sobol design


def test_map_design_is_the_authors_and_identifiable():
    rng = np.random.default_rng(0)
    for d, n in ((2, 6), (2, 10), (3, 12), (4, 20)):
        X = map_design(d, n, rng)
        assert X.shape == (n, d)
        np.testing.assert_array_equal(X[:d], np.eye(d))
        rest = X[d:]
        assert not np.any(np.isclose(rest.sum(axis=1), 1.0))  # no sum-to-one points
        assert not np.any(np.all(rest == rest[:, :1], axis=1))  # no isotropic points


def test_fit_quadratic_and_helpers():
    rng = np.random.default_rng(1)
    X = rng.random((30, 2))
    y = 1 + 2 * X[:, 0] - X[:, 1] + 0.5 * X[:, 0] * X[:, 1] + 0.01 * rng.normal(size=30)
    fit = fit_quadratic(X, y)
    # the closed-form leave-one-out error equals refitting without each point
    errs = []
    for i in range(30):
        m = np.arange(30) != i
        c, *_ = np.linalg.lstsq(quadratic_features(X[m]), y[m], rcond=None)
        errs.append(y[i] - quadratic_features(X[i:i + 1]) @ c)
    assert fit.loo_rmse == pytest.approx(float(np.sqrt(np.mean(np.square(errs)))), rel=1e-9)
    assert fit_quadratic(X[:6], y[:6]).loo_rmse is None  # n = p: no held-out error
    # spread: the ends first
    F = np.array([[0.0, 1.0], [0.5, 0.6], [1.0, 0.0], [0.9, 0.2]])
    assert spread_points(F, 3)[:2] == [2, 0]
    rep = predicted_vs_measured([{"a": 0.5}, {"a": 0.2}], [{"a": 0.6}, {}], {"a": 0.04})
    assert rep["points"][0]["a"]["error"] == pytest.approx(0.1) and rep["points"][1]["a"]["error"] is None
    assert rep["summary"]["a"] == {"n": 1, "rmse": pytest.approx(0.1), "max_abs_error": pytest.approx(0.1),
                                   "loo_rmse": 0.04, "within_2_loo": 0}


def test_too_many_failed_design_points_is_a_clear_error(tmp_path):
    s = make_map(["e1", "e2"], ["a", "b"], budget=10, n_front=2, n_gen=5, pop_size=8)
    gen0 = plan_next(s, tmp_path)
    obs = [Observation(p.params, {"a": 0.5, **({"b": 0.5} if i < 5 else {})}) for i, p in enumerate(gen0.proposals)]
    with pytest.raises(SearchError, match="suite 'b' has 5 validation score\\(s\\) among the 8 design points; "
                                          "the quadratic surrogate needs 6"):
        plan_next(s, tmp_path, obs)
