"""``mergesweep lmc``: loss along the linear path between two models, before/after alignment.

    mergesweep lmc --model-a DIR --model-b DIR [--perm FILE] --data FILE.jsonl --points 11
                   --out FILE.json [--plot FILE.png]

``--perm`` maps model B onto model A (``mergesweep align --model B --reference A``). The JSON has
``alphas``, ``loss``, ``barrier`` and, with ``--perm``, ``loss_aligned`` and ``barrier_aligned``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-a", required=True, type=Path, help="first endpoint (its basis is kept)")
    p.add_argument("--model-b", required=True, type=Path, help="second endpoint")
    p.add_argument("--perm", type=Path, help="permutation map of model B onto model A (from mergesweep align)")
    p.add_argument("--data", required=True, type=Path, help="held-out jsonl ('text' or 'prompt'+'target')")
    p.add_argument("--points", type=int, default=11, help="interpolation points, endpoints included")
    p.add_argument("--out", required=True, type=Path, help="result JSON")
    p.add_argument("--plot", type=Path, help="also write the loss curves as a PNG")
    p.add_argument("--max-examples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    import torch

    from mergesweep.align.lmc import linear_mode_connectivity, plot_curves
    from mergesweep.align.pipeline import _versions
    from mergesweep.atomic import write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res = linear_mode_connectivity(
        args.model_a, args.model_b, args.data, perm=args.perm, points=args.points,
        max_examples=args.max_examples, batch_size=args.batch_size, max_length=args.max_length,
    )
    res["versions"] = _versions()
    write_json(args.out, res)
    if args.plot:
        plot_curves(res, args.plot)
    return 0
