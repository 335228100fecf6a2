"""Benchmark: RegMean and Fisher merging of three SmolLM2-135M experts against the streaming floor.

    .venv/bin/python benchmarks/bench_regmean.py [--base resources/checkpoints/smollm2-135m-instruct]
                                                 [--work /tmp/mergesweep-bench-regmean] [--examples 32]
                                                 [--max-length 128] [--threads 1]

1. builds three synthetic experts from the base (``benchmarks/bench_merge.py``'s ``prepare``: base
   + a seeded random task vector per tensor) under ``--work`` (once);
2. computes each expert's ``gram`` and ``fisher`` statistics with ``mergesweep stats`` (once; the
   stats pass itself is measured against a forward pass by ``benchmarks/bench_stats.py``);
3. merges them with ``linear`` (the weight-only floor: read, average, write), ``regmean`` and
   ``fisher`` through ``mergesweep merge`` in fresh processes, and prints each merge's wall time and
   peak RSS (the child's ``wait4`` rusage) and the ratios to ``linear``.

RegMean reads three Gram matrices per linear weight and solves one ``in x in`` system per weight
(float64): its extra cost is the solves and the statistics' reads; its memory stays that of a
streamed merge (one tensor per input plus its statistics), not the models.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def run(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of a command in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read()[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> int:
    from bench_merge import prepare

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=REPO / "resources/checkpoints/smollm2-135m-instruct")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mergesweep-bench-regmean"))
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    ms = [sys.executable, "-m", "mergesweep"]
    base, experts = prepare(args.base, args.work)
    from mergesweep.align.toy import synthetic_texts

    stats = {}
    for i, e in enumerate(experts):
        data = args.work / f"calib{i}.jsonl"
        if not data.exists():
            data.write_text("".join(json.dumps({"text": " ".join(synthetic_texts(8, seed=100 * i + j))}) + "\n"
                                    for j in range(args.examples)))
        for kind in ("gram", "fisher"):
            out = args.work / f"stats{i}-{kind}"
            if not (out / "stats.json").exists():
                wall, rss = run([*ms, "stats", "--model", str(e), "--data", str(data), "--kind", kind,
                                 "--examples", str(args.examples), "--max-length", str(args.max_length),
                                 "--device", "cpu", "--threads", str(args.threads), "--uid", f"e{i}--{kind}--bench",
                                 "--no-progress", "--out", str(out)], env)
                print(f"stats {kind:7s} expert {i}: {wall:6.1f} s, peak RSS {rss:6.0f} MB")
            stats.setdefault(kind, {})[f"e{i}"] = str(out)
    results = {}
    for method, params, kind in [("linear", {}, None), ("regmean", {}, "gram"),
                                 ("fisher", {"fisher_target": "labels"}, "fisher")]:
        doc = {"method": method, "base": str(base), "experts": [str(e) for e in experts],
               "expert_names": [f"e{i}" for i in range(len(experts))], "params": params, "device": "cpu"}
        if kind:
            doc["stats"] = stats[kind]
        spec = args.work / f"{method}.yaml"
        spec.write_text(json.dumps(doc))
        out = args.work / f"out-{method}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        results[method] = run([*ms, "merge", "--config", str(spec), "--threads", str(args.threads),
                               "--out", str(out)], env)
    lw, lr = results["linear"]
    print(f"\n{'method':8s} {'wall s':>8s} {'x linear':>9s} {'peak RSS MB':>12s} {'x linear':>9s}")
    for method, (wall, rss) in results.items():
        print(f"{method:8s} {wall:8.1f} {wall / lw:9.2f} {rss:12.0f} {rss / lr:9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
