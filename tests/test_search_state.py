"""Generation files (atomic JSON, resume, clear errors) and the config checks of a search."""

from __future__ import annotations

import json

import pytest

from mergesweep.errors import ConfigError
from mergesweep.search import make_search
from mergesweep.search.base import Objective, Proposal, SearchError
from mergesweep.search.driver import plan_next, run_loop
from mergesweep.search.observations import Observation
from mergesweep.search.state import (
    Generation, generation_path, load_generation, pack, resume, save_generation, unpack,
)

EXPERTS = ["e1", "e2"]
SUITES = ["a", "b"]


def entry(**kw):
    base = {"strategy": "cycleqd", "method": "task_arithmetic", "budget": 8, "seed": 0, "population": 2,
            "params": {"weight": {"per_expert": True, "low": 0.0, "high": 1.0}}}
    base.update(kw)
    if base["strategy"] == "map":
        base.pop("population")
    return base


def evaluate(proposals):
    return [Observation(p.params, {"a": p.x[0], "b": p.x[1] * (1 - p.x[0])}) for p in proposals]


def test_generation_round_trip(tmp_path):
    gen = Generation("cmaes", 0, 7, {"k": [1, 2]},
                     observations=[Observation({"weight": [0.5, 0.5]}, {"a": 0.25}, "m-1")],
                     proposals=[Proposal({"weight": [0.1, 0.2]}, [0.1, 0.2], {"role": "x"})],
                     state={"blob": pack({"rng": [1, 2, 3]}), "big": 2**100})
    path = save_generation(tmp_path, gen)
    assert path == generation_path(tmp_path, 0) and path.name == "generation-0000.json"
    back = load_generation(path)
    assert back.to_dict() == gen.to_dict()
    assert unpack(back.state["blob"]) == {"rng": [1, 2, 3]}
    assert resume(tmp_path).generation == 0
    assert resume(tmp_path / "nothing") is None


def test_non_json_state_is_refused(tmp_path):
    import numpy as np

    gen = Generation("cmaes", 0, 0, {}, state={"x": np.float32(1.0)})
    with pytest.raises(SearchError, match="generation-0000.json: the generation is not JSON-serialisable"):
        save_generation(tmp_path, gen)
    assert not generation_path(tmp_path, 0).exists()


def test_resume_continues_from_the_last_file_and_errors_name_the_file(tmp_path):
    s = make_search(entry(), experts=EXPERTS, suites=SUITES)
    last = run_loop(s, evaluate, tmp_path, max_generations=3)
    assert last.generation == 2 and resume(tmp_path).generation == 2

    # a corrupt last file
    p2 = generation_path(tmp_path, 2)
    good = p2.read_text()
    p2.write_text(good[: len(good) // 2])
    with pytest.raises(SearchError, match=r"generation-0002\.json: corrupt generation file \(not JSON"):
        resume(tmp_path)
    p2.write_text(json.dumps({k: v for k, v in json.loads(good).items() if k != "state"}))
    with pytest.raises(SearchError, match=r"generation-0002\.json: incomplete generation file \(no state\)"):
        resume(tmp_path)
    p2.write_text(good)

    # a gap
    p1 = generation_path(tmp_path, 1)
    saved = p1.read_text()
    p1.unlink()
    with pytest.raises(SearchError, match=r"generation-0001\.json: generation file missing"):
        resume(tmp_path)
    with pytest.raises(SearchError, match=r"generation-0001\.json: generation file missing"):
        load_generation(p1)
    p1.write_text(saved)

    # the config changed since: refused, naming the file and what changed
    other = make_search(entry(budget=10), experts=EXPERTS, suites=SUITES)
    with pytest.raises(SearchError, match=r"generation-0002\.json: the search's config changed .*\(budget\)"):
        plan_next(other, tmp_path, evaluate(resume(tmp_path).proposals))
    cm = make_search(entry(strategy="cmaes"), experts=EXPERTS, suites=SUITES)
    with pytest.raises(SearchError, match="written by strategy 'cycleqd', not 'cmaes'"):
        plan_next(cm, tmp_path, [])

    # an observation missing for a proposal
    props = resume(tmp_path).proposals
    with pytest.raises(SearchError, match=r"generation 3: no observation for proposal \{\"weight\""):
        plan_next(s, tmp_path, evaluate(props[:-1]))
    assert resume(tmp_path).generation == 2  # nothing written

    # finishing, then planning past the end
    last = run_loop(s, evaluate, tmp_path)
    assert last.done and last.state["spent"] == 8
    with pytest.raises(SearchError, match="the search is finished"):
        plan_next(s, tmp_path, [])


def test_first_generation_takes_no_observations(tmp_path):
    s = make_search(entry(), experts=EXPERTS, suites=SUITES)
    with pytest.raises(SearchError, match="no generation yet"):
        plan_next(s, tmp_path, [Observation({"weight": [1, 1]}, {"a": 1})])


@pytest.mark.parametrize("changes, expected", [
    ({"strategy": "cmaes", "population": 8, "budget": 5},
     "search[0].budget: 5 evaluations is smaller than one generation (search[0].population: 8)"),
    ({"strategy": "cycleqd", "population": 1}, "search[0].population: 1 is too small"),
    ({"strategy": "cmaes", "population": 1}, "search[0].population: 1 is too small"),
    ({"strategy": "cmaes", "population": 2.5}, "search[0].population: expected an integer >= 1"),
    ({"strategy": "cycleqd", "population": 2, "budget": 2,
      "params": {"weight": {"per_expert": True, "low": 0.0, "high": 1.0}}, "experts": ["e1", "e2", "e3"]},
     "search[0].budget: 2 evaluations is smaller than the first generation (3"),
    ({"strategy": "map", "budget": 10, "n_front": 12}, "search[0].n_front: 12 front points is more than the budget"),
    ({"strategy": "map", "budget": 8, "n_front": 3},
     "search[0].budget: 8 evaluations leave 5 design points after search[0].n_front: 3; a quadratic surrogate over 2 coordinates needs at least 6"),
    ({"strategy": "map", "budget": 20, "n_front": 3, "n_samples": 18}, "search[0].budget: 20 is less than search[0].n_samples + search[0].n_front"),
    ({"strategy": "map", "budget": 20, "design": "lhs"}, "search[0].design: 'lhs' is not one of map, sobol, uniform"),
    ({"strategy": "map", "budget": 20, "objective": ["a"]}, "search[0].objective: MAP needs at least 2 suites"),
    ({"strategy": "cycleqd", "objective": ["b"]}, "search[0].objective: CycleQD needs at least 2 suites"),
    ({"strategy": "cmaes", "popsize": 4}, "search[0].popsize: unknown option of strategy 'cmaes'"),
    ({"strategy": "cmaes", "sigma0": 0}, "search[0].sigma0: 0 is out of range (0, 1]"),
    ({"strategy": "cmaes", "x0": {"weight": [2, 0]}}, "search[0].x0: params.weight[e1]: 2 is outside"),
    ({"strategy": "grid"}, "search[0].strategy: unknown search strategy 'grid'"),
    ({"strategy": "cmaes", "seed": -1}, "search[0].seed: expected an integer >= 0"),
    ({"objective": ["a", "c"]}, "search[0].objective.suites[1]: suite 'c' is not in the plan (suites: a, b)"),
    ({"objective": {"weights": {"c": 1}}}, "search[0].objective.weights.c: suite 'c' is not in the plan"),
    ({"objective": {"weights": {"a": -1}}}, "search[0].objective.weights.a: expected a number >= 0"),
    ({"objective": {"normalise": True}}, "search[0].objective.normalise: no validation score of the expert of suite 'a'"),
    ({"objective": {"sutes": ["a"]}}, "search[0].objective.sutes: unknown key"),
    ({"cycleqd_bins": 3}, "search[0].cycleqd_bins: unknown option of strategy 'cycleqd'"),
    ({"bd_range": {"c": [0, 1]}}, "search[0].bd_range.c: suite 'c' is not one of the objective's suites"),
    ({"bd_range": [1, 0]}, "search[0].bd_range: expected [low, high] with low < high"),
    ({"sampling": "best"}, "search[0].sampling: 'best' is not one of elite, random"),
    ({"params": {"wieght": {"low": 0, "high": 1}}}, "search[0].params.wieght: task_arithmetic has no parameter 'wieght'"),
])
def test_bad_search_configs_name_the_key(changes, expected):
    changes = dict(changes)
    experts = changes.pop("experts", EXPERTS)
    with pytest.raises(ConfigError) as e:
        make_search(entry(**changes), experts=experts, suites=SUITES, key="search[0]")
    assert str(e.value).startswith(expected), str(e.value)


def test_objective():
    o = Objective.from_config({"weights": {"a": 3, "b": 1}}, SUITES, reference={"a": 0.5, "b": 0.8})
    assert o.reference == (0.5, 0.8)  # normalised by default when references are given
    assert o.value({"a": 0.25, "b": 0.4}) == pytest.approx((3 * 0.5 + 1 * 0.5) / 4)
    assert o.value({"a": 0.25}) is None  # a failed suite: no value
    raw = Objective.from_config(None, SUITES)
    assert raw.value({"a": 0.2, "b": 0.4}) == pytest.approx(0.3)
    # a zero weight ignores the suite, even when it is missing
    assert Objective.from_config({"weights": {"b": 0}}, SUITES).value({"a": 0.2}) == pytest.approx(0.2)
    with pytest.raises(ConfigError, match=r"^o\.normalise: the expert of suite 'b' scores 0"):
        Objective.from_config({"normalise": True}, SUITES, "o", reference={"a": 0.5, "b": 0.0})
