"""The sweep plan: grid expansion, content ids, cross-reference errors naming keys."""

import copy

import pytest
import yaml

from mergesweep.errors import ConfigError
from mergesweep.plan import build_plan
from helpers_pipeline import REPO


@pytest.fixture()
def cfg():
    return yaml.safe_load((REPO / "config/presets/tiny.yaml").read_text())


def test_grid_expands_to_one_merge_per_point(cfg):
    cfg["merges"] = [{"method": "task_arithmetic", "params": {"lambda": [0.3, 0.5, 1.0]}},
                     {"method": "ties", "params": {"density": [0.2, 0.5], "lambda": [0.5, 1.0]}}]
    plan = build_plan(cfg)
    methods = sorted(m.method for m in plan.merges.values())
    assert methods.count("task_arithmetic") == 3 and methods.count("ties") == 4
    lambdas = sorted(m.params["lambda"] for m in plan.merges.values() if m.method == "task_arithmetic")
    assert lambdas == [0.3, 0.5, 1.0]
    assert len(plan.models) == 1 + 3 + 7
    assert all(plan.model_dir(m).startswith("results/models/") for m in plan.merges)


def test_identical_merges_share_one_id(cfg):
    cfg["merges"] = [{"method": "task_arithmetic", "params": {"lambda": [0.5, 1.0]}},
                     {"method": "task_arithmetic", "params": {"lambda": 1}}]  # 1 == 1.0
    plan = build_plan(cfg)
    assert len(plan.merges) == 2


def test_ids_change_with_content(cfg):
    a = build_plan(cfg)
    cfg2 = copy.deepcopy(cfg)
    cfg2["finetune"]["steps"] += 1  # a different expert recipe -> different inputs -> new merge ids
    b = build_plan(cfg2)
    assert set(a.merges).isdisjoint(b.merges)
    assert a.experts["tiny-arithmetic"]["uid"] != b.experts["tiny-arithmetic"]["uid"]
    c = build_plan(copy.deepcopy(cfg))
    assert list(a.merges) == list(c.merges)  # deterministic


def test_unknown_method_names_the_key(cfg):
    cfg["merges"].append({"method": "frobnicate", "params": {}})
    with pytest.raises(ConfigError, match=r"merges\[2\]\.method: unknown merge method 'frobnicate'"):
        build_plan(cfg)


def test_expert_skill_must_be_a_suite(cfg):
    cfg["experts"][1]["skill"] = "capitals"
    with pytest.raises(ConfigError, match=r"experts\[1\]\.skill"):
        build_plan(cfg)


def test_out_of_range_param_names_the_key(cfg):
    cfg["merges"] = [{"method": "ties", "params": {"density": [0.5, 1.5]}}]
    with pytest.raises(ConfigError, match=r"merges\[0\]\.params"):
        build_plan(cfg)


def test_unknown_merge_expert(cfg):
    cfg["merges"] = [{"method": "linear", "experts": ["tiny-arithmetic", "nobody"]}]
    with pytest.raises(ConfigError, match=r"merges\[0\]\.experts: 'nobody'"):
        build_plan(cfg)
