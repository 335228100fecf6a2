"""Observations: validation scores only; a strategy never receives a test score."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mergesweep.search import make_search
from mergesweep.search.base import SearchError, params_key, short_id
from mergesweep.search.driver import plan_next
from mergesweep.search.observations import (
    Observation, observations_from_scores, reference_scores, validation_suite_scores,
)
from mergesweep.search.state import load_all

SUITES = ["arith", "code"]
#: every test-split value is >= 50: any number >= 50 reaching a strategy is a leak
TEST_OFFSET = 50.0


def rows_for(model_id, scores_val, scores_test, **extra):
    out = []
    for split, scores in (("validation", scores_val), ("test", scores_test)):
        for suite, v in scores.items():
            for task in (f"{suite}_t1", f"{suite}_t2"):  # two tasks per suite, averaged
                out.append({"model_id": model_id, "suite": suite, "task": task, "split": split, "metric": "acc",
                            "filter": "none", "value": v, "stderr": 0.01, "n": 10, "status": "ok", **extra})
    return out


def test_only_validation_rows_are_read():
    table = pd.DataFrame(
        rows_for("m1", {"arith": 0.4, "code": 0.6}, {"arith": 99.0, "code": 98.0})
        + rows_for("m2", {"arith": 0.5}, {"arith": 97.0, "code": 96.0})
        # a second metric and an errored row must not count
        + [{"model_id": "m1", "suite": "arith", "task": "arith_t1", "split": "validation", "metric": "acc_norm",
            "filter": "none", "value": 0.0, "status": "ok"},
           {"model_id": "m2", "suite": "code", "task": "code_t1", "split": "validation", "metric": "acc",
            "filter": "none", "value": 0.9, "status": "error"}]
    )
    obs = observations_from_scores(table, {"m1": {"weight": [1, 0]}, "m2": {"weight": [0, 1]}, "m3": {"weight": [1, 1]}},
                                   SUITES)
    assert [o.model_id for o in obs] == ["m1", "m2", "m3"]
    assert obs[0].scores == {"arith": 0.4, "code": 0.6}
    assert obs[1].scores == {"arith": 0.5}  # its code evaluation failed: the suite is missing
    assert obs[2].scores == {}  # not evaluated at all
    assert obs[0].params == {"weight": [1, 0]}


def test_another_split_is_refused():
    table = pd.DataFrame(rows_for("m1", {"arith": 0.4}, {"arith": 99.0}))
    for call in (lambda: observations_from_scores(table, {"m1": {}}, SUITES, split="test"),
                 lambda: validation_suite_scores(table, split="test"),
                 lambda: reference_scores(table, {"arith": "m1"}, split="test")):
        with pytest.raises(SearchError, match="reads the 'validation' split only; 'test' was asked for"):
            call()
    with pytest.raises(SearchError, match="no column 'split'"):
        observations_from_scores(table.drop(columns=["split"]), {"m1": {}}, SUITES)


def test_a_nan_task_makes_the_suite_missing_and_metrics_follow_the_preference():
    rows = rows_for("m1", {"arith": 0.4, "code": 0.6}, {})
    rows[0]["value"] = float("nan")  # arith_t1
    rows.append({"model_id": "m1", "suite": "code", "task": "code_t1", "split": "validation",
                 "metric": "exact_match", "filter": "none", "value": 0.0, "status": "ok"})
    table = pd.DataFrame(rows)
    (o,) = observations_from_scores(table, {"m1": {}}, SUITES)
    assert o.scores == {"code": 0.6}  # acc preferred over exact_match
    (o,) = observations_from_scores(table, {"m1": {}}, SUITES, metrics={"code": "exact_match"})
    assert o.scores == {"code": 0.0}


def test_reference_scores_are_the_experts_validation_scores():
    table = pd.DataFrame(rows_for("e-arith", {"arith": 0.8, "code": 0.1}, {"arith": 99.0, "code": 99.0})
                         + rows_for("e-code", {"arith": 0.2, "code": 0.7}, {"arith": 99.0, "code": 99.0}))
    assert reference_scores(table, {"arith": "e-arith", "code": "e-code"}) == {"arith": 0.8, "code": 0.7}


def _walk_numbers(obj):
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        yield float(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _walk_numbers(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk_numbers(v)


@pytest.mark.parametrize("strategy, options", [
    ("cmaes", {"population": 4}),
    ("cycleqd", {"population": 4}),
    ("map", {"n_front": 3, "n_gen": 20, "pop_size": 20}),
])
def test_a_strategy_never_receives_a_test_score(tmp_path, strategy, options):
    """The loop a workflow runs: proposals -> merges (ids) -> a scores table holding validation
    AND test rows -> observations -> the strategy. Spy on what the strategy receives."""
    entry = {"strategy": strategy, "method": "task_arithmetic", "budget": 12, "seed": 3,
             "params": {"weight": {"per_expert": True, "low": 0.0, "high": 1.0}}, **options}

    def run(directory, test_offset):
        s = make_search(entry, experts=["e-arith", "e-code"], suites=SUITES)
        received = []
        inner = s.propose

        def spy(state, observations):
            received.append([o.to_dict() for o in observations])
            for o in observations:
                assert isinstance(o, Observation)
            return inner(state, observations)

        s.propose = spy
        rows = []
        gen = plan_next(s, directory)
        while gen.proposals:
            candidates = {}
            for p in gen.proposals:
                mid = "task_arithmetic-" + short_id(p.params)
                w = np.array(p.params["weight"], dtype=float)
                val = {"arith": float(0.3 + 0.5 * w[0] - 0.2 * w[1] ** 2), "code": float(0.2 + 0.6 * w[1] - 0.1 * w[0])}
                test = {k: v + test_offset for k, v in val.items()}
                rows += rows_for(mid, val, test)
                candidates[mid] = p.params
            table = pd.DataFrame(rows)
            assert (table["split"] == "test").sum() == (table["split"] == "validation").sum() > 0
            gen = plan_next(s, directory, observations_from_scores(table, candidates, SUITES))
        return received

    received = run(tmp_path / "a", TEST_OFFSET)
    assert len(received) >= 3 and any(received)
    numbers = [v for obs in received for o in obs for v in _walk_numbers(o["scores"])]
    assert numbers and max(numbers) < 1.0, "a test-split score reached the strategy"
    # nothing of the test split in the generation files either (they record what it saw)
    for g in load_all(tmp_path / "a"):
        text = json.dumps(g.to_dict())
        assert all(v < TEST_OFFSET for v in _walk_numbers(json.loads(text)["observations"]))
    # and the test scores have no influence at all: other test values, the same search
    run(tmp_path / "b", TEST_OFFSET + 25.0)
    a = [comparable(g) for g in load_all(tmp_path / "a")]
    b = [comparable(g) for g in load_all(tmp_path / "b")]
    assert a == b


def comparable(gen):
    """A generation file without the pickled CMA-ES object (it carries cma's wall-clock timers)."""
    d = gen.to_dict()
    d["state"] = {k: v for k, v in d["state"].items() if k != "es"}
    return d


def test_params_key_is_the_identity():
    assert params_key({"weight": [1, 0.5]}) == params_key({"weight": [1.0, 0.5]})
    assert short_id({"weight": [1, 0.5]}) != short_id({"weight": [0.5, 1]})
