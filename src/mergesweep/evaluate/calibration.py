"""``mergesweep calibration-data``: an lm-eval suite's *validation* examples as calibration data.

Data-aware merges (the ``stats`` stage, whole-model merges) read each expert's own domain. For an
expert whose domain is an lm-eval suite, that is the suite's validation split, exactly as the
evaluation defines it (:func:`mergesweep.evaluate.splits.plan_splits`: the task's own validation
split, or the seeded slice of its evaluation split) - so calibration data never contains a test
example. Records are ``{"prompt": doc_to_text, "target": target_delimiter + answer}`` (for a
multiple-choice task the answer is the gold choice's text), taken round-robin over the suite's leaf
tasks (each in its split's order) up to ``--examples``, written atomically as JSONL.

    mergesweep calibration-data --spec results/evaluation.json --suite math --examples 64 \\
                                --out results/calibration/math.jsonl

Datasets come from the HF datasets cache (``mergesweep prefetch-datasets`` fills it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from mergesweep.errors import MergesweepError

log = logging.getLogger(__name__)


class CalibrationError(MergesweepError):
    """An lm-eval suite whose validation examples cannot be read (one line naming suite and task)."""


def _answer(task, doc) -> str:
    target = task.doc_to_target(doc)
    if isinstance(target, list):
        target = target[0] if target else ""
    if isinstance(target, int) and task.config.output_type == "multiple_choice":
        choices = task.doc_to_choice(doc)
        target = choices[target]
    return str(target)


def calibration_records(spec: str | os.PathLike, suite: str, examples: int) -> list[dict]:
    """Up to ``examples`` prompt/target records of ``suite``'s validation split (see module)."""
    from mergesweep.evaluate.runner import EvaluationError, build_tasks, lm_eval_task_manager, read_spec
    from mergesweep.evaluate.splits import leaf_tasks, plan_splits, use_split

    try:
        runs, options = read_spec(spec)
    except EvaluationError as e:
        raise CalibrationError(str(e)) from None
    run = next((r for r in runs if r.name == suite), None)
    if run is None or not run.lm_eval_tasks:
        raise CalibrationError(f"--suite: {suite!r} is not an lm-eval suite of {spec} "
                               f"(lm-eval suites: {', '.join(r.name for r in runs if r.lm_eval_tasks) or 'none'})")
    try:
        tm = lm_eval_task_manager(options.get("include_paths") or (), list(run.lm_eval_tasks), key=f"--spec {spec}")
        leaves = leaf_tasks(build_tasks(tm, list(run.lm_eval_tasks)))
    except Exception as e:
        raise CalibrationError(f"suite {suite}: cannot build its tasks ({type(e).__name__}: {e})") from None
    v = run.settings(options)["validation"]
    plans = {t.config.task: plan_splits(t, v["size"], v["seed"]) for t in leaves}
    per_task: list[list[dict]] = []
    with use_split(leaves, plans, "validation"):
        for t in leaves:
            delim = t.config.target_delimiter if t.config.target_delimiter is not None else " "
            recs = []
            for doc in t.eval_docs:
                try:
                    recs.append({"prompt": str(t.doc_to_text(doc)), "target": delim + _answer(t, doc),
                                 "task": t.config.task})
                except Exception as e:
                    raise CalibrationError(f"suite {suite}, task {t.config.task}: cannot render a validation "
                                           f"example ({type(e).__name__}: {e})") from None
            per_task.append(recs)
    out: list[dict] = []
    i = 0
    while len(out) < examples and any(i < len(r) for r in per_task):
        out.extend(r[i] for r in per_task if i < len(r))
        i += 1
    if not out:
        raise CalibrationError(f"suite {suite}: its validation split has no examples")
    return out[:examples]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from mergesweep.merge.settings import CALIBRATION_DEFAULTS

    p.add_argument("--spec", required=True, type=Path, help="the evaluation spec (results/evaluation.json)")
    p.add_argument("--suite", required=True, help="an lm-eval suite of the spec")
    p.add_argument("--examples", type=int, default=CALIBRATION_DEFAULTS["examples"], help="records to write")
    p.add_argument("--out", required=True, type=Path, help="the JSONL file to write")


def run(args: argparse.Namespace) -> int:
    from mergesweep.atomic import atomic_file

    if args.examples < 1:
        raise CalibrationError(f"--examples: expected a positive integer, got {args.examples}")
    recs = calibration_records(args.spec, args.suite, args.examples)
    with atomic_file(args.out) as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    log.info("%d validation example(s) of %s -> %s", len(recs), args.suite, args.out)
    return 0
