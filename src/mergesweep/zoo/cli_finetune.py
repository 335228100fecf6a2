"""``mergesweep finetune``: fine-tune an expert from a base checkpoint on one skill's train split.

Full fine-tuning of every transformer weight with the embeddings frozen (see ``zoo.train``); the
result is a dense HF checkpoint with ``mergesweep.json`` (role ``expert``, its ``domain``, the
recipe and the training summary).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from pathlib import Path

from mergesweep.atomic import atomic_dir, write_json
from mergesweep.errors import ConfigError

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, type=Path, help="base checkpoint directory")
    p.add_argument("--data", required=True, type=Path, help="train.jsonl of the skill")
    p.add_argument("--domain", required=True, help="the skill / suite this expert is for")
    p.add_argument("--name", required=True, help="expert name (its model id)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-embeddings", action="store_true", help="also train the (tied) embeddings")
    p.add_argument("--threads", type=int)


def load_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        raise ConfigError(f"{path}: not a checkpoint directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def save_model(model, tok, out: Path, meta: dict, dtype=None) -> None:
    """Save as safetensors into ``out`` atomically, with ``mergesweep.json``."""
    with atomic_dir(out) as tmp:
        if dtype is not None:
            model = model.to(dtype)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(tmp / "mergesweep.json", meta)


def run(args: argparse.Namespace) -> int:
    import torch

    from mergesweep.checkpoints.layout import checkpoint_fingerprint
    from mergesweep.zoo.train import TrainConfig, read_jsonl, train

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data.exists():
        raise ConfigError(f"{args.data}: training data not found")
    t0 = time.time()
    model, tok = load_model(args.base)
    base_meta_path = args.base / "mergesweep.json"
    base_meta = json.loads(base_meta_path.read_text()) if base_meta_path.exists() else {}
    stored_dtype = getattr(torch, str(model.config.to_dict().get("dtype") or "float32").replace("torch.", ""), torch.float32)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                      seed=args.seed, freeze_embeddings=not args.train_embeddings)
    summary = train(model, tok, read_jsonl(args.data), cfg, desc=f"finetune {args.name}")
    meta = {
        "model_id": args.name,
        "role": "expert",
        "domain": args.domain,
        "method": None,
        "params": None,
        "base": base_meta.get("model_id", args.base.name),
        "experts": [],
        "source": {"type": "finetune", "base": str(args.base), "data": str(args.data)},
        "base_fingerprint": checkpoint_fingerprint(args.base),
        "train": summary,
        "runtime_s": round(time.time() - t0, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "versions": {"torch": torch.__version__},
    }
    save_model(model, tok, args.out, meta, dtype=stored_dtype)
    log.info("expert %s written to %s", args.name, args.out)
    return 0
