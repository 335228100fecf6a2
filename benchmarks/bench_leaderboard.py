#!/usr/bin/env python
"""The aggregation at sweep scale: `mergesweep aggregate` and `mergesweep leaderboard` on synthetic
evaluation trees of MergeBench size.

    .venv/bin/python benchmarks/bench_leaderboard.py                       # 1,000 and 5,000 models
    .venv/bin/python benchmarks/bench_leaderboard.py --models 5000 --trees /tmp/synth --json out.json

For each size, a tree from benchmarks/synth_evals.py (5 experts, every 2-5 expert subset, 10
methods, 6 suites x 20 lm-eval tasks x 2 splits, 3 % failed evaluations; generated into
``--trees/<N>`` once and reused) is aggregated as the workflow does it (``--evals-dir`` with the
models list and the provenance) and the leaderboard written from the parquet, each as a
subprocess. Printed per command: wall time, peak RSS (the child's ``ru_maxrss``), and for the
leaderboard the report's size, each with its ratio to the targets (leaderboard 20 s and 1 GB,
report 5 MB). Run it on a quiet machine (the load average is printed with the numbers): they are
wall-clock.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from synth_evals import generate  # noqa: E402

TARGETS = {"leaderboard_s": 20.0, "leaderboard_rss_mb": 1024.0, "report_mb": 5.0}


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` in a fresh process; its wall time and peak RSS (MB)."""
    code = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(json.dumps({'rc': p.returncode, 's': time.perf_counter() - t, "
            "'rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 'err': p.stderr[-2000:]}))")
    # a wrapper process per command, so RUSAGE_CHILDREN is this command's alone
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    if r["rc"] != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r['err']}")
    return r


def tree(root: Path, n: int) -> Path:
    d = root / str(n)
    if not (d / "evaluation_models.json").exists():
        if d.exists():
            shutil.rmtree(d)
        t0 = time.perf_counter()
        generate(d, n)
        print(f"  generated {d} in {time.perf_counter() - t0:.0f} s", flush=True)
    return d


def bench(root: Path, n: int) -> dict:
    d = tree(root, n)
    with tempfile.TemporaryDirectory(prefix="bench_lb_") as tmp:
        out = Path(tmp)
        scores = out / "tables" / "scores.parquet"
        ms = [sys.executable, "-m", "mergesweep"]
        agg = timed([*ms, "aggregate", "--evals-dir", str(d / "evals"), "--models", str(d / "evaluation_models.json"),
                     "--provenance", str(d / "provenance.json"), "--out", str(scores)])
        lb = timed([*ms, "leaderboard", "--scores", str(scores), "--out-dir", str(out)])
        report = out / "report" / "report.html"
        return {"models": n, "load_before": os.getloadavg()[0],
                "aggregate_s": round(agg["s"], 1), "aggregate_rss_mb": round(agg["rss_mb"]),
                "leaderboard_s": round(lb["s"], 1), "leaderboard_rss_mb": round(lb["rss_mb"]),
                "report_mb": round(report.stat().st_size / 1e6, 2),
                "scores_mb": round(scores.stat().st_size / 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--trees", type=Path, default=Path(tempfile.gettempdir()) / "mergesweep-synth",
                    help="where the synthetic trees are generated (and reused)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    results = []
    for n in args.models:
        print(f"{n} models (load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores):", flush=True)
        r = bench(args.trees, n)
        results.append(r)
        print(f"  aggregate    {r['aggregate_s']:>6.1f} s  {r['aggregate_rss_mb']:>6} MB peak RSS  "
              f"-> scores.parquet {r['scores_mb']} MB")
        print(f"  leaderboard  {r['leaderboard_s']:>6.1f} s  {r['leaderboard_rss_mb']:>6} MB peak RSS  "
              f"-> report.html {r['report_mb']} MB")
        print(f"  vs targets:  {r['leaderboard_s'] / TARGETS['leaderboard_s']:.2f} x 20 s, "
              f"{r['leaderboard_rss_mb'] / TARGETS['leaderboard_rss_mb']:.2f} x 1 GB, "
              f"{r['report_mb'] / TARGETS['report_mb']:.2f} x 5 MB (load average now {os.getloadavg()[0]:.2f})",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps({"targets": TARGETS, "results": results}, indent=2))


if __name__ == "__main__":
    main()
