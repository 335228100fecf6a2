"""Embedded skills: deterministic, disjoint splits, correct answers, valid lm-eval task YAMLs."""

import json

import yaml

from mergesweep.zoo import skills
from mergesweep.zoo.cli_data import make_suite


def test_splits_are_deterministic_disjoint_and_correct():
    sizes = {"train": 300, "validation": 20, "test": 40}
    a = skills.generate_splits("arithmetic", sizes, seed=3)
    b = skills.generate_splits("arithmetic", sizes, seed=3)
    assert a == b
    c = skills.generate_splits("arithmetic", sizes, seed=4)
    assert a["test"] != c["test"]
    inputs = [set(r["input"] for r in a[s]) for s in sizes]
    assert sum(map(len, inputs)) == 360 and not (inputs[0] & inputs[1] or inputs[0] & inputs[2] or inputs[1] & inputs[2])
    for r in a["test"]:
        x, y = r["input"].split("+")
        assert r["target"] == f" {int(x) + int(y)}"
        assert r["prompt"].endswith("Output:")
    rev = skills.generate_splits("reverse", {"test": 5}, 0)["test"][0]
    assert rev["output"].split() == rev["input"].split()[::-1]
    d = skills.generate_splits("dateformat", {"test": 5}, 0)["test"][0]
    y, m, dd = d["input"].split("-")
    assert d["output"] == f"{dd}/{m}/{y}"


def test_capitals_multiple_choice_labels_point_at_the_capital():
    table = dict(skills.load_capitals())
    recs = skills.capitals_splits({"validation": 10, "test": 20}, seed=0)
    qs = [r["question"] for r in recs["validation"] + recs["test"]]
    assert len(set(qs)) == 30
    for r in recs["test"]:
        country = r["question"].split("capital of ")[1].split("?")[0]
        assert r["choices"][r["label"]] == table[country]
        assert len(set(r["choices"])) == 4


def test_make_suite_writes_loadable_lm_eval_tasks(tmp_path):
    from lm_eval.tasks import TaskManager

    m = make_suite("reverse", 0, {"train": 50, "validation": 8, "test": 16}, tmp_path / "d", tmp_path / "t")
    assert m["sizes"] == {"train": 50, "validation": 8, "test": 16}
    lines = (tmp_path / "d/test.jsonl").read_text().splitlines()
    assert len(lines) == 16 and json.loads(lines[0])["target"].startswith(" ")
    spec = yaml.safe_load((tmp_path / "t/ms_reverse_test.yaml").read_text())
    assert spec["output_type"] == "loglikelihood" and spec["test_split"] == "test"
    tm = TaskManager(include_path=str(tmp_path / "t"), include_defaults=False)
    assert {"ms_reverse_test", "ms_reverse_validation"} <= set(tm.all_tasks)
