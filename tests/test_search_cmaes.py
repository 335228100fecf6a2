"""CMA-ES: improves a synthetic validation objective; seeded; resumable to the same proposals."""

from __future__ import annotations

import numpy as np
import pytest

from mergesweep.search import make_search
from mergesweep.search.driver import plan_next, run_loop
from mergesweep.search.observations import Observation
from mergesweep.search.state import generation_path, load_all, resume

EXPERTS = ["e1", "e2", "e3", "e4"]
SUITES = ["a", "b"]
TARGET_A = np.array([0.8, 0.3, 0.1, 0.6])
TARGET_B = np.array([0.2, 0.7, 0.4, 0.5])


def make(seed=0, budget=80, **kw):
    return make_search({"strategy": "cmaes", "method": "task_arithmetic", "budget": budget, "seed": seed,
                        "population": 8, "params": {"weight": {"per_expert": True, "low": 0.0, "high": 1.0}},
                        "objective": {"weights": {"a": 2, "b": 1}}, **kw}, experts=EXPERTS, suites=SUITES)


def evaluate(proposals):
    out = []
    for p in proposals:
        w = np.array(p.params["weight"], dtype=float)
        out.append(Observation(p.params, {"a": float(1 - np.sum((w - TARGET_A) ** 2)),
                                          "b": float(1 - np.sum((w - TARGET_B) ** 2))}))
    return out


def proposals_of(directory):
    return [[p.params for p in g.proposals] for g in load_all(directory)]


def test_improves_over_its_first_generation(tmp_path):
    s = make()
    last = run_loop(s, evaluate, tmp_path)
    assert last.done and last.state["spent"] == 80
    hist = last.state["history"]
    assert len(hist) == 10 and [h["generation"] for h in hist] == list(range(10))
    first, final = hist[0], hist[-1]
    assert final["best_value"] > first["best_value"]
    assert np.mean(final["values"]) > np.mean(first["values"]) + 0.05
    # the best so far never decreases, and the optimum (weighted mean of the targets) is approached
    best = [h["best_so_far"] for h in hist]
    assert best == sorted(best)
    optimum = (2 * TARGET_A + TARGET_B) / 3
    w_best = np.array(last.state["best"]["params"]["weight"])
    assert np.linalg.norm(w_best - optimum) < np.linalg.norm(np.full(4, 0.5) - optimum)
    res = s.result(last.state)
    assert res["best"]["value"] == pytest.approx(max(v for h in hist for v in h["values"]))


def test_same_seed_same_proposals_and_resume_matches_an_uninterrupted_run(tmp_path):
    run_loop(make(seed=4, budget=48), evaluate, tmp_path / "a")
    run_loop(make(seed=4, budget=48), evaluate, tmp_path / "b")
    run_loop(make(seed=5, budget=48), evaluate, tmp_path / "c")
    a = proposals_of(tmp_path / "a")
    assert len(a) == 7 and all(len(g) == 8 for g in a[:6]) and a[6] == []
    assert proposals_of(tmp_path / "b") == a
    assert proposals_of(tmp_path / "c")[0] != a[0]

    # killed after 3 generations; a new process (a fresh strategy object) resumes from the files
    run_loop(make(seed=4, budget=48), evaluate, tmp_path / "r", max_generations=3)
    assert resume(tmp_path / "r").generation == 2
    # a killed planner left nothing under the next name: the next file is planned from scratch
    assert not generation_path(tmp_path / "r", 3).exists()
    np.random.seed(12345)  # a new process: NumPy's global RNG is anywhere (cma must not use it)
    np.random.random(17)
    run_loop(make(seed=4, budget=48), evaluate, tmp_path / "r")
    assert proposals_of(tmp_path / "r") == a
    ga, gr = load_all(tmp_path / "a"), load_all(tmp_path / "r")
    for x, y in zip(ga, gr):
        assert [p.x for p in x.proposals] == [p.x for p in y.proposals]
        assert {k: v for k, v in x.state.items() if k != "es"} == {k: v for k, v in y.state.items() if k != "es"}


def test_a_failed_evaluation_gets_the_worst_fitness(tmp_path):
    s = make(budget=24)
    g0 = plan_next(s, tmp_path)
    obs = evaluate(g0.proposals)
    obs[3] = Observation(obs[3].params, {"a": obs[3].scores["a"]})  # its "b" evaluation failed
    g1 = plan_next(s, tmp_path, obs)
    assert len(g1.proposals) == 8
    values = g1.state["history"][0]["values"]
    assert values[3] is None and sum(v is None for v in values) == 1
    # the last generation is cut to the budget, then the search ends
    s2 = make(budget=20)
    last = run_loop(s2, evaluate, tmp_path / "cut")
    assert [len(g) for g in proposals_of(tmp_path / "cut")] == [8, 8, 4, 0]
    assert last.state["spent"] == 20


_ONE_GENERATION = r'''
import json, sys
from pathlib import Path
from mergesweep.search import make_search
from mergesweep.search.driver import plan_next
from mergesweep.search.observations import Observation
from mergesweep.search.state import resume
entry = json.loads(sys.argv[2])
s = make_search(entry, experts=["a", "b"], suites=["a", "b"], reference={"a": 1.0, "b": 1.0})
last = resume(sys.argv[1])
f = lambda w: {"a": 1 - (w[0] - 0.9) ** 2 - 0.3 * w[1], "b": 1 - (w[1] - 0.8) ** 2 - 0.3 * w[0]}
obs = [] if last is None else [Observation(p.params, f(p.params["weight"])) for p in last.proposals]
plan_next(s, Path(sys.argv[1]), obs)
'''


_WEIGHTS = {"weight": {"per_expert": True, "low": 0.0, "high": 1.0}}


@pytest.mark.parametrize("entry", [
    {"strategy": "cmaes", "budget": 12, "population": 3, "x0": {"weight": [0.2, 0.2]}, "sigma0": 0.3, "seed": 5},
    {"strategy": "map", "budget": 10, "n_samples": 8, "n_front": 2, "seed": 5, "n_gen": 30, "pop_size": 20},
    {"strategy": "cycleqd", "budget": 12, "population": 3, "seed": 5},
], ids=lambda e: e["strategy"])
def test_a_search_resumed_in_other_processes_proposes_what_one_process_does(tmp_path, entry):
    """Each generation planned by a process of its own (as the workflow's jobs are), each with
    another hash salt: cma keys its archived solutions by ``hash(bytes)``, which Python salts
    per process (the unpickled archives are re-keyed), and nothing else may depend on the salt:
    the proposals equal one process's."""
    import json
    import os
    import subprocess
    import sys

    entry = {"method": "task_arithmetic", "params": _WEIGHTS, **entry}
    n = 0
    while not (tmp_path / "split" / f"generation-{n - 1:04d}.json").exists() or resume(tmp_path / "split").proposals:
        i = n
        n += 1
        proc = subprocess.run([sys.executable, "-c", _ONE_GENERATION, str(tmp_path / "split"), json.dumps(entry)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": str(11 + i)})
        assert proc.returncode == 0, proc.stderr
        assert n < 20
    s = make_search(entry, experts=["a", "b"], suites=["a", "b"], reference={"a": 1.0, "b": 1.0})
    f = lambda w: {"a": 1 - (w[0] - 0.9) ** 2 - 0.3 * w[1], "b": 1 - (w[1] - 0.8) ** 2 - 0.3 * w[0]}
    run_loop(s, lambda props: [Observation(p.params, f(p.params["weight"])) for p in props], tmp_path / "one")
    split, one = load_all(tmp_path / "split"), load_all(tmp_path / "one")
    assert len(split) == len(one) >= 3 and sum(len(g.proposals) for g in one) == entry["budget"]
    def comparable(g):  # the pickled CMA-ES object's bytes hold its per-process hash keys
        d = g.to_dict()
        d["state"] = {k: v for k, v in d["state"].items() if k != "es"}
        return d

    for a, b in zip(split, one):
        assert comparable(a) == comparable(b), a.generation
