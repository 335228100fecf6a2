"""The search space: config checks naming the key, the [0,1]^d <-> params map, rounding."""

from __future__ import annotations

import numpy as np
import pytest

from mergesweep.errors import ConfigError
from mergesweep.ids import merge_model_id
from mergesweep.search.base import params_key
from mergesweep.search.space import SearchSpace, round_significant

EXPERTS = ["math", "code", "chat"]


def space(method="ties", params=None, experts=EXPERTS, **kw):
    params = params if params is not None else {
        "weight": {"per_expert": True, "low": 0.1, "high": 1.0},
        "density": {"low": 0.1, "high": 0.9},
        "lambda": {"low": 0.5, "high": 1.5},
    }
    return SearchSpace.from_config(method, params, experts, "search[0]", **kw)


@pytest.mark.parametrize("method, params, fixed, expected", [
    ("ties", {"densty": {"low": 0.1, "high": 0.5}}, None,
     "search[0].params.densty: ties has no parameter 'densty' (its parameters: weight, density, lambda, normalize, scope)"),
    ("ties", {"density": {"low": 0.1, "high": 1.5}}, None,
     "search[0].params.density.high: 1.5 is outside ties's range for 'density' [0, 1]"),
    ("ties", {"density": {"low": -0.1, "high": 0.5}}, None, "search[0].params.density.low: -0.1 is outside"),
    ("task_arithmetic", {"lambda": {"per_expert": True, "low": 0, "high": 1}}, None,
     "search[0].params.lambda.per_expert: task_arithmetic's 'lambda' cannot vary per expert"),
    ("task_arithmetic", {"lambda": {"low": 1.0, "high": 1.0}}, None,
     "search[0].params.lambda: low (1) must be smaller than high (1)"),
    ("task_arithmetic", {"lambda": {"low": 0.0}}, None, "search[0].params.lambda.high: missing"),
    ("task_arithmetic", {"lambda": {"low": "a", "high": 1}}, None, "search[0].params.lambda.low: expected a finite number"),
    ("task_arithmetic", {"lambda": {"low": 0, "high": float("inf")}}, None, "search[0].params.lambda.high: expected a finite number"),
    ("task_arithmetic", {"normalize": {"low": 0, "high": 1}}, None,
     "search[0].params.normalize: task_arithmetic's 'normalize' is a bool parameter"),
    ("task_arithmetic", {"lambda": {"low": 0, "high": 1, "step": 0.1}}, None, "search[0].params.lambda.step: unknown key"),
    ("task_arithmetic", {"lambda": [0, 1]}, None, "search[0].params.lambda: expected {low, high}"),
    ("task_arithmetic", {}, None, "search[0].params: expected a mapping of at least one parameter"),
    ("taks_arithmetic", {"lambda": {"low": 0, "high": 1}}, None, "search[0].method: unknown merge method 'taks_arithmetic'"),
    ("task_arithmetic", {"lambda": {"low": 0, "high": 1}}, {"lambda": 1.0},
     "search[0].fixed.lambda: 'lambda' is searched"),
    ("task_arithmetic", {"lambda": {"low": 0, "high": 1}}, {"lamda": 1.0},
     "search[0].fixed.lamda: task_arithmetic has no parameter 'lamda'"),
    # linear's normalize (default true) divides by the sum of the weights: all 0 cannot be merged
    ("linear", {"weight": {"per_expert": True, "low": 0.0, "high": 1.0}}, None,
     "search[0].params: the lowest point of the space is not a valid linear merge (params.weight: the weights sum to 0"),
    ("dare_ties", {"seed": {"low": 0.5, "high": 3}}, None, "search[0].params.seed: 'seed' is an integer parameter"),
])
def test_bad_spaces_name_the_key(method, params, fixed, expected):
    with pytest.raises(ConfigError) as e:
        SearchSpace.from_config(method, params, EXPERTS, "search[0]", fixed=fixed)
    assert str(e.value).startswith(expected), str(e.value)


def test_bad_experts_and_digits():
    with pytest.raises(ConfigError, match=r"^search\[0\]\.experts: expert names repeat"):
        SearchSpace.from_config("linear", {"weight": {"low": 0, "high": 1}}, ["a", "a"], "search[0]")
    with pytest.raises(ConfigError, match=r"^search\[0\]\.digits"):
        SearchSpace.from_config("linear", {"weight": {"low": 0.1, "high": 1}}, ["a"], "search[0]", digits=0)


def test_dimensions_follow_the_method_and_expert_order():
    s = space()
    assert s.names == ["weight[math]", "weight[code]", "weight[chat]", "density", "lambda"]
    # the mapping's order does not matter: the method's parameter order does
    s2 = space(params={"lambda": {"low": 0.5, "high": 1.5}, "density": {"low": 0.1, "high": 0.9},
                       "weight": {"per_expert": True, "low": 0.1, "high": 1.0}})
    assert s2.names == s.names and s2.to_dict() == s.to_dict()


def test_to_params_per_expert_lists_in_expert_order_and_back():
    s = space(experts=["c", "a", "b"])
    x = np.array([0.0, 0.5, 1.0, 0.25, 0.75])
    p = s.to_params(x)
    # weight[c] = 0.1, weight[a] = 0.1 + 0.5 * 0.9 = 0.55, weight[b] = 1.0, in the experts' order
    assert p == {"weight": [0.1, 0.55, 1.0], "density": 0.3, "lambda": 1.25}
    np.testing.assert_allclose(s.to_vector(p), x, atol=1e-12)
    # a scalar for a per-expert parameter applies to every expert
    np.testing.assert_allclose(s.to_vector({"weight": 0.55, "density": 0.3, "lambda": 1.25})[:3], 0.5)
    with pytest.raises(ValueError, match="outside the searched range"):
        s.to_vector({"weight": [0.0, 0.5, 0.5], "density": 0.3, "lambda": 1.0})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        s.to_params(np.array([0.0, 0.5, 1.2, 0.25, 0.75]))
    with pytest.raises(ValueError, match="5 coordinates"):
        s.to_params(np.zeros(4))


def test_fixed_params_are_added_and_validated():
    s = SearchSpace.from_config("task_arithmetic", {"weight": {"per_expert": True, "low": 0, "high": 1}},
                                EXPERTS, "search[0]", fixed={"lambda": 0.8})
    assert s.to_params(np.full(3, 0.5)) == {"lambda": 0.8, "weight": [0.5, 0.5, 0.5]}
    with pytest.raises(ConfigError, match=r"^search\[0\]\.params: the lowest point .*params\.normalize"):
        SearchSpace.from_config("task_arithmetic", {"weight": {"per_expert": True, "low": 0, "high": 1}},
                                EXPERTS, "search[0]", fixed={"normalize": "yes"})


def test_rounding_makes_nearly_equal_proposals_one_merge():
    s = space()
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = rng.uniform(0.01, 0.99, s.d)
        a, b = s.to_params(x), s.to_params(x + 1e-9)
        assert a == b and params_key(a) == params_key(b)
        ida = merge_model_id("ties", a, "base-uid", ["e1", "e2", "e3"], per_expert=["weight"])
        idb = merge_model_id("ties", b, "base-uid", ["e1", "e2", "e3"], per_expert=["weight"])
        assert ida == idb
        # 4 significant digits
        for v in a["weight"] + [a["density"], a["lambda"]]:
            assert v == round_significant(v, 4)
    # clearly different points stay different
    x = np.full(s.d, 0.5)
    assert s.to_params(x) != s.to_params(x + 1e-3)
    # the evaluated point is the snapped one, and snapping is idempotent
    y = s.snap(rng.uniform(0, 1, s.d))
    np.testing.assert_array_equal(s.snap(y), y)


def test_round_significant():
    assert round_significant(0.123456, 4) == 0.1235
    assert round_significant(123.456, 4) == 123.5
    assert round_significant(-0.00012345, 3) == -0.000123
    assert round_significant(0.0, 4) == 0.0


def test_int_parameters_round_to_integers():
    s = SearchSpace.from_config("dare_ties", {"seed": {"low": 0, "high": 10},
                                              "weight": {"per_expert": True, "low": 0.5, "high": 1}}, ["a", "b"], "s")
    p = s.to_params(np.array([0.5, 0.5, 0.26]))
    assert p["seed"] == 3 and isinstance(p["seed"], int)


def test_space_round_trips_through_json():
    import json

    s = space()
    assert SearchSpace.from_dict(json.loads(json.dumps(s.to_dict()))) == s
