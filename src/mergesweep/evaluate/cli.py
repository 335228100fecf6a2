"""``mergesweep evaluate``: one model on one suite, through lm-eval, to a fixed-path JSON.

Exit status (docs/evaluate.md): 0 when the JSON was written, whether the suite scored
(``status: ok``) or the model/task failed after loading (``status: error``; 1 with
``--fail-on-error``); 1 with a one-line message and no JSON when the evaluation could not run
(missing or unloadable model, bad argument, out of memory, CUDA, missing module), so the workflow
retries it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="HF checkpoint directory")
    p.add_argument("--suite", required=True)
    p.add_argument("--tasks-dir", type=Path, help="directory holding the suite's task YAMLs")
    p.add_argument("--lm-eval-tasks", nargs="*", help="real lm-eval task names (registered suites)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--batch-size", default="16", help="a positive integer, 'auto' or 'auto:N'")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", help="float32, float16, bfloat16 or auto")
    p.add_argument("--limit", type=int)
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--log-samples", action="store_true")
    p.add_argument("--apply-chat-template", action="store_true")
    p.add_argument("--confirm-run-unsafe-code", action="store_true",
                   help="allow tasks that execute model-written code (mbpp_plus, humaneval_plus)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--fail-on-error", action="store_true",
                   help="exit 1 when the suite failed after the model loaded (default: record it, exit 0)")


def run(args: argparse.Namespace) -> int:
    from mergesweep.evaluate.runner import EvaluationError, evaluate, parse_batch_size

    bs = parse_batch_size(args.batch_size)
    if args.threads is not None:
        if args.threads < 1:
            raise EvaluationError(f"--threads {args.threads}: must be 1 or more")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # lm-eval bootstraps stderrs in a forked multiprocessing pool; forking a process that runs
    # torch threads can deadlock (seen here: 2 of ~40 evaluations hung for good under load), and
    # the bootstrap of a small suite takes well under a second in one process
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    os.environ.setdefault("LMEVAL_DISABLE_MULTIPROC", "1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        rec = evaluate(
            args.model, args.suite, args.tasks_dir, args.out,
            batch_size=bs, device=args.device, dtype=args.dtype, limit=args.limit,
            log_samples=args.log_samples, num_fewshot=args.num_fewshot,
            apply_chat_template=args.apply_chat_template, extra_tasks=args.lm_eval_tasks,
            confirm_run_unsafe_code=args.confirm_run_unsafe_code,
        )
    except EvaluationError:
        # lm-eval's progress bars end in a carriage return: start the error on a line of its own
        sys.stderr.write("\n")
        sys.stderr.flush()
        raise
    return 1 if (args.fail_on_error and rec["status"] != "ok") else 0
