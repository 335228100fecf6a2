"""Benchmark: the ``stats`` passes on SmolLM2-135M against one plain forward pass (the floor).

    .venv/bin/python benchmarks/bench_stats.py [--checkpoint DIR] [--examples 32] [--max-length 256]
                                               [--batch-size 8] [--threads 1] [--device cpu]
                                               [--passes forward gram fisher] [--out FILE.json]

Each pass runs in its own fresh process (so each peak RSS is that pass's own) over the same
calibration batches — deterministic synthetic English-like text (:func:`mergesweep.align.toy.
synthetic_texts`, sentences joined until each example reaches ``--max-length`` tokens), tokenized
and right-padded as ``mergesweep stats`` does:

* ``forward`` — ``model(input_ids, attention_mask)`` over every batch, no gradients: the floor
  of a statistics pass;
* ``gram``    — :func:`mergesweep.stats.collect.collect_stats` with ``gram`` (block by block,
  streamed to a safetensors file in a temporary directory); the peak RSS is also taken after
  each decoder block of its last run;
* ``fisher``  — the same with ``fisher`` (one forward + backward per example).

Printed per pass: wall seconds (the fastest of ``--repeat`` runs in the same process), the
ratio to the forward pass, the peak RSS during the pass (reset after loading and a warm-up, via
``/proc/self/clear_refs``, where Linux allows) and the RSS after loading the model and the
batches. For ``gram`` also: an estimate of its working set (model + cached hidden states + one
block's statistics, float64 accumulators and float32 copies, + one batch's activations; allocator
slack and transients come on top) and the peak RSS after each decoder block, which must stay flat
after the first blocks. Targets (issue 12): gram within 2x of the forward pass; gram's peak RSS
bounded by one layer's statistics plus the model (and the cached hidden states). Batches of a few
hundred tokens pay a per-batch cost of order ``in²`` per linear layer that larger batches amortise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO / "resources" / "checkpoints" / "smollm2-135m-instruct"


def rss_mb() -> float:
    """Current resident memory of this process, MB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0), so the peak
    measured afterwards is the pass's own, not loading's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """Peak RSS since :func:`reset_peak` (VmHWM), else since the start (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def calibration_texts(tok, n: int, max_length: int, seed: int = 0) -> list[str]:
    from mergesweep.align.toy import synthetic_texts

    sentences = iter(synthetic_texts(n * 200, seed=seed, skill="mixed"))
    out = []
    for _ in range(n):
        parts: list[str] = []
        while len(tok(" ".join(parts))["input_ids"]) < max_length:
            parts.append(next(sentences))
        out.append(" ".join(parts))
    return out


def one_pass(args) -> dict:
    """Run one pass in this process and return its numbers."""
    import torch

    torch.set_num_threads(args.threads)
    from mergesweep.align.data import load_causal_lm, load_tokenizer, tokenize_batches
    from mergesweep.stats.blocks import BlockRunner
    from mergesweep.stats.collect import block_linears, collect_stats

    tok = load_tokenizer(args.checkpoint)
    texts = calibration_texts(tok, args.examples, args.max_length)
    batches = tokenize_batches(tok, texts, batch_size=args.batch_size, max_length=args.max_length)
    model = load_causal_lm(args.checkpoint).to(args.device)
    n_layers = model.config.num_hidden_layers
    batches = [(i.to(args.device), m.to(args.device)) for i, m in batches]
    import gc

    with torch.no_grad():  # fault in every weight (safetensors are mapped lazily): RSS now holds the model
        for prm in model.parameters():
            prm.sum()
    # warm-up on one 8-token example: the code paths (libraries' pages, kernels' workspaces) are
    # loaded before the baseline, so the peak measured next is the pass's data
    tiny = [(batches[0][0][:1, :8], batches[0][1][:1, :8])]
    with tempfile.TemporaryDirectory() as tmp:
        if args.one_pass == "forward":
            with torch.no_grad():
                model(input_ids=tiny[0][0], attention_mask=tiny[0][1])
        else:
            collect_stats(model, tiny, [args.one_pass], Path(tmp) / "stats.safetensors", progress=False)
    gc.collect()
    rss_loaded = rss_mb()
    peak_reset = reset_peak()
    cfg = model.config
    tokens = sum(int(m.sum()) for _, m in batches)
    padded = sum(int(i.numel()) for i, _ in batches)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    runner = BlockRunner(model)
    block_stats_mb = sum(n * n * (8 + 4) for _, n in block_linears(runner, 0)) / 2**20
    hidden_mb = padded * cfg.hidden_size * 4 / 2**20
    # one batch through one block: the MLP's intermediate activations dominate (a few live copies)
    widest = max(int(i.shape[0] * i.shape[1]) for i, _ in batches)
    widest_b = max(int(i.shape[0]) for i, _ in batches)
    widest_t = max(int(i.shape[1]) for i, _ in batches)
    batch_act_mb = (widest * (4 * cfg.intermediate_size + 6 * cfg.hidden_size)
                    + 3 * widest_b * cfg.num_attention_heads * widest_t**2) * 4 / 2**20  # + attention scores

    sync = (lambda: torch.cuda.synchronize()) if str(args.device).startswith("cuda") else (lambda: None)
    # the peak after each decoder block (gram): wrap the runner's block call, count batches
    block_peaks: list[float] = []
    if args.one_pass == "gram":
        from mergesweep.stats import collect as collect_mod

        run_block, per_block = collect_mod.BlockRunner.run_block, len(batches)
        calls = [0]

        def timed_block(self, i, hidden, layer=None):
            out = run_block(self, i, hidden, layer)
            calls[0] += 1
            if calls[0] % per_block == 0:
                block_peaks.append(round(peak_mb(), 1))
            return out

        collect_mod.BlockRunner.run_block = timed_block
    times = []
    for _ in range(args.repeat):
        block_peaks.clear()
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            if args.one_pass == "forward":
                with torch.no_grad():
                    for ids, mask in batches:
                        model(input_ids=ids, attention_mask=mask)
            else:
                collect_stats(model, batches, [args.one_pass], Path(tmp) / "stats.safetensors", progress=False)
            sync()
            times.append(time.perf_counter() - t0)
            file_mb = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 2**20
    seconds = min(times)
    return {
        "pass": args.one_pass, "seconds": round(seconds, 2), "peak_rss_mb": round(peak_mb(), 1), "peak_is_pass_only": peak_reset,
        "rss_after_load_mb": round(rss_loaded, 1), "model_mb": round(model_mb, 1),
        "hidden_cache_mb": round(hidden_mb, 1), "one_block_stats_mb": round(block_stats_mb, 1),
        "one_batch_activations_mb": round(batch_act_mb, 1), "output_mb": round(file_mb, 1),
        "examples": sum(int(i.shape[0]) for i, _ in batches), "tokens": tokens, "padded_tokens": padded,
        "layers": n_layers, "peak_after_block_mb": block_peaks, "all_seconds": [round(t, 2) for t in times], "threads": args.threads, "device": args.device,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=Path(os.environ.get("MERGESWEEP_SMOLLM2_DIR", DEFAULT_CHECKPOINT)))
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=2, help="runs of each pass in its process; the fastest counts")
    p.add_argument("--device", default="cpu")
    p.add_argument("--passes", nargs="+", default=["forward", "gram", "fisher"],
                   choices=["forward", "gram", "fisher", "fisher_model"])
    p.add_argument("--out", type=Path, help="also write the numbers as JSON")
    p.add_argument("--one-pass", help=argparse.SUPPRESS)  # internal: run one pass in this process
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one_pass:
        print(json.dumps(one_pass(args)))
        return 0
    if not (args.checkpoint / "config.json").is_file():
        print(f"bench_stats: {args.checkpoint}: no checkpoint (pass --checkpoint)", file=sys.stderr)
        return 2
    results = {}
    passes = ["forward"] + [x for x in args.passes if x != "forward"]
    for name in passes:
        cmd = [sys.executable, __file__, "--checkpoint", str(args.checkpoint), "--examples", str(args.examples),
               "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--device", args.device, "--repeat", str(args.repeat),
               "--one-pass", name]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    floor = results["forward"]["seconds"]
    f = results["forward"]
    print(f"SmolLM2-135M stats passes: {f['examples']} examples, {f['tokens']} real tokens "
          f"({f['padded_tokens']} padded), batch {args.batch_size}, {args.threads} thread(s), {args.device}")
    print(f"{'pass':<13}{'seconds':>9}{'x forward':>11}{'peak RSS MB':>13}{'RSS loaded MB':>15}")
    for name, r in results.items():
        r["ratio_to_forward"] = round(r["seconds"] / floor, 2) if floor > 0 else None
        print(f"{name:<13}{r['seconds']:>9.2f}{r['ratio_to_forward']:>11.2f}{r['peak_rss_mb']:>13.1f}"
              f"{r['rss_after_load_mb']:>15.1f}")
    if "gram" in results:
        g = results["gram"]
        bound = g["rss_after_load_mb"] + g["hidden_cache_mb"] + g["one_block_stats_mb"] + g["one_batch_activations_mb"]
        g["rss_estimate_mb"] = round(bound, 1)
        print(f"gram: model {g['model_mb']} MB, cached hidden states {g['hidden_cache_mb']} MB, one block's statistics "
              f"{g['one_block_stats_mb']} MB, one batch's activations {g['one_batch_activations_mb']} MB")
        print(f"gram: peak RSS {g['peak_rss_mb']} MB vs estimate (RSS after load + hidden + one block + one batch) "
              f"{g['rss_estimate_mb']} MB; all layers' statistics would be {g['one_block_stats_mb'] * g['layers']:.0f} MB; "
              f"forward pass peak {f['peak_rss_mb']} MB")
        pk = g["peak_after_block_mb"]
        if pk:
            print(f"gram: peak RSS after block 1: {pk[0]} MB, after block 2: {pk[1]} MB, after block {len(pk)}: "
                  f"{pk[-1]} MB ({pk[-1] - pk[1]:+.1f} MB over blocks 3..{len(pk)}; their statistics, if held, "
                  f"would add {g['one_block_stats_mb'] * (len(pk) - 2):.0f} MB)")
        print(f"gram: {g['ratio_to_forward']}x the forward pass (target <= 2x)")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
