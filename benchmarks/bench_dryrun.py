#!/usr/bin/env python
"""Planning cost: ``snakemake -n`` of mergesweep against a bare Snakemake workflow of the same jobs.

    .venv/bin/python benchmarks/bench_dryrun.py                 # default config + a ~10k-job sweep
    .venv/bin/python benchmarks/bench_dryrun.py --merges 6600   # ~20k jobs
    .venv/bin/python benchmarks/bench_dryrun.py --repeats 3 --json out.json

The sweep is the tiny preset with one task-arithmetic grid of ``--merges`` lambda values: each
merge is a merge-YAML job, a merge job and one evaluation job (every suite in it), so 3 jobs per merge.
The *bare* workflow has the same rules, the same job count and the same file names (outputs and
logs), with the ids written into the Snakefile as plain lists, no plan, no schema, no params and
``shell: "true"``: what Snakemake itself costs for this DAG. Both run from a fresh directory (nothing exists, every job
is planned), interleaved, ``--repeats`` times; the median wall time is reported, with the ratio
(the target: within 1.3x). Also printed: the time to ``import`` the plan module and build the
plan, and whether that imported torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--quiet", "rules"]

BARE = '''
MODELS = {models!r}
MERGES = {merges!r}
SUITES = {suites!r}
EXPERTS = {experts!r}
BASE = {base!r}
DATA = {data!r}

wildcard_constraints:
    merge_id="[A-Za-z0-9][A-Za-z0-9_.-]*",
    model_id="[A-Za-z0-9][A-Za-z0-9_.-]*",
    suite="|".join(SUITES),
    expert="|".join(EXPERTS),

def model_dir(m):
    if m == BASE:
        return f"resources/checkpoints/{{m}}"
    if m in EXPERTS:
        return f"resources/experts/{{m}}"
    return f"results/models/{{m}}"

rule all:
    input:
        [model_dir(m) for m in MODELS],
        "results/tables/scores.parquet", "results/leaderboard.md",

rule make_data:
    output: directory("resources/data/{{s}}"), directory("resources/tasks/{{s}}")
    log: "results/logs/make_data/{{s}}.log"
    shell: "true"

rule pretrain_base:
    input: [f"resources/data/{{s}}" for s in DATA]
    output: directory(f"resources/checkpoints/{{BASE}}")
    log: "results/logs/pretrain/base.log"
    shell: "true"

rule finetune:
    input: base=f"resources/checkpoints/{{BASE}}", data="resources/data/arithmetic"
    output: directory("resources/experts/{{expert}}")
    log: "results/logs/finetune/{{expert}}.log"
    shell: "true"

rule merge_yaml:
    output: "results/merges/{{merge_id}}.yaml"
    shell: "true"

rule merge:
    input:
        base=f"resources/checkpoints/{{BASE}}",
        experts=[f"resources/experts/{{e}}" for e in EXPERTS],
        spec="results/merges/{{merge_id}}.yaml",
    output: directory("results/models/{{merge_id}}")
    log: "results/logs/merge/{{merge_id}}.log"
    shell: "true"

rule evaluation_spec:
    output: "results/evaluation.json"
    shell: "true"

rule evaluate:
    input:
        model=lambda w: model_dir(w.model_id),
        tasks=[f"resources/tasks/{{s}}" for s in SUITES],
        spec="results/evaluation.json",
    output: [f"results/evals/{{{{model_id}}}}/{{s}}.json" for s in SUITES]
    log: "results/logs/evaluate/{{model_id}}.log"
    shell: "true"

rule provenance:
    input: [model_dir(m) for m in [BASE, *EXPERTS]]
    output: "results/tables/provenance.json"
    shell: "true"

rule aggregate:
    input:
        evals=[f"results/evals/{{m}}/{{s}}.json" for m in MODELS for s in SUITES],
        provenance="results/tables/provenance.json",
    output: "results/tables/scores.parquet"
    shell: "true"

rule leaderboard:
    input: "results/tables/scores.parquet"
    output: "results/leaderboard.md"
    shell: "true"
'''


def sweep_config(n_merges: int) -> dict:
    cfg = yaml.safe_load((REPO / "config/presets/tiny.yaml").read_text())
    cfg["merges"] = [{"method": "task_arithmetic",
                      "params": {"lambda": [round(0.001 * (i + 1), 6) for i in range(n_merges)]}}]
    return cfg


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def job_count(stdout: str) -> int:
    for line in stdout.splitlines():
        if line.startswith("total"):
            return int(line.split()[1])
    return -1


def measure(cfg: dict | None, repeats: int) -> dict:
    from mergesweep.plan import build_plan

    with tempfile.TemporaryDirectory(prefix="bench-dryrun-") as tmp:
        tmp = Path(tmp)
        ours_dir, bare_dir = tmp / "ours", tmp / "bare"
        ours_dir.mkdir()
        bare_dir.mkdir()
        ours_cmd = [*SNAKEMAKE, "--snakefile", str(REPO / "Snakefile")]
        if cfg is not None:
            (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
            ours_cmd += ["--configfile", str(tmp / "cfg.yaml")]
        plan_cfg = cfg if cfg is not None else yaml.safe_load((REPO / "config/config.yaml").read_text())
        t0 = time.perf_counter()
        plan = build_plan(plan_cfg)
        plan_s = time.perf_counter() - t0
        (bare_dir / "Snakefile").write_text(BARE.format(
            models=plan.models, merges=list(plan.merges), suites=plan.suites, experts=list(plan.experts),
            base=plan.base.name, data=plan.data_suites))
        bare_cmd = [*SNAKEMAKE, "--snakefile", str(bare_dir / "Snakefile")]
        ours, bare = [], []
        jobs_ours = jobs_bare = -1
        for _ in range(repeats):
            w, out = timed(ours_cmd, ours_dir)
            ours.append(w)
            jobs_ours = job_count(out)
            w, out = timed(bare_cmd, bare_dir)
            bare.append(w)
            jobs_bare = job_count(out)
    return {"jobs": jobs_ours, "jobs_bare": jobs_bare, "merges": len(plan.merges), "build_plan_s": round(plan_s, 3),
            "ours_s": round(statistics.median(ours), 2), "bare_s": round(statistics.median(bare), 2),
            "ratio": round(statistics.median(ours) / statistics.median(bare), 2),
            "ours_all": [round(x, 2) for x in ours], "bare_all": [round(x, 2) for x in bare]}


def import_cost() -> dict:
    code = ("import time, sys; t = time.perf_counter(); from mergesweep.plan import build_plan; "
            "import yaml; build_plan(yaml.safe_load(open(sys.argv[1]))); "
            "print(time.perf_counter() - t, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "config/config.yaml")],
                         capture_output=True, text=True, check=True).stdout.split()
    return {"import_and_plan_s": round(float(out[0]), 3), "imports_torch": out[1] == "True"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--merges", type=int, default=3300, help="merges in the sweep (3 jobs each)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    result = {"load_before": load, "start_up": import_cost(),
              "default": measure(None, args.repeats), "sweep": measure(sweep_config(args.merges), args.repeats)}
    for name in ("default", "sweep"):
        r = result[name]
        print(f"{name:8s} {r['jobs']:6d} jobs (bare {r['jobs_bare']}): mergesweep {r['ours_s']:6.2f} s, "
              f"bare Snakemake {r['bare_s']:6.2f} s, ratio {r['ratio']:.2f}  (build_plan {r['build_plan_s']} s)")
    su = result["start_up"]
    print(f"import + build_plan in a fresh process: {su['import_and_plan_s']} s, imports torch: {su['imports_torch']}")
    print(f"load average before: {' '.join(load)}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
