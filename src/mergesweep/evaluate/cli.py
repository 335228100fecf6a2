"""``mergesweep evaluate``: one model on one suite, through lm-eval, to a fixed-path JSON."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="HF checkpoint directory")
    p.add_argument("--suite", required=True)
    p.add_argument("--tasks-dir", type=Path, help="directory holding the suite's task YAMLs")
    p.add_argument("--lm-eval-tasks", nargs="*", help="real lm-eval task names (registered suites)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--batch-size", default="16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--limit", type=int)
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--log-samples", action="store_true")
    p.add_argument("--apply-chat-template", action="store_true")
    p.add_argument("--confirm-run-unsafe-code", action="store_true",
                   help="allow tasks that execute model-written code (mbpp_plus, humaneval_plus)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores / SLURM allocation)")
    p.add_argument("--fail-on-error", action="store_true", help="exit 1 when the suite fails (default: record and go on)")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mergesweep.evaluate.runner import evaluate

    bs = int(args.batch_size) if str(args.batch_size).isdigit() else args.batch_size
    rec = evaluate(
        args.model, args.suite, args.tasks_dir or Path("."), args.out,
        batch_size=bs, device=args.device, dtype=args.dtype, limit=args.limit,
        log_samples=args.log_samples, num_fewshot=args.num_fewshot,
        apply_chat_template=args.apply_chat_template, extra_tasks=args.lm_eval_tasks,
        confirm_run_unsafe_code=args.confirm_run_unsafe_code,
    )
    return 1 if (args.fail_on_error and rec["status"] != "ok") else 0
