"""What a sweep costs before it runs: jobs per stage, GPU hours reserved, disk for merged models.

``mergesweep plan --configfile C`` prints it from the plan alone (no Snakemake, no torch, well
under a second for thousands of jobs), so a cluster sweep can be sized before it is submitted.

- **Jobs** per compute rule, exactly the jobs a fresh ``snakemake`` run schedules (the tests
  compare them with ``snakemake -n``): ``fetch`` (fetched base and experts), ``make_data``
  (generated suites), ``pretrain_base``, ``finetune``, ``align`` and ``lmc`` (one of each per
  alignment), ``merge``, ``evaluate`` (base and experts) and ``evaluate_merged``: one job per model,
  or one per (model, suite) with ``evaluation.jobs: per_suite``.
- **GPU hours reserved**: per rule, jobs x GPUs x the time limit each job asks for
  (:class:`mergesweep.resources.Resources`, first attempt). An upper bound: jobs end when done,
  and the limits are generous so that no job is killed. Runtime limits scale with the base's
  size: read from its checkpoint when it is there, from the recipe of a pretrained base, else
  ``--base-params`` (default: a 1B guess).
- **Disk**: the merged models kept (``keep_models``) at the merge dtype.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass

from mergesweep.resources import Resources, _bytes_per_param, _gb


@dataclass(frozen=True)
class StageCost:
    rule: str
    stage: str  # resources stage (mergesweep.resources.STAGES)
    jobs: int
    gpus_per_job: int
    minutes_per_job: float  # mean time limit of one job (first attempt)

    @property
    def gpu_hours(self) -> float:
        return self.jobs * self.gpus_per_job * self.minutes_per_job / 60

    @property
    def cpu_hours(self) -> float:
        return self.jobs * self.minutes_per_job / 60 if self.gpus_per_job == 0 else 0.0


def search_candidates_left(plan) -> int:
    """Candidates the searches may still propose: each search's budget less the distinct
    candidates its generation files on disk already planned (those are in ``plan.merges``)."""
    left = 0
    for sid, s in plan.searches.items():
        seen = {i for gen in plan.search_ids.get(sid, []) for i in gen}
        left += max(0, s.config["budget"] - len(seen))
    return left


def stage_costs(plan, res: Resources | None = None) -> list[StageCost]:
    """One :class:`StageCost` per compute rule that has jobs in the plan."""
    res = res or Resources(plan)
    per_suite = plan.evaluation["jobs"] == "per_suite"
    eval_jobs_per_model = len(plan.suites) if per_suite else 1
    eval_units = res.eval_units()
    n_align = len(plan.align_jobs)
    streamed = [k for k in plan.merges if res.merge_stage(k) == "merge"]
    search_left = search_candidates_left(plan)
    rows = [
        ("fetch", "fetch", len(plan.fetched), [1.0]),
        ("make_data", "make_data", len(plan.data_suites), [1.0]),
        ("pretrain_base", "pretrain", int(plan.base.stage == "pretrain"), [1.0]),
        ("finetune", "finetune", len(plan.trained_experts), [1.0]),
        ("extract_lora", "merge", len(plan.extracted_experts), [1.0]),
        ("align", "align", n_align, [1.0]),
        ("lmc", "lmc", n_align, [1.0]),
        ("stats", "stats", len(plan.stats_jobs), [1.0]),
        ("merge", "merge", len(streamed), [res.merge_units(m) for m in streamed] or [1.0]),
        # whole-model merges run forward passes: the stats stage's resources (Resources.merge_stage)
        ("merge (whole-model)", "stats", len(plan.merges) - len(streamed), [1.0]),
        ("evaluate", "evaluate", (1 + len(plan.experts)) * eval_jobs_per_model, [eval_units]),
        ("evaluate_merged", "evaluate", len(plan.evaluated_merges) * eval_jobs_per_model, [eval_units]),
        # a reversible merge's tasks: each reverted, then evaluated on its domain only
        ("revert", "merge", len(plan.reverted), [1.0]),
        ("evaluate_reverted", "evaluate", len(plan.reverted), [1]),  # its domain only
        # a search's candidates not planned yet: at most its budget (a candidate seen before is free)
        ("merge (search)", "merge", search_left, [1.0]),
        ("evaluate (search)", "evaluate", search_left * eval_jobs_per_model, [eval_units]),
    ]
    out = []
    for rule, stage, jobs, units in rows:
        if not jobs:
            continue
        minutes = sum(res.runtime(stage, 1, u) for u in units) / len(units)
        out.append(StageCost(rule, stage, jobs, res.gpu(stage), minutes))
    return out


def summary(plan, base_params: int | None = None) -> dict:
    """Jobs, GPU/CPU hours reserved and disk of a plan, as a JSON-able dict."""
    res = Resources(plan)
    if base_params:
        res._params = int(base_params)
    stages = stage_costs(plan, res)
    size_gb = res.base_params() * _bytes_per_param(plan.config) / 1e9
    keep = plan.keep_models
    n_kept = {"all": len(plan.merges), "none": 0,
              "selected": len({(m.method, bool(m.align), m.experts) for m in plan.merges.values()})}[keep]
    return {
        "config": plan.config["name"],
        "models": len(plan.models),
        "merged_models": len(plan.merges),
        "suites": len(plan.suites),
        "base_params": res.base_params(),
        "base_params_source": ("recipe" if plan.base.stage == "pretrain" else
                               "--base-params" if base_params else
                               "checkpoint" if res._params is not None else "guess (1B; pass --base-params)"),
        "jobs": {s.rule: s.jobs for s in stages},
        "total_jobs": sum(s.jobs for s in stages),
        "gpu_hours_reserved": {s.rule: round(s.gpu_hours, 1) for s in stages if s.gpus_per_job},
        "total_gpu_hours_reserved": round(sum(s.gpu_hours for s in stages), 1),
        "total_cpu_hours_reserved": round(sum(s.cpu_hours for s in stages), 1),
        "merged_model_gb": round(size_gb, 3),
        "keep_models": keep,
        "kept_models": n_kept,
        "disk_kept_gb": round(n_kept * size_gb, 1),
        "stats_jobs": len(plan.stats_jobs),
        "stats_gb": round(sum(res.stats_gb(j.kind) for j in plan.stats_jobs.values()), 4),
        "disk_peak_note": ("every merged model is kept" if keep == "all" else
                           "a merged model is removed once evaluated: the peak is the models merged "
                           "and not yet evaluated, at most the jobs running at once"),
    }


def format_summary(s: dict) -> str:
    lines = [f"{s['config']}: {s['models']} models ({s['merged_models']} merged) x {s['suites']} suites",
             f"base: {s['base_params'] / 1e9:.2f}B parameters ({s['base_params_source']})", "",
             f"{'rule':<18}{'jobs':>8}{'GPU h reserved':>17}"]
    for rule, n in s["jobs"].items():
        gh = s["gpu_hours_reserved"].get(rule)
        lines.append(f"{rule:<18}{n:>8}{(f'{gh:,.1f}' if gh is not None else '-'):>17}")
    lines.append(f"{'total':<18}{s['total_jobs']:>8}{s['total_gpu_hours_reserved']:>17,.1f}")
    lines += ["", f"CPU hours reserved (CPU-only jobs): {s['total_cpu_hours_reserved']:,.1f}",
              "GPU hours are jobs x GPUs x each job's time limit: an upper bound (jobs end when done)",
              f"disk: {s['kept_models']} merged model(s) kept x {_gb(s['merged_model_gb'])} = "
              f"{_gb(s['disk_kept_gb'])} (keep_models: {s['keep_models']}; {s['disk_peak_note']})"]
    if s["stats_jobs"]:
        lines.append(f"statistics: {s['stats_jobs']} stats job(s), {_gb(s['stats_gb'])} "
                     + ("kept" if s["keep_models"] == "all" else "removed once every merge reading them is done"))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configfile", metavar="FILE.yaml",
                        help="the workflow config (default: the embedded default config/config.yaml)")
    parser.add_argument("--base-params", type=float, metavar="N",
                        help="parameters of a base that is not fetched yet (e.g. 3.2e9); default: "
                             "read from its checkpoint, else a 1B guess")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mergesweep.config import load_config_file
    from mergesweep.errors import ConfigError
    from mergesweep.plan import build_plan

    if args.base_params is not None and (not math.isfinite(args.base_params) or args.base_params < 1):
        raise ConfigError(f"--base-params {args.base_params:g}: expected a positive number of parameters")
    path = args.configfile or Path(__file__).resolve().parents[2] / "config" / "config.yaml"
    plan = build_plan(load_config_file(path))
    s = summary(plan, int(args.base_params) if args.base_params else None)
    sys.stdout.write((json.dumps(s, indent=2) if args.json else format_summary(s)) + "\n")
    return 0
