"""``mergesweep merge --config FILE.yaml --out DIR``: one merge, outside any workflow."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="merge YAML (method, base, experts, params, ...)")
    parser.add_argument("--out", required=True, help="output checkpoint directory (written atomically)")
    parser.add_argument("--device", default=None, help="override the YAML's device (cpu, cuda)")
    parser.add_argument("--dtype", default=None, help="override the YAML's output dtype")
    parser.add_argument("--model-id", default=None, help="model id to record (default: derived from the inputs)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for the merge (default: torch's; 1 is often fastest on a busy CPU)")


def run(args: argparse.Namespace) -> int:
    from mergesweep.merge.config import load_merge_yaml
    from mergesweep.merge.engine import merge_checkpoints

    cfg = load_merge_yaml(args.config)
    meta = merge_checkpoints(
        cfg["method"],
        cfg["base"],
        cfg["experts"],
        cfg["params"],
        args.out,
        dtype=args.dtype or cfg["dtype"],
        device=args.device or cfg["device"],
        shard_size=cfg["shard_size"],
        align=cfg["align"],
        vocab_policy=cfg["vocab_policy"],
        expert_names=cfg["expert_names"],
        extra_meta={"model_id": args.model_id} if args.model_id else None,
        threads=args.threads,
    )
    print(json.dumps({k: meta[k] for k in ("model_id", "method", "params", "runtime_s", "peak_rss_mb")}))
    return 0
