"""``mergesweep evaluate``: one model on one or more suites, through lm-eval, to fixed-path JSONs.

Two ways to name the suites:

* ``--spec SPEC.json [--suites A B] --out A.json B.json``: the workflow's way. The spec (written
  from the plan, docs/evaluate.md) lists every suite and the evaluation options; the model is
  loaded once and each suite (all of them, or those named by ``--suites``) is written to the
  ``--out`` path in the same position.
* ``--suite NAME (--tasks-dir DIR | --lm-eval-tasks T ...) --out NAME.json``: one suite by hand.

A ``--model`` that is a PEFT LoRA adapter is evaluated over ``--base`` (the dense base it was
trained on) with lm-eval's ``peft=``, without a dense copy; the workflow always passes the plan's
base, which a dense ``--model`` ignores.

Exit status (docs/evaluate.md): 0 when every JSON was written, whether the suite scored
(``status: ok``) or the model/task failed after loading (``status: error``; 1 with
``--fail-on-error``); 1 with a one-line message when the evaluation could not run (missing or
unloadable model, bad argument, out of memory, CUDA, missing module), so the workflow retries it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path,
                   help="HF checkpoint directory, or a PEFT LoRA adapter directory (then --base is needed)")
    p.add_argument("--base", type=Path,
                   help="the dense base a LoRA adapter --model is evaluated over (lm-eval's peft=); "
                        "ignored for a dense --model")
    p.add_argument("--spec", type=Path, help="evaluation spec (suites and options) written by the workflow")
    p.add_argument("--suites", nargs="+", help="with --spec: only these suites, in this order (default: all)")
    p.add_argument("--suite", help="one suite by hand (instead of --spec)")
    p.add_argument("--tasks-dir", type=Path, help="directory holding the suite's task YAMLs")
    p.add_argument("--lm-eval-tasks", nargs="*", help="real lm-eval task names (registered suites)")
    p.add_argument("--include-path", dest="include_paths", nargs="+", type=str,
                   help="directories of your own lm-eval task YAMLs (default: the spec's include_paths)")
    p.add_argument("--out", required=True, type=Path, nargs="+", help="one result JSON per suite, in order")
    p.add_argument("--batch-size", help="a positive integer, 'auto' or 'auto:N' (default 16)")
    p.add_argument("--device", help="auto (default: CUDA when this job was given a GPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", help="float32 (default), float16, bfloat16 or auto")
    p.add_argument("--backend", help="hf (default: lm-eval's Hugging Face backend) or vllm (GPU; the [vllm] extra)")
    p.add_argument("--limit", type=int)
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--log-samples", action="store_true", default=None)
    p.add_argument("--apply-chat-template", action="store_true", default=None)
    p.add_argument("--confirm-run-unsafe-code", action="store_true",
                   help="allow tasks that execute model-written code (mbpp_plus, humaneval_plus)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--fail-on-error", action="store_true",
                   help="exit 1 when a suite failed after the model loaded (default: record it, exit 0)")


def _suites(args: argparse.Namespace):
    """(suites to run, options) from --spec or from the one-suite flags; errors name the flag."""
    from mergesweep.evaluate.runner import SPEC_OPTIONS, EvaluationError, SuiteRun, read_spec

    if args.spec is not None:
        if args.suite or args.tasks_dir or args.lm_eval_tasks or args.num_fewshot is not None:
            raise EvaluationError("--spec names the suites: do not combine it with --suite, --tasks-dir, "
                                  "--lm-eval-tasks or --num-fewshot")
        runs, options = read_spec(args.spec)
        if args.suites:
            by_name = {r.name: r for r in runs}
            missing = [s for s in args.suites if s not in by_name]
            if missing:
                raise EvaluationError(f"--suites: {', '.join(missing)} not in {args.spec} "
                                      f"(it has {', '.join(by_name)})")
            runs = [by_name[s] for s in args.suites]
    else:
        if not args.suite:
            raise EvaluationError("give --spec (the workflow's suites) or --suite with --tasks-dir/--lm-eval-tasks")
        if args.suites:
            raise EvaluationError("--suites selects suites of a --spec")
        runs = [SuiteRun(args.suite, args.tasks_dir, tuple(args.lm_eval_tasks or ()), args.num_fewshot,
                         bool(args.confirm_run_unsafe_code))]
        options = dict(SPEC_OPTIONS)
    # command-line options win over the spec's
    for key in ("batch_size", "device", "dtype", "limit", "log_samples", "apply_chat_template", "backend",
                "include_paths"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    return runs, options


def run(args: argparse.Namespace) -> int:
    from mergesweep.evaluate.runner import EvaluationError, evaluate_suites

    if args.threads is not None and args.threads < 1:
        raise EvaluationError(f"--threads {args.threads}: must be 1 or more")
    runs, options = _suites(args)
    if len(args.out) != len(runs):
        raise EvaluationError(f"{len(runs)} suite(s) ({', '.join(r.name for r in runs)}) but {len(args.out)} "
                              "--out path(s): give one output per suite, in the same order")
    # the compute jobs run offline: the datasets were fetched before them (`mergesweep
    # prefetch-datasets`, the workflow's rule prefetch_datasets) into the HF datasets cache
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
        recs = evaluate_suites(args.model, runs, args.out, base=args.base, **options)
    except EvaluationError:
        # lm-eval's progress bars end in a carriage return: start the error on a line of its own
        sys.stderr.write("\n")
        sys.stderr.flush()
        raise
    failed = [r["suite"] for r in recs if r["status"] != "ok"]
    if failed:
        print(f"evaluate: {len(failed)} of {len(recs)} suite(s) failed after the model loaded: {', '.join(failed)} "
              "(recorded as status error)", file=sys.stderr)
    return 1 if (args.fail_on_error and failed) else 0
