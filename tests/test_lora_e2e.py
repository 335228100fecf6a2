"""LoRA experts through the real pipeline: the shared tiny run, extended with two experts fine-tuned
as LoRA adapters (``finetune.method: lora``), one adapter extracted from a dense expert
(``experts[i].extract``), and merges of the three adapters: task arithmetic streamed over their
ΔW = (α/r)·B·A, LoRA-LEGO (a merged adapter) and RMM (a reversible basis whose tasks are reverted
and evaluated on their own domains), re-run with ``snakemake``.

Adapters are evaluated by lm-eval over the base with ``peft=`` (no dense copy is written); with as
many RMM components as experts each reverted task is its expert again, so its scores equal the
expert's exactly - the leaderboard's reversible table says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mergesweep.plan import build_plan
from test_pipeline_e2e import copy_of, planned_jobs, run, snakemake, value  # noqa: F401  (run: the fixture)

pytestmark = pytest.mark.slow

LORA = {"r": 8, "alpha": 16, "lr": 3.0e-3}
LORA_EXPERTS = [
    {"name": "lora-reverse", "domain": "reverse", "finetune": {"method": "lora", "steps": 200, "lora": LORA}},
    {"name": "lora-dateformat", "domain": "dateformat", "finetune": {"method": "lora", "steps": 120, "lora": LORA}},
    {"name": "lora-arithmetic", "domain": "arithmetic", "extract": {"from": "tiny-arithmetic", "rank": 8}},
]
ADAPTERS = [e["name"] for e in LORA_EXPERTS]
LORA_MERGES = [
    {"method": "task_arithmetic", "experts": ADAPTERS, "params": {"lambda": 1.0}},
    {"method": "lora_lego", "experts": ADAPTERS, "params": {}},
    {"method": "rmm", "experts": ADAPTERS, "params": {"components": 3}},
]


def extend_and_run(tiny_workdir: Path, dst: Path) -> dict:
    """A copy of the finished tiny run with the LoRA experts and merges added: the dry run's job
    counts, then the run. tests/conftest.py starts it in the background after the shared tiny run
    (and the data-aware run) are done; the test below asserts on it."""
    work = copy_of({"workdir": tiny_workdir}, dst)
    cfg_path = work / "config/presets/tiny.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["experts"] += LORA_EXPERTS
    cfg["merges"] = [m for m in cfg["merges"] if m["method"] == "linear"] + LORA_MERGES
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    jobs = planned_jobs(snakemake(work, cfg_path, "-n").stdout)
    proc = snakemake(work, cfg_path, check=False)
    return {"work": work, "cfg": cfg, "cfg_path": cfg_path, "jobs": jobs, "rc": proc.returncode,
            "log": proc.stderr[-6000:]}


@pytest.fixture(scope="module")
def lora_run(run, tmp_path_factory):
    from conftest import early_lora_run

    got = early_lora_run()
    return got if got is not None else extend_and_run(run["workdir"], tmp_path_factory.mktemp("lora-run"))


def test_lora_experts_and_merges_run_through_the_tiny_pipeline(lora_run):
    work, cfg, jobs = lora_run["work"], lora_run["cfg"], lora_run["jobs"]
    plan = build_plan(cfg)
    # two LoRA fine-tunes, one extraction; four merges (the three on adapters and `linear` over every
    # expert, dense and LoRA alike), three reverted tasks evaluated on their domain; the dense experts
    # and the base are not touched
    assert jobs.get("finetune") == 2 and jobs.get("extract_lora") == 1, jobs
    assert jobs.get("merge") == 4 and jobs.get("revert") == 3 and jobs.get("evaluate_reverted") == 3, jobs
    assert jobs.get("evaluate") == 3 and jobs.get("evaluate_merged") == 3, jobs  # rmm's basis is not a model
    assert "pretrain_base" not in jobs, jobs
    assert lora_run["rc"] == 0, lora_run["log"]

    # the experts are PEFT adapters with their settings in the record
    for name in ADAPTERS:
        d = work / plan.experts[name].dir
        assert (d / "adapter_config.json").is_file() and not (d / "config.json").exists(), name
        rec = json.loads((d / "mergesweep.json").read_text())
        assert rec["adapter"]["r"] == 8 and rec["uid"] == plan.experts[name].uid, rec["adapter"]
    s = pd.read_parquet(work / "results/tables/scores.parquet")
    base = plan.base.name
    # a LoRA expert learned its skill (the base has not: the tiny preset stops pretraining before)
    assert value(s, "lora-dateformat", "dateformat", "test") > value(s, base, "dateformat", "test") + 0.2

    by_method = {m.method: m for m in plan.merges.values() if m.experts == tuple(ADAPTERS)}
    lego = by_method["lora_lego"]
    assert (work / lego.dir / "adapter_config.json").is_file()  # a merged adapter, evaluated with peft=
    for m in (by_method["task_arithmetic"], lego):
        got = s[(s.model_id == m.model_id) & (s.split == "test")]
        assert set(got.suite) == set(plan.suites) and (got.status == "ok").all(), m.model_id

    # RMM with as many components as tasks: each reverted task is its expert again, score for score
    rmm = by_method["rmm"]
    assert rmm.model_id not in set(s.model_id)
    rev = pd.read_parquet(work / "results/tables/reversible.parquet")
    assert len(rev) == 3 and set(rev["task"]) == set(ADAPTERS), rev
    for r in plan.reverted.values():
        assert r.merge == rmm.model_id
        got = value(s, r.model_id, r.domain, "test")
        assert got == pytest.approx(value(s, r.expert, r.domain, "test"), abs=1e-9), r.model_id
        assert set(s[s.model_id == r.model_id].suite) == {r.domain}
    assert "Reversible" in (work / "results/leaderboard.md").read_text()
