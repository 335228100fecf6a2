"""``mergesweep align``: permutation-align a model onto a reference, write the map atomically.

    mergesweep align --model DIR --reference DIR --method weight_matching --out FILE.safetensors
                     [--seed N] [--data FILE.jsonl] [--summary FILE.json]

The map is a safetensors file of int64 gather indices with the JSON report (iterations,
objective before/after, identity fraction per permutation group) in its header; ``--summary``
also writes that report as a JSON file for tables.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mergesweep.align.pipeline import METHODS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="checkpoint to permute (e.g. an expert)")
    p.add_argument("--reference", required=True, type=Path, help="checkpoint whose basis is kept (e.g. the base)")
    p.add_argument("--method", default="weight_matching", choices=METHODS)
    p.add_argument("--out", required=True, type=Path, help="permutation map (.safetensors)")
    p.add_argument("--summary", type=Path, help="also write the map's report as JSON")
    p.add_argument("--uid", help="the align job's uid in the plan, recorded in the map (merge ids hash it)")
    p.add_argument("--seed", type=int, default=0, help="order of the coordinate-descent steps")
    p.add_argument("--data", type=Path, help="jsonl ('text' or 'prompt'+'target'); activation_matching")
    p.add_argument("--max-iter", type=int, default=100, help="weight matching: at most this many sweeps")
    p.add_argument("--num-batches", type=int, default=4, help="activation matching: batches of data")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128, help="tokens per sequence")
    p.add_argument("--threads", type=int,
                   help="torch threads for the search (default: 1 for weight_matching, torch's choice otherwise)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from mergesweep.align.pipeline import align_checkpoints, summary
    from mergesweep.atomic import write_json

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pm = align_checkpoints(
        args.model, args.reference, args.method, seed=args.seed, data=args.data, max_iter=args.max_iter,
        num_batches=args.num_batches, batch_size=args.batch_size, max_length=args.max_length,
        progress=not args.no_progress, threads=args.threads,
    )
    if args.uid:
        pm.meta["uid"] = args.uid
    pm.save(args.out)
    if args.summary:
        write_json(args.summary, summary(pm) | {"perm": str(args.out)})
    return 0
