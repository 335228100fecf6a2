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
        "models": [{"model": str(e), "parameters": dict(per_model)} for e in experts],
        "dtype": "float32",
    }
    if global_params:
        doc["parameters"] = global_params
    cfg = cfg_dir / f"mergekit-{method}.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    return [str(mergekit_bin), str(cfg), str(out), "--copy-tokenizer"]


def compare(a: Path, b: Path) -> tuple[float, int, int]:
    """(max |a - b|, number of differing entries, number of entries) over the tensors both have."""
    from mergesweep.checkpoints.layout import CheckpointReader

    worst, differing, total = 0.0, 0, 0
    with CheckpointReader(a, "mergesweep") as x, CheckpointReader(b, "mergekit") as y:
        for name in x.keys():
            if name not in y:
                continue
            d = (x.get(name).float() - y.get(name).float()).abs()
            worst = max(worst, float(d.max()))
            differing += int(torch_count_nonzero(d))
            total += d.numel()
    return worst, differing, total


def torch_count_nonzero(t) -> int:
    import torch

    return int(torch.count_nonzero(t))


CROSSCHECK = [
    # (mergesweep method, mergesweep params, mergekit method, per-model params, global params, uses base)
    ("linear", {"weight": [0.5, 0.3, 0.2]}, "linear", [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}], {}, False),
    ("task_arithmetic", {"weight": [1.0, 0.5, 0.25]}, "task_arithmetic",
     [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.25}], {}, True),
    ("ties", {"density": 0.3, "weight": [1.0, 0.7, 0.4]}, "ties",
     [{"density": 0.3, "weight": 1.0}, {"density": 0.3, "weight": 0.7}, {"density": 0.3, "weight": 0.4}], {}, True),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.05}, "breadcrumbs",
     [{"density": 0.6, "gamma": 0.05, "weight": 1.0}] * 3, {}, True),
    ("slerp", {"t": 0.3}, "slerp", None, {"t": 0.3}, True),
    ("model_stock", {}, "model_stock", [{}] * 3, {}, True),
]


def crosscheck(work: Path, mergekit_bin: Path) -> int:
    """Same merges with both tools on a tiny Llama family; print the largest difference."""
    import torch
    import yaml
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergesweep.merge.engine import merge_checkpoints

    root = work / "crosscheck"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    base_state = load_file(root / "base" / "model.safetensors")
    experts = []
    g = torch.Generator().manual_seed(10)
    common = {k: torch.randn(v.shape, generator=g) for k, v in base_state.items()}  # shared direction
    for i in range(3):
        d = root / f"expert{i}"
        d.mkdir()
        shutil.copy(root / "base" / "config.json", d / "config.json")
        save_file({k: v + 0.01 * (common[k] + torch.randn(v.shape, generator=g)) for k, v in base_state.items()},
                  str(d / "model.safetensors"), metadata={"format": "pt"})
        experts.append(d)
    worst_all = 0.0
    for ms_method, ms_params, mk_method, per_model, global_params, uses_base in CROSSCHECK:
        n = 1 if ms_method == "slerp" else 3
        ours = root / f"ours-{ms_method}"
        merge_checkpoints(ms_method, root / "base" if uses_base else None, experts[:n], ms_params, ours,
                          dtype="float32")
        doc = {"merge_method": mk_method, "dtype": "float32"}
        if ms_method == "slerp":
            doc["base_model"] = str(root / "base")
            doc["models"] = [{"model": str(root / "base")}, {"model": str(experts[0])}]
        else:
            doc["models"] = [{"model": str(e), "parameters": p} for e, p in zip(experts[:n], per_model)]
            if uses_base:
                doc["base_model"] = str(root / "base")
        if global_params:
            doc["parameters"] = global_params
        (root / f"{mk_method}.yaml").write_text(yaml.safe_dump(doc))
        theirs = root / f"mergekit-{ms_method}"
        run_child([str(mergekit_bin), str(root / f"{mk_method}.yaml"), str(theirs), "--no-copy-tokenizer"])
        worst, differing, total = compare(ours, theirs)
        worst_all = max(worst_all, worst)
        print(f"{ms_method:<16} max |mergesweep - mergekit| = {worst:.2e} ({differing} of {total} entries differ)",
              flush=True)
    return 0 if worst_all < 1e-4 else 1


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
    ap.add_argument("--crosscheck", action="store_true",
                    help="instead: compare both tools' results for several methods on a tiny Llama")
    args = ap.parse_args(argv)
    if args.crosscheck:
        return crosscheck(args.work, args.mergekit)

    base, experts = prepare(args.base, args.work)
    warm([base, *experts])
    cfg_dir = args.work / "configs"
    cfg_dir.mkdir(exist_ok=True)
    params = {"ties": {"weight": 1.0, "density": 0.2}, "task_arithmetic": {"weight": 1.0}}
    results = []
    builders = {"mergesweep": mergesweep_cmd, "mergekit": mergekit_cmd}
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else {}
    for method in args.methods:
        row = {"method": method, "params": params[method]}
        runs: dict[str, list] = {tool: [] for tool in args.tools}
        for _ in range(args.repeats):  # interleaved, so both tools see the same background load
            for tool in args.tools:
                out = args.work / f"out-{tool}-{method}"
                shutil.rmtree(out, ignore_errors=True)
                extra = (args.mergekit,) if tool == "mergekit" else ()
                cmd = builders[tool](method, base, experts, params[method], out, cfg_dir, *extra)
                wall, cpu, rss = run_child(cmd, env)
                runs[tool].append((wall, cpu, rss))
                print(f"{tool:<10} {method:<16} wall {wall:7.2f} s  cpu {cpu:7.2f} s  peak RSS {rss:6.0f} MB  "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
        for tool, rs in runs.items():
            row[tool] = {"wall_s": min(r[0] for r in rs), "cpu_s": min(r[1] for r in rs),
                         "peak_rss_mb": min(r[2] for r in rs),
                         "runs": [{"wall_s": round(w, 2), "cpu_s": round(c, 2), "peak_rss_mb": round(r)}
                                  for w, c, r in rs]}
        if "mergekit" in row and "mergesweep" in row:
            row["speedup"] = row["mergekit"]["wall_s"] / row["mergesweep"]["wall_s"]
            row["cpu_speedup"] = row["mergekit"]["cpu_s"] / row["mergesweep"]["cpu_s"]
            row["rss_ratio"] = row["mergesweep"]["peak_rss_mb"] / row["mergekit"]["peak_rss_mb"]
            worst, differing, total = compare(args.work / f"out-mergesweep-{method}", args.work / f"out-mergekit-{method}")
            row.update(max_abs_diff=worst, differing_entries=differing, entries=total)
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
                  f"max |mergesweep - mergekit| = {r['max_abs_diff']:.2e} "
                  f"({r['differing_entries']} of {r['entries']} entries differ)")
    print(f"\n(os.cpu_count() = {os.cpu_count()}, OMP_NUM_THREADS = {args.threads or os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average {os.getloadavg()[0]:.1f} at the end; best of {args.repeats} runs per tool)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
