"""Benchmark: mergesweep vs mergekit 0.1.5 merging three SmolLM2-135M experts (float32).

    .venv/bin/python benchmarks/bench_merge.py --base /tmp/gg/out --work /tmp/mergesweep-bench

What it does:

1. builds three synthetic "experts" from the base (base + a seeded random task vector per
   tensor, scale 1% of the tensor's std; float32, ~540 MB each) under ``--work`` (once);
2. reads every input once so both tools start from a warm page cache;
3. runs each tool in a fresh process, ``--repeats`` times, for ``ties`` (density 0.2) and
   ``task_arithmetic`` (weight 1, lambda 1), recording wall time and the child's peak RSS
   (``wait4`` rusage), and reports the best run of each;
4. compares the two tools' merged tensors (max |difference|), a semantics cross-check.

mergekit must be installed in its own virtualenv (it is LGPL and never a dependency):

    python3 -m venv .mergekit-venv && .mergekit-venv/bin/pip install torch==2.13.0 mergekit==0.1.5

Both tools use their defaults for threads. The mergesweep run includes computing the inputs'
content fingerprints on its first repeat (they are cached next to the weights afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"ties": 5.0, "task_arithmetic": 1.5}  # required speed-up over mergekit
RSS_TARGET = 0.5  # peak RSS at most this fraction of mergekit's


def prepare(base: Path, work: Path, n_experts: int = 3, scale: float = 0.01) -> tuple[Path, list[Path]]:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    work.mkdir(parents=True, exist_ok=True)
    bdir = work / "base"
    if not bdir.exists():  # link the base so fingerprint caches are written here, not next to it
        bdir.mkdir()
        for f in base.iterdir():
            if f.is_file() and f.name != ".mergesweep-sha256":
                (bdir / f.name).symlink_to(f.resolve())
    experts = []
    for i in range(n_experts):
        edir = work / f"expert{i}"
        experts.append(edir)
        if (edir / "model.safetensors").exists():
            continue
        tmp = work / f".expert{i}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in base.iterdir():
            if f.is_file() and f.suffix in (".json", ".jinja") and f.name != "mergesweep.json":
                shutil.copy(f, tmp / f.name)
        g = torch.Generator().manual_seed(1000 + i)
        state = {}
        with safe_open(str(base / "model.safetensors"), "pt") as fh:
            for name in fh.keys():
                t = fh.get_tensor(name).float()
                std = float(t.std()) if t.numel() > 1 else 1.0
                state[name] = (t + scale * max(std, 1e-3) * torch.randn(t.shape, generator=g)).contiguous()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del state
        os.replace(tmp, edir)
        print(f"built {edir}", flush=True)
    return bdir, experts


def warm(paths: list[Path]) -> None:
    for p in paths:
        for f in p.iterdir():
            if f.suffix == ".safetensors":
                with open(f, "rb") as fh:
                    while fh.read(64 << 20):
                        pass


def run_child(cmd: list[str], env: dict | None = None) -> tuple[float, float, float]:
    """Run ``cmd``; return (wall seconds, CPU seconds (user + system), child peak RSS in MB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0


def mergesweep_cmd(method: str, base: Path, experts: list[Path], params: dict, out: Path, cfg_dir: Path) -> list[str]:
    import yaml

    cfg = cfg_dir / f"mergesweep-{method}.yaml"
    cfg.write_text(yaml.safe_dump({"method": method, "base": str(base), "experts": [str(e) for e in experts],
                                   "params": params, "dtype": "float32"}))
    return [str(REPO / ".venv/bin/mergesweep"), "merge", "--config", str(cfg), "--out", str(out)]


def mergekit_cmd(method: str, base: Path, experts: list[Path], params: dict, out: Path, cfg_dir: Path,
                 mergekit_bin: Path) -> list[str]:
    import yaml

    per_model = {k: v for k, v in params.items() if k in ("weight", "density")}
    global_params = {k: v for k, v in params.items() if k not in per_model}
    doc = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": per_model} for e in experts],
        "dtype": "float32",
    }
    if global_params:
        doc["parameters"] = global_params
    cfg = cfg_dir / f"mergekit-{method}.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    return [str(mergekit_bin), str(cfg), str(out), "--copy-tokenizer"]


def max_abs_diff(a: Path, b: Path) -> float:
    import torch
    from mergesweep.merge.io import SafetensorsInput

    worst = 0.0
    with SafetensorsInput(a, "mergesweep") as x, SafetensorsInput(b, "mergekit") as y:
        for name in x.keys():
            if name not in y:
                continue
            worst = max(worst, float((x.read(name).float() - y.read(name).float()).abs().max()))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=Path("/tmp/gg/out"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/mergesweep-bench"))
    ap.add_argument("--mergekit", type=Path, default=REPO / ".mergekit-venv/bin/mergekit-yaml")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["ties", "task_arithmetic"])
    ap.add_argument("--tools", nargs="+", default=["mergesweep", "mergekit"], choices=["mergesweep", "mergekit"])
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for both tools' processes (default: inherit)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    base, experts = prepare(args.base, args.work)
    warm([base, *experts])
    cfg_dir = args.work / "configs"
    cfg_dir.mkdir(exist_ok=True)
    params = {"ties": {"weight": 1.0, "density": 0.2}, "task_arithmetic": {"weight": 1.0}}
    results = []
    for method in args.methods:
        row = {"method": method, "params": params[method]}
        builders = {"mergesweep": mergesweep_cmd, "mergekit": mergekit_cmd}
        env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else {}
        for tool in args.tools:
            build = builders[tool]
            out = args.work / f"out-{tool}-{method}"
            runs = []
            for _ in range(args.repeats):
                shutil.rmtree(out, ignore_errors=True)
                extra = (args.mergekit,) if tool == "mergekit" else ()
                cmd = build(method, base, experts, params[method], out, cfg_dir, *extra)
                wall, cpu, rss = run_child(cmd, env)
                runs.append((wall, cpu, rss))
                print(f"{tool:<10} {method:<16} wall {wall:7.2f} s  cpu {cpu:7.2f} s  peak RSS {rss:6.0f} MB  "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
            row[tool] = {"wall_s": min(r[0] for r in runs), "cpu_s": min(r[1] for r in runs),
                         "peak_rss_mb": min(r[2] for r in runs),
                         "runs": [{"wall_s": round(w, 2), "cpu_s": round(c, 2), "peak_rss_mb": round(r)}
                                  for w, c, r in runs]}
        if "mergekit" in row and "mergesweep" in row:
            row["speedup"] = row["mergekit"]["wall_s"] / row["mergesweep"]["wall_s"]
            row["cpu_speedup"] = row["mergekit"]["cpu_s"] / row["mergesweep"]["cpu_s"]
            row["rss_ratio"] = row["mergesweep"]["peak_rss_mb"] / row["mergekit"]["peak_rss_mb"]
            row["max_abs_diff"] = max_abs_diff(args.work / f"out-mergesweep-{method}", args.work / f"out-mergekit-{method}")
        results.append(row)

    print()
    print(f"{'method':<16} {'tool':<10} {'wall s':>8} {'cpu s':>8} {'peak RSS MB':>12}")
    for r in results:
        for tool in ("mergesweep", "mergekit"):
            if tool in r:
                t = r[tool]
                print(f"{r['method']:<16} {tool:<10} {t['wall_s']:8.2f} {t['cpu_s']:8.2f} {t['peak_rss_mb']:12.0f}")
        if "speedup" in r:
            print(f"{'':<16} ratio      wall {r['speedup']:.1f}x (target {TARGETS[r['method']]:.1f}x), "
                  f"cpu {r['cpu_speedup']:.1f}x, RSS {r['rss_ratio']:.2f} (target <= {RSS_TARGET}), "
                  f"max |mergesweep - mergekit| = {r['max_abs_diff']:.2e}")
    print(f"\n(os.cpu_count() = {os.cpu_count()}, OMP_NUM_THREADS = {args.threads or os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average {os.getloadavg()[0]:.1f} at the end; best of {args.repeats} runs per tool)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
