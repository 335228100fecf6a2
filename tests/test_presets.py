"""The presets that reproduce published setups: their DAGs build (the hub is unreachable here, so
fetch jobs only plan), they plan no embedded-suite job, every lm-eval task they name exists, and
`mergesweep plan` counts exactly the jobs Snakemake schedules."""

import json
import math
import re
import subprocess
import sys

import pytest
import yaml

from helpers_pipeline import REPO
from mergesweep.config import load_config_file
from mergesweep.cost import summary
from mergesweep.plan import build_plan

PRESETS = {
    "mergebench-llama3.2-3b": {"experts": 5, "subsets": 26, "suites": 6},
    "merging-at-scale-qwen2.5": {"experts": 8, "subsets": 3 * 3 + 1, "suites": 12},
}
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "-n", "--cores", "2"]
TOY_RULES = ("make_data", "pretrain_base", "finetune")
COMPUTE_RULES = ("fetch", *TOY_RULES, "extract_lora", "align", "lmc", "merge", "revert", "evaluate",
                 "evaluate_merged", "evaluate_reverted")


def preset(name):
    return REPO / "config" / "presets" / f"{name}.yaml"


def job_counts(stdout: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"^(\w+)\s+(\d+)$", stdout, re.M)}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_plan(name):
    want = PRESETS[name]
    plan = build_plan(load_config_file(preset(name)))
    assert len([e for e in plan.experts.values() if not e.adapter]) == want["experts"]
    assert len(plan.suites) == want["suites"]
    assert plan.data_suites == [] and plan.trained_experts == []  # no toy skill, nothing trained
    assert sorted(plan.domains) == sorted({e.domain for e in plan.experts.values()})
    dense = {m.experts for m in plan.merges.values() if m.method == "task_arithmetic"
             and not any(plan.experts[e].adapter for e in m.experts)}
    assert len(dense) == want["subsets"]
    # every hub source is pinned by a placeholder the user must fill in (fetching it is an error)
    assert all(c.source["revision"] == "FILL-IN-COMMIT-SHA" for c in plan.fetched)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_dag_and_cost_agree(tmp_path, name):
    """The DAG builds; `mergesweep plan` reports exactly Snakemake's job counts per compute rule."""
    proc = subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), "--configfile", str(preset(name))],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = job_counts(proc.stdout)
    assert not set(TOY_RULES) & set(jobs), jobs
    cost = summary(build_plan(load_config_file(preset(name))), base_params=3_210_000_000)
    assert {r: cost["jobs"].get(r, 0) for r in COMPUTE_RULES} == {r: jobs.get(r, 0) for r in COMPUTE_RULES}
    plan = build_plan(load_config_file(preset(name)))
    assert cost["merged_models"] == jobs["merge"]
    # a reversible merge (RMM) is not evaluated: each of its tasks is, on its own domain
    assert cost["jobs"]["evaluate_merged"] == len(plan.evaluated_merges)
    assert cost["jobs"].get("evaluate_reverted", 0) == jobs.get("evaluate_reverted", 0) == len(plan.reverted)


def test_cost_counts_match_snakemake_on_the_tiny_preset(tmp_path):
    """Toy stages, alignment and per-suite evaluation jobs: counted as Snakemake counts them."""
    cfg = yaml.safe_load((REPO / "config/presets/tiny.yaml").read_text())
    cfg["merges"].append({"method": "task_arithmetic", "experts": {"subsets": [2]},
                          "align": {"method": "weight_matching"}})
    cfg["evaluation"]["jobs"] = "per_suite"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), "--configfile", str(tmp_path / "cfg.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = job_counts(proc.stdout)
    cost = summary(build_plan(cfg))
    assert cost["jobs"] == {r: jobs[r] for r in cost["jobs"]}
    assert set(cost["jobs"]) == {"make_data", "pretrain_base", "finetune", "align", "lmc", "merge", "evaluate",
                                 "evaluate_merged"}
    # 4 suites x 4 reference models; 4 suites x (3 grid points + 3 aligned pairs)
    assert cost["jobs"]["evaluate"] == 16 and cost["jobs"]["evaluate_merged"] == 24


def test_plan_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mergesweep", "plan", "--configfile",
                          str(preset("mergebench-llama3.2-3b")), "--base-params", "3.21e9", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    # 6 methods: linear, TA x5, TIES x9, DARE x6, DARE-TIES x6 over 26 subsets; consensus x3 over 16;
    # on the five rank-16 adapters: TA x2, lora_lego x2, knots x4, rmm x3 (not evaluated itself)
    assert s["merged_models"] == 26 * (1 + 5 + 9 + 6 + 6) + 16 * 3 + 2 + 2 + 4 + 3
    assert s["jobs"]["extract_lora"] == 5 and s["jobs"]["revert"] == s["jobs"]["evaluate_reverted"] == 3 * 5
    assert s["base_params"] == 3_210_000_000 and s["base_params_source"] == "--base-params"
    # GPU hours: evaluation jobs x their time limit (30 + 5 min per GB per suite, 12.84 GB, 6
    # suites, whole minutes); a reverted RMM task is evaluated on its one domain
    per_job_h = math.ceil(30 + 5 * 12.84 * 6) / 60
    per_reverted_h = math.ceil(30 + 5 * 12.84 * 1) / 60
    evaluated = s["merged_models"] - 3 + 1 + 5 + 5  # merges but RMM's; base, dense and LoRA experts
    assert s["total_gpu_hours_reserved"] == pytest.approx(evaluated * per_job_h + 15 * per_reverted_h, rel=1e-3)
    bad = subprocess.run([sys.executable, "-m", "mergesweep", "plan", "--base-params", "-3"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "--base-params -3: expected a positive number" in bad.stderr
