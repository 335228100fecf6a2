"""``mergesweep stats``: the statistics a data-aware merge reads, for one model and calibration set.

    mergesweep stats --model DIR --data FILE.jsonl --kind gram [--kind fisher ...] --uid STATS_ID
                     --out DIR [--examples N] [--max-length L] [--batch-size B] [--device auto]
                     [--threads T] [--seed S] [--no-progress]

Writes ``DIR/stats.safetensors`` and ``DIR/stats.json`` atomically (:mod:`mergesweep.stats.io`;
what each kind is: :mod:`mergesweep.stats.collect`). The calibration data are the first
``--examples`` records of the jsonl (``text``, or ``prompt`` + ``target`` concatenated),
tokenized with the model's tokenizer, truncated to ``--max-length`` tokens and right-padded in
batches of ``--batch-size``; records of fewer than 2 tokens are dropped.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from mergesweep.merge.settings import CALIBRATION_DEFAULTS
from mergesweep.stats.io import KINDS

log = logging.getLogger(__name__)

#: torch intra-op threads on CPU unless --threads says otherwise (as ``mergesweep merge``)
DEFAULT_CPU_THREADS = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="checkpoint directory (HF layout) the statistics are of")
    p.add_argument("--data", required=True, type=Path, help="calibration jsonl ('text' or 'prompt'+'target' records)")
    p.add_argument("--kind", action="append", required=True, metavar="KIND",
                   help=f"statistics to compute, repeatable: {', '.join(KINDS)}")
    p.add_argument("--uid", required=True, help="the stats job's id in the plan (recorded as stats_id)")
    p.add_argument("--out", required=True, type=Path, help="output directory (replaced atomically)")
    d = CALIBRATION_DEFAULTS  # the workflow's defaults too (its `stats` section)
    p.add_argument("--examples", type=int, default=d["examples"], help="use the first N records of --data")
    p.add_argument("--max-length", type=int, default=d["max_length"],
                   help="tokens per example (longer ones truncated)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="examples per forward pass (Gram pass)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--threads", type=int, help=f"torch intra-op threads (default on CPU: {DEFAULT_CPU_THREADS})")
    p.add_argument("--seed", type=int, default=0, help="fisher_model: seed of the sampled labels")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _positive(value, option: str) -> int:
    from mergesweep.errors import ConfigError

    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{option}: expected a positive integer, got {value!r}")
    return value


def check_args(args: argparse.Namespace) -> list[str]:
    """Validate every option before anything is loaded or written; returns the kinds in canonical order."""
    from mergesweep.errors import ConfigError, MergeError

    unknown = [k for k in args.kind if k not in KINDS]
    if unknown:
        raise ConfigError(f"--kind: unknown statistics kind {unknown[0]!r} (expected one of {', '.join(KINDS)})")
    for opt in ("examples", "max_length", "batch_size"):
        _positive(getattr(args, opt), "--" + opt.replace("_", "-"))
    if args.max_length < 2:
        raise ConfigError(f"--max-length: expected at least 2 tokens, got {args.max_length}")
    if args.threads is not None:
        _positive(args.threads, "--threads")
    if not str(args.uid).strip():
        raise ConfigError("--uid: empty stats id")
    if not args.model.is_dir():
        raise MergeError(f"--model: {args.model}: checkpoint directory not found")
    if not (args.model / "config.json").is_file():
        raise MergeError(f"--model: {args.model}: no config.json (not a Hugging Face checkpoint directory)")
    if not args.data.is_file():
        raise MergeError(f"--data: {args.data}: data file not found")
    if args.out.exists() and not args.out.is_dir():
        raise MergeError(f"--out: {args.out}: exists and is not a directory")
    return [k for k in KINDS if k in args.kind]


def run(args: argparse.Namespace) -> int:
    kinds = check_args(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from mergesweep.align.data import load_causal_lm, load_tokenizer, read_texts, tokenize_batches
    from mergesweep.align.spec import AlignError
    from mergesweep.atomic import atomic_dir, write_json
    from mergesweep.devices import device_info, resolve_device
    from mergesweep.errors import MergeError
    from mergesweep.merge.identity import checkpoint_uid
    from mergesweep.record import library_versions, peak_rss_mb, sha256_file
    from mergesweep.stats.collect import collect_stats
    from mergesweep.stats.io import FORMAT, RECORD_FILE, STATS_FILE

    device = resolve_device(args.device, "--device")
    threads = args.threads if args.threads is not None else (DEFAULT_CPU_THREADS if device == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        texts = read_texts(args.data, max_examples=args.examples)
    except AlignError as e:  # not found / empty / malformed: the message names the file
        raise MergeError(f"--data: {e}") from None
    model_uid = checkpoint_uid(args.model)
    tok = load_tokenizer(args.model)
    try:
        batches = tokenize_batches(tok, texts, batch_size=args.batch_size, max_length=args.max_length)
    except AlignError as e:
        raise MergeError(f"--data: {args.data}: {e}") from None
    model = load_causal_lm(args.model).to(device)
    examples = sum(int(ids.shape[0]) for ids, _ in batches)
    tokens = sum(int(m.sum()) for _, m in batches)
    log.info("stats %s of %s on %s: %d examples, %d tokens, %s", ",".join(kinds), args.model, device, examples,
             tokens, args.data)
    with atomic_dir(args.out) as tmp:
        info = collect_stats(model, batches, kinds, tmp / STATS_FILE, seed=args.seed, progress=not args.no_progress,
                             metadata={"format": FORMAT, "stats_id": args.uid, "model_uid": model_uid})
        record = {
            "format": FORMAT,
            "stats_id": args.uid,
            "model_uid": model_uid,
            "model": str(args.model),
            "kinds": kinds,
            "data": {
                "path": str(args.data),
                "sha256": sha256_file(args.data),
                "records": len(texts),
                "examples": examples,
                "tokens": tokens,
                **({"fisher_tokens": info["fisher"]["predicted_tokens"]} if "fisher" in info else {}),
            },
            "settings": {"examples": args.examples, "max_length": args.max_length, "batch_size": args.batch_size,
                         "seed": args.seed, "threads": threads,
                         "gram": "sum over real tokens of x x^T per decoder-block linear (float64 accumulation)",
                         "fisher": "squared gradient of each example's summed token log-likelihood, / predicted tokens"},
            "device": device_info(device),
            "runtime_s": round(time.perf_counter() - t0, 3),
            "peak_rss_mb": peak_rss_mb(),
            "versions": library_versions(),
        }
        write_json(tmp / RECORD_FILE, record)
    log.info("stats: wrote %s (%.1f s)", args.out, record["runtime_s"])
    return 0
