"""``mergesweep pretrain``: build a tiny Llama base from a config and pretrain it for a few
seconds on the skill data (tests and the tiny preset)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from mergesweep.zoo.cli_finetune import add_device_arguments

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dirs", nargs="+", required=True, type=Path, help="suite data dirs (train.jsonl each)")
    p.add_argument("--name", required=True)
    p.add_argument("--uid", help="the uid of the base's definition in the plan (recorded for merge ids)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--tokenizer-from", type=Path, help="reuse this checkpoint's tokenizer (same vocabulary across seeds)")
    p.add_argument("--threads", type=int)
    add_device_arguments(p)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from mergesweep.record import ModelRecord
    from mergesweep.zoo.cli_finetune import save_model, training_device
    from mergesweep.zoo.tiny import read_records, tiny_llama_config, train_tokenizer
    from mergesweep.zoo.train import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    device, autocast, hw = training_device(args)
    t0 = time.time()
    records = read_records(args.data_dirs)
    if args.tokenizer_from:
        tok = AutoTokenizer.from_pretrained(args.tokenizer_from)
    else:
        tok = train_tokenizer([r["prompt"] + r["target"] for r in records], vocab_size=args.vocab_size)
    cfg = tiny_llama_config(len(tok), hidden=args.hidden, layers=args.layers, heads=args.heads,
                            kv_heads=args.kv_heads, intermediate=args.intermediate,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg)  # initialised on the CPU from the seed whatever the device: same init everywhere
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=10, seed=args.seed,
                       freeze_embeddings=False, loss_on="all")
    summary = train(model, tok, records, tcfg, desc=f"pretrain {args.name}", device=device, autocast=autocast)
    record = ModelRecord(
        model_id=args.name, role="base", stage="pretrain", uid=args.uid,
        source={"type": "tiny", "seed": args.seed, "data": [str(d) for d in args.data_dirs],
                "config": cfg.to_diff_dict()},
        runtime_s=round(time.time() - t0, 2), extra={"train": summary, "compute": hw},
    )
    save_model(model, tok, args.out, record)
    log.info("tiny base %s written to %s", args.name, args.out)
    return 0
