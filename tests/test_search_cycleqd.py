"""CycleQD: archives keep the best per cell, children are convex combinations of their parents
(then mutated along the elites' principal directions), the quality task cycles, seeded."""

from __future__ import annotations

import numpy as np
import pytest

from mergesweep.search import make_search
from mergesweep.search.cycleqd import (
    cell_key, cell_of, crossover, mutate, offer, principal_directions, select_parents,
)
from mergesweep.search.driver import run_loop
from mergesweep.search.observations import Observation
from mergesweep.search.state import load_all

EXPERTS = ["e1", "e2", "e3"]
TASKS = ["t1", "t2", "t3"]


def make(seed=0, budget=60, **kw):
    return make_search({"strategy": "cycleqd", "method": "task_arithmetic", "budget": budget, "seed": seed,
                        "population": 6, "bins": 5, "mutation_scale": 0.5,
                        "params": {"weight": {"per_expert": True, "low": 0.0, "high": 1.0}}, **kw},
                       experts=EXPERTS, suites=TASKS)


def scores_of(w):
    """Task t is good with expert t's weight, gains a little from some of the others' (transfer)
    and loses from too much of them (interference): its expert alone scores 0.7, the best merge
    for it about 0.79."""
    w = np.asarray(w, dtype=float)
    out = {}
    for t in range(3):
        others = np.delete(w, t)
        out[TASKS[t]] = float(np.clip(0.2 + 0.5 * w[t] + 0.25 * np.sum(others) - 0.35 * np.sum(others**2), 0, 1))
    return out


def evaluate(proposals):
    return [Observation(p.params, scores_of(p.params["weight"])) for p in proposals]


def test_offer_keeps_the_best_per_cell():
    archive = {}
    assert offer(archive, (1, 2), {"quality": 0.5, "id": "a"})
    assert not offer(archive, (1, 2), {"quality": 0.4, "id": "b"})
    assert not offer(archive, (1, 2), {"quality": 0.5, "id": "c"})  # a tie keeps the incumbent
    assert offer(archive, (1, 2), {"quality": 0.6, "id": "d"})
    assert offer(archive, (0, 2), {"quality": 0.1, "id": "e"})
    assert {k: v["id"] for k, v in archive.items()} == {"1,2": "d", "0,2": "e"}
    ranges = {t: [0.0, 1.0] for t in TASKS}
    assert cell_of({"t1": 0.9, "t2": 0.0, "t3": 1.0}, "t1", TASKS, 5, ranges) == (0, 4)
    assert cell_of({"t1": 0.9, "t2": 0.39, "t3": 0.41}, "t2", TASKS, 5, ranges) == (4, 2)
    assert cell_of({"t1": 0.9, "t3": 0.41}, "t2", TASKS, 5, ranges) == (4, 2)  # its own score is not a descriptor
    assert cell_of({"t1": 0.9}, "t2", TASKS, 5, ranges) is None  # a descriptor is missing


def test_run_archives_hold_the_best_candidate_of_each_cell(tmp_path):
    s = make()
    last = run_loop(s, evaluate, tmp_path)
    assert last.done and last.state["spent"] == 60
    # every candidate ever evaluated, with its scores, in evaluation order
    seen = [(o.params, o.scores) for g in load_all(tmp_path) for o in g.observations]
    assert len(seen) == 60
    archives = last.state["archives"]
    for q in TASKS:
        best: dict[str, tuple] = {}
        for params, scores in seen:
            k = cell_key(cell_of(scores, q, TASKS, 5, s.ranges))
            if k not in best or scores[q] > best[k][1][q]:
                best[k] = (params, scores)
        assert set(archives[q]) == set(best)
        for k, (params, scores) in best.items():
            assert archives[q][k]["params"] == params and archives[q][k]["quality"] == scores[q]
        assert len(archives[q]) >= 4  # diversity: several cells filled
    res = s.result(last.state)
    for q in TASKS:
        assert res["best_per_task"][q]["quality"] == max(sc[q] for _, sc in seen)
    # the search found better specialists than the seed experts
    seeds = [o.scores for o in load_all(tmp_path)[1].observations]  # generation 0's, seen by generation 1
    assert len(seeds) == 6
    assert sum(res["best_per_task"][q]["quality"] > max(sc[q] for sc in seeds) for q in TASKS) >= 2


def test_children_are_convex_combinations_of_their_parents_then_mutated(tmp_path):
    s = make(seed=3)
    run_loop(s, evaluate, tmp_path)
    gens = load_all(tmp_path)
    # generation 0: the experts themselves (one-hot recipes), then random fill
    assert [p.params["weight"] for p in gens[0].proposals[:3]] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    n = 0
    for g in gens[1:]:
        for p in g.proposals:
            info = p.info
            assert info["role"] == "child"
            x1, x2 = (s.space.to_vector(pp) for pp in info["parents"])
            a = info["coefficient"]
            assert 0.0 < a < 1.0
            np.testing.assert_allclose(info["crossover_x"], a * x1 + (1 - a) * x2, atol=1e-12)
            n += 1
    assert n == 60 - 6
    # crossover itself: always on the segment between the parents, coefficients sampled
    rng = np.random.default_rng(0)
    r1, r2 = np.array([1.0, 0.0, 0.2]), np.array([0.0, 0.6, 0.8])
    coefs = []
    for _ in range(200):
        child, a = crossover(r1, r2, rng, std=0.5)
        np.testing.assert_allclose(child, a * r1 + (1 - a) * r2)
        assert 0.0 < a < 1.0
        coefs.append(a)
    assert np.std(coefs) > 0.05  # sampled, not a fixed midpoint


def test_mutation_follows_the_elites_principal_directions():
    rng = np.random.default_rng(1)
    direction = np.array([1.0, 1.0, 0.0]) / np.sqrt(2)
    elites = np.array([[0.3, 0.3, 0.5]]) + np.linspace(-0.2, 0.2, 7)[:, None] * direction
    V, sigma = principal_directions(elites)
    assert abs(abs(V[0] @ direction) - 1) < 1e-12 and sigma[0] > 0 and np.all(sigma[1:] < 1e-12)
    r = np.array([0.5, 0.5, 0.5])
    for _ in range(50):
        delta = mutate(r, elites, rng, scale=1.0, floor=0.0) - r
        # no floor: only along the direction the elites spread in
        assert np.linalg.norm(delta - (delta @ direction) * direction) < 1e-12
    # with a floor every direction moves
    deltas = np.array([mutate(r, elites, rng, scale=1.0, floor=0.05) - r for _ in range(50)])
    assert np.all(np.abs(deltas).max(axis=0) > 0.01)


def test_the_quality_task_cycles_and_parents_come_from_its_archive(tmp_path):
    s = make(budget=48)
    run_loop(s, evaluate, tmp_path)
    gens = load_all(tmp_path)
    assert [s.quality_task(g.generation) for g in gens] == [None, "t1", "t2", "t3", "t1", "t2", "t3", "t1", "t2"]
    for g in gens[1:-1]:
        qs = {p.info["quality_task"] for p in g.proposals}
        assert qs == {s.quality_task(g.generation)}
    hist = {h["generation"]: h for h in gens[-1].state["history"]}
    assert [hist[i]["quality_task"] for i in range(1, 8)] == ["t1", "t2", "t3", "t1", "t2", "t3", "t1"]
    # parents are elites of the quality task's archive as it was when they were drawn (the
    # archive in the generation's state: updated with the previous generation's observations)
    for g in gens[1:]:
        if not g.proposals:
            continue
        archive = g.state["archives"][g.proposals[0].info["quality_task"]]
        for p in g.proposals:
            for cell, params in zip(p.info["parent_cells"], p.info["parents"]):
                assert archive[cell]["params"] == params


def test_same_seed_same_proposals(tmp_path):
    def props(d):
        return [[p.params for p in g.proposals] for g in load_all(d)]

    run_loop(make(seed=7, budget=30), evaluate, tmp_path / "a")
    run_loop(make(seed=7, budget=30), evaluate, tmp_path / "b")
    run_loop(make(seed=8, budget=30), evaluate, tmp_path / "c")
    run_loop(make(seed=7, budget=30), evaluate, tmp_path / "r", max_generations=2)
    run_loop(make(seed=7, budget=30), evaluate, tmp_path / "r")
    assert props(tmp_path / "a") == props(tmp_path / "b") == props(tmp_path / "r")
    assert props(tmp_path / "a") != props(tmp_path / "c")
    assert [g.to_dict() for g in load_all(tmp_path / "a")] == [g.to_dict() for g in load_all(tmp_path / "r")]


def test_parent_selection_prefers_good_elites():
    archive = {"0,0": {"quality": 0.1}, "4,4": {"quality": 0.9}, "2,2": {"quality": 0.5}}
    rng = np.random.default_rng(0)
    counts = {k: 0 for k in archive}
    for _ in range(3000):
        for k in select_parents(archive, rng, "elite"):
            counts[k] += 1
    assert counts["4,4"] > counts["2,2"] > counts["0,0"]
    single = {"1,1": {"quality": 0.3}}
    assert select_parents(single, rng, "elite") == ("1,1", "1,1")
    with pytest.raises(ValueError):
        select_parents({}, rng, "random")
