"""The plan's side of a search: config checks naming ``search[i]...``, search ids, and candidates
registered from the generation files as ordinary plan merges (the ids a grid would give them)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mergesweep.errors import ConfigError
from mergesweep.layout import Layout
from mergesweep.merge.identity import merge_identity
from mergesweep.plan import build_plan
from mergesweep.search.driver import plan_generation
from mergesweep.search.state import load_generation

REPO = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((REPO / "config/presets/tiny.yaml").read_text())
EXPERTS = ["tiny-arithmetic", "tiny-dateformat"]
WEIGHTS = {"weight": {"per_expert": True, "low": 0.0, "high": 1.0}}
CMAES = {"strategy": "cmaes", "method": "task_arithmetic", "experts": EXPERTS, "params": WEIGHTS,
         "budget": 6, "population": 3, "seed": 3}


def config(*searches, merges=None) -> dict:
    cfg = copy.deepcopy(TINY)
    cfg["search"] = [copy.deepcopy(s) for s in searches]
    if merges is not None:
        cfg["merges"] = merges
    return cfg


def plan_in(tmp_path, cfg):
    return build_plan(cfg, Layout(resources=str(tmp_path / "resources"), results=str(tmp_path / "results")))


@pytest.mark.parametrize("change, message", [
    ({"budget": 2}, r"search\[0\]\.budget: 2 evaluations is smaller than one generation \(search\[0\]\.population: 3\)"),
    ({"method": "ties", "params": {"densty": {"low": 0.1, "high": 0.9}}},
     r"search\[0\]\.params\.densty: ties has no parameter 'densty'"),
    ({"objective": ["arithmetic", "nope"]}, r"search\[0\]\.objective\.suites\[1\]: suite 'nope' is not in the plan"),
    ({"objective": {"suites": ["capitals"]}},
     r"search\[0\]\.objective\.suites\[0\]: suite 'capitals' is no expert's domain .*objective\.normalise: false"),
    ({"experts": ["tiny-arithmetic", "nobody"]}, r"search\[0\]\.experts\[1\]: 'nobody' is not an expert"),
    ({"method": "rmm", "params": {"components": {"low": 1, "high": 2}}}, r"search\[0\]\.method: 'rmm' is reversible"),
    ({"method": "regmean", "params": {"alpha": {"low": 0.1, "high": 0.9}}},
     r"search\[0\]\.method: 'regmean' reads data of the experts"),
    ({"method": "no_such_method"}, r"search\[0\]\.method: unknown merge method 'no_such_method'"),
    ({"population": 1}, r"search\[0\]\.population: 1 is too small"),
    ({"sigma": 0.2}, r"search\[0\]\.sigma: unknown option of strategy 'cmaes'"),
    ({"method": "ties", "params": {"density": {"low": 0.1, "high": 2.0}}}, r"search\[0\]\.params\.density"),
])
def test_bad_search_entries_are_named_by_key(change, message):
    with pytest.raises(ConfigError, match=message):
        build_plan(config({**CMAES, **change}))


def test_schema_checks_the_search_section():
    with pytest.raises(ConfigError, match=r"search"):
        build_plan(config({**CMAES, "strategy": "grid_of_dreams"}))
    bad = {k: v for k, v in CMAES.items() if k != "budget"}
    with pytest.raises(ConfigError, match=r"budget"):
        build_plan(config(bad))


def test_two_searches_with_one_label_need_names():
    with pytest.raises(ConfigError, match=r"search\[1\]\.name: the label 'cmaes:task_arithmetic' is search\[0\]'s"):
        build_plan(config(CMAES, {**CMAES, "seed": 4}))
    plan = build_plan(config(CMAES, {**CMAES, "seed": 4, "name": "cmaes-seed4"}))
    assert [s.label for s in plan.searches.values()] == ["cmaes:task_arithmetic", "cmaes-seed4"]


def test_search_ids_follow_the_definition():
    a = build_plan(config(CMAES))
    b = build_plan(config(CMAES))
    c = build_plan(config({**CMAES, "seed": 4}))
    d = build_plan(config({**CMAES, "experts": list(reversed(EXPERTS))}))
    assert list(a.searches) == list(b.searches)
    assert not set(a.searches) & set(c.searches) and not set(a.searches) & set(d.searches)
    (sid, s), = a.searches.items()
    assert sid.startswith("cmaes-task-arithmetic-") and s.dir == f"results/search/{sid}"
    # the default objective: the experts' domains, normalised by each domain's expert
    assert s.config["objective"] == {"suites": ["arithmetic", "dateformat"], "normalise": True}
    assert s.reference == {"arithmetic": "tiny-arithmetic", "dateformat": "tiny-dateformat"}


def test_candidates_are_plan_merges_with_the_ids_a_grid_gives_them(tmp_path):
    grid = [{"method": "task_arithmetic", "experts": EXPERTS, "params": {"weight": [0.5, 0.5]}}]
    cfg = config(CMAES, merges=grid)
    plan = plan_in(tmp_path, cfg)
    (sid, s), = plan.searches.items()
    strategy = plan.search_strategy(sid, {"arithmetic": 0.9, "dateformat": 0.8})
    gen = plan_generation(strategy, s.dir, 0)
    assert len(gen.proposals) == 3
    ids = plan.search_generation_ids(sid, 0)
    ms = plan.merge_settings
    for p, mid in zip(gen.proposals, ids):
        expected, params = merge_identity("task_arithmetic", p.params, list(EXPERTS), plan.base.uid,
                                          [plan.experts[e].uid for e in EXPERTS], dtype=ms["dtype"],
                                          vocab_policy=ms["vocab_policy"])
        assert mid == expected
        m = plan.merges[mid]
        assert m.experts == tuple(EXPERTS) and m.params == params and m.entry == -1
        # the merge YAML a candidate's merge job reads is an ordinary one
        assert plan.merge_yaml_doc(mid)["params"]["weight"] == p.params["weight"]
    doc = plan.eval_models_doc()
    assert set(ids) <= set(doc["models"]) and doc["search_only"] == [i for i in dict.fromkeys(ids)]
    assert doc["searches"] == [{"label": "cmaes:task_arithmetic", "id": sid, "result": plan.layout.search_result(sid)}]
    assert not set(ids) & set(plan.eval_models_doc(candidates=False)["models"])

    # a job's process rebuilds the plan from the config and finds the candidates on disk
    again = plan_in(tmp_path, cfg)
    assert set(ids) <= set(again.merges) and again.search_generation_ids(sid, 0) == ids

    # a proposal equal to a grid point is that merge (not search-only, not planned twice)
    grid_id = next(iter(plan.grid_merges))
    gen0 = load_generation(gen.path)
    gen0.proposals[0] = type(gen0.proposals[0])({"weight": [0.5, 0.5]}, [0.5, 0.5], {})
    from mergesweep.search.state import save_generation

    save_generation(s.dir, gen0)
    shared = plan_in(tmp_path, cfg)
    assert shared.search_generation_ids(sid, 0)[0] == grid_id
    assert grid_id not in shared.eval_models_doc()["search_only"]
    assert len(shared.merges) == 1 + len(set(ids) - {ids[0]})


def test_layout_and_state_name_generation_files_alike():
    from mergesweep.search.state import generation_path

    L = Layout()
    assert L.search_generation("s", 7) == str(generation_path(L.search_dir("s"), 7))
    assert L.search_generation("s", "{generation}") == "results/search/s/generation-{generation}.json"


def test_search_command_reports_and_plans(tmp_path):
    cfg = config(CMAES)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env_run = lambda *a: subprocess.run([sys.executable, "-m", "mergesweep", "search", "--configfile", str(path), *a],
                                        capture_output=True, text=True, cwd=tmp_path)
    out = env_run("--json")
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert row["label"] == "cmaes:task_arithmetic" and row["generations"] == 0 and row["finished"] is False
    bad = env_run("--search", "nope", "--generation", "0")
    assert bad.returncode != 0 and "--search nope: no such search" in bad.stderr
