"""``mergesweep finetune``: fine-tune an expert from a base checkpoint on one skill's train split.

Full fine-tuning of every transformer weight with the embeddings frozen (see ``zoo.train``); the
result is a dense HF checkpoint with ``mergesweep.json`` (role ``expert``, its ``domain``, the
recipe and the training summary).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from mergesweep.atomic import atomic_dir
from mergesweep.errors import ConfigError
from mergesweep.record import ModelRecord, peak_rss_mb, read_record, write_record

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, type=Path, help="base checkpoint directory")
    p.add_argument("--data", required=True, type=Path, help="train.jsonl of the skill")
    p.add_argument("--domain", required=True, help="the skill / suite this expert is for")
    p.add_argument("--name", required=True, help="expert name (its model id)")
    p.add_argument("--uid", help="the uid of the expert's definition in the plan (recorded for merge ids)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-embeddings", action="store_true", help="also train the (tied) embeddings")
    p.add_argument("--threads", type=int)
    add_device_arguments(p)


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--precision`` of the training commands (finetune, pretrain)."""
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when this process was given a GPU, else CPU), cpu, cuda, cuda:N or mps "
                        "(default: auto). The device never changes the model's id")
    p.add_argument("--precision", default="auto",
                   help="auto (bf16 autocast on a CUDA device that supports it, else fp32), fp32 or bf16 "
                        "(default: auto); weights are saved in float32 either way")


def training_device(args: argparse.Namespace) -> tuple[str, object, dict]:
    """``(device, autocast dtype or None, record entry)`` for ``--device``/``--precision``
    (DeviceError naming the option when this machine lacks the device)."""
    from mergesweep.devices import autocast_dtype, device_summary, precision_name, resolve_device

    device = resolve_device(args.device, "--device")
    autocast = autocast_dtype(device, args.precision, "--precision")
    entry = {"device": device, "requested_device": args.device, "precision": precision_name(autocast),
             "requested_precision": args.precision, "hardware": device_summary(device)}
    log.info("training on %s, %s", entry["hardware"], entry["precision"])
    return device, autocast, entry


def load_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        raise ConfigError(f"{path}: not a checkpoint directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def save_model(model, tok, out: Path, record: ModelRecord, dtype=None) -> ModelRecord:
    """Save as safetensors into ``out`` atomically, with its model record (whose fingerprint is
    this checkpoint's own, computed from the files just written)."""
    with atomic_dir(out) as tmp:
        if dtype is not None:
            model = model.to(dtype)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        record.peak_rss_mb = peak_rss_mb()
        return write_record(tmp, record)


def run(args: argparse.Namespace) -> int:
    import torch

    from mergesweep.zoo.train import TrainConfig, read_jsonl, train

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data.exists():
        raise ConfigError(f"{args.data}: training data not found")
    device, autocast, hw = training_device(args)
    t0 = time.time()
    model, tok = load_model(args.base)
    base_rec = read_record(args.base, required=False)
    stored_dtype = getattr(torch, str(model.config.to_dict().get("dtype") or "float32").replace("torch.", ""), torch.float32)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                      seed=args.seed, freeze_embeddings=not args.train_embeddings)
    summary = train(model, tok, read_jsonl(args.data), cfg, desc=f"finetune {args.name}", device=device,
                    autocast=autocast)
    record = ModelRecord(
        model_id=args.name, role="expert", stage="finetune", uid=args.uid, domain=args.domain,
        base=base_rec.model_id if base_rec else args.base.name,
        source={"type": "finetune", "base": str(args.base), "base_uid": base_rec.uid if base_rec else None,
                "base_fingerprint": base_rec.fingerprint if base_rec else None, "data": str(args.data),
                "recipe": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                           "warmup": args.warmup, "seed": args.seed, "train_embeddings": args.train_embeddings}},
        runtime_s=round(time.time() - t0, 2), extra={"train": summary, "compute": hw},
    )
    save_model(model, tok, args.out, record, dtype=stored_dtype)
    log.info("expert %s written to %s", args.name, args.out)
    return 0
