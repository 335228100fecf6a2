"""``mergesweep lora-extract``: a LoRA adapter from a dense expert (truncated SVD of its task
vector per linear weight; RMM's post-training SVD compression) - :mod:`mergesweep.lora.extract`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from mergesweep.lora.extract import DEFAULT_MODULES, SPLITS, SVDS

    p.add_argument("--base", required=True, type=Path, help="the base checkpoint the expert was fine-tuned from")
    p.add_argument("--expert", required=True, type=Path, help="the dense expert checkpoint (or an adapter over --base)")
    p.add_argument("--rank", required=True, type=int, help="LoRA rank R (capped at min(out, in) per weight)")
    p.add_argument("--out", required=True, type=Path, help="the adapter directory to write (atomically)")
    p.add_argument("--modules", nargs="+", default=list(DEFAULT_MODULES), metavar="NAME",
                   help=f"linear layers to adapt, by short name (default: {' '.join(DEFAULT_MODULES)})")
    p.add_argument("--split", choices=SPLITS, default="singular",
                   help="singular: B = U·S, A = Vᵀ (default); sqrt: B = U·√S, A = √S·Vᵀ")
    p.add_argument("--svd", choices=SVDS, default="exact",
                   help="exact: torch.linalg.svd (default); lowrank: randomised torch.svd_lowrank (approximate)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--name", help="the model id recorded (default: the output directory's name)")
    p.add_argument("--domain", help="the expert's domain (default: the one the expert's record gives)")
    p.add_argument("--uid", help="the uid of the adapter's definition in the plan (recorded for merge ids)")


def run(args: argparse.Namespace) -> int:
    from mergesweep.lora.extract import extract_lora

    rec = extract_lora(args.base, args.expert, args.out, rank=args.rank, modules=args.modules, split=args.split,
                       svd=args.svd, name=args.name, domain=args.domain or None, uid=args.uid or None,
                       device=args.device)
    ex = rec.extra["extraction"]
    print(json.dumps({"model_id": rec.model_id, "fingerprint": rec.fingerprint, "modules": rec.extra["adapter"]["modules"],
                      "relative_error": ex["relative_error"], "outside_norm": ex["outside_norm"]}))
    return 0
