#!/usr/bin/env python
"""The evaluation stage: one job per model (every suite in it) against one job per (model, suite).

    .venv/bin/python benchmarks/bench_eval_jobs.py --workdir /path/to/finished/default/run
    .venv/bin/python benchmarks/bench_eval_jobs.py --preset config/presets/tiny.yaml   # builds a tiny run first

Takes a finished run of a config (every model on disk; the default run with `keep_models: all`),
copies what the evaluations need (resources/, results/models, results/merges) into a scratch
directory, and times `snakemake --cores N <every evaluation JSON>` twice from no evaluations at all:
with `evaluation.jobs: per_suite` and with `per_model` (the default), in that order, the same
models, suites and options. Prints the wall time, the number of evaluation jobs and the per-job
start-up (the median of the JSONs' `load_s`) of both, and the ratio per_suite / per_model; checks that
both wrote the same values. Run it on a quiet machine: the numbers are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ENV_FLAGS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def snakemake(workdir: Path, config: Path, *extra: str, cores: int) -> subprocess.CompletedProcess:
    import os

    cmd = [sys.executable, "-m", "snakemake", *extra, "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(workdir), "--cores", str(cores), "--configfile", str(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV_FLAGS})
    if proc.returncode != 0:
        sys.exit(f"snakemake failed in {workdir}:\n{proc.stderr[-4000:]}")
    return proc


def values(evals: Path) -> dict:
    out = {}
    for p in sorted(evals.glob("*/*.json")):
        doc = json.loads(p.read_text())
        out[(p.parent.name, p.stem)] = [(r["lm_eval_task"], r["metric"], r["split"], r["value"]) for r in doc["results"]]
    return out


def time_mode(src: Path, cfg: dict, mode: str, scratch: Path, cores: int) -> dict:
    from mergesweep.plan import build_plan

    work = scratch / mode
    for sub in ("resources", "results/models", "results/merges"):
        shutil.copytree(src / sub, work / sub, symlinks=True)
    cfg = {**cfg, "evaluation": {**cfg.get("evaluation", {}), "jobs": mode}}
    cfg_path = work / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    targets = build_plan(cfg).eval_jsons()
    t0 = time.perf_counter()
    proc = snakemake(work, cfg_path, *targets, cores=cores)
    seconds = time.perf_counter() - t0
    jobs = sum(line.split()[0] in ("evaluate", "evaluate_merged") and line.split()[1].isdigit() and int(line.split()[1])
               for line in proc.stderr.splitlines() + proc.stdout.splitlines()
               if len(line.split()) == 2 and line.split()[0] in ("evaluate", "evaluate_merged"))
    loads = [json.loads(p.read_text())["load_s"] for p in (work / "results/evals").glob("*/*.json")]
    return {"mode": mode, "seconds": round(seconds, 1), "jobs": jobs, "jsons": len(targets),
            "median_load_s": round(statistics.median(loads), 2), "values": values(work / "results/evals")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, help="a finished run (default: build one from --preset)")
    ap.add_argument("--preset", type=Path, default=REPO / "config/config.yaml", help="its config")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    cfg = yaml.safe_load(args.preset.read_text())
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        scratch = Path(tmp)
        src = args.workdir
        if src is None:
            src = scratch / "run"
            src.mkdir()
            print(f"building a run of {args.preset} in {src} ...", flush=True)
            snakemake(src, args.preset, cores=args.cores)
        results = [time_mode(src, cfg, mode, scratch, args.cores) for mode in ("per_suite", "per_model")]
    a, b = results
    same = a["values"] == b["values"]
    print(f"config {args.preset.name}: {b['jsons']} evaluation JSONs, --cores {args.cores}")
    for r in results:
        print(f"  {r['mode']:<10} {r['jobs']:>4} jobs  {r['seconds']:>7.1f} s  (median model load {r['median_load_s']} s per job)")
    print(f"  ratio per_suite / per_model: {a['seconds'] / b['seconds']:.2f}x; same values: {same}")
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "values"} for r in results]
                                        + [{"ratio": a["seconds"] / b["seconds"], "same_values": same}], indent=2))
    if not same:
        sys.exit("the two modes wrote different values")


if __name__ == "__main__":
    main()
