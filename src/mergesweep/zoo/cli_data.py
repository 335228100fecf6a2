"""``mergesweep make-data``: generate one suite's jsonl splits and its lm-eval task YAMLs."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from mergesweep.atomic import atomic_file, write_json
from mergesweep.errors import ConfigError
from mergesweep.zoo import skills, tasks

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", required=True, help="skill name or held-out suite (capitals)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=2000, help="training examples (skills only)")
    p.add_argument("--validation", type=int, default=40)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--data-dir", required=True, type=Path, help="writes {train,validation,test}.jsonl here")
    p.add_argument("--tasks-dir", required=True, type=Path, help="writes the lm-eval task YAMLs here")


def write_jsonl(path: Path, records: list[dict]) -> None:
    with atomic_file(path) as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def make_suite(suite: str, seed: int, sizes: dict[str, int], data_dir: Path, tasks_dir: Path) -> dict:
    for k, v in sizes.items():
        if v < 0 or (k != "train" and v < 1):
            raise ConfigError(f"data.sizes.{k}: must be positive, got {v}")
    if suite in skills.HELDOUT:
        splits = skills.capitals_splits(sizes, seed)
        multiple_choice = True
    else:
        splits = skills.generate_splits(suite, sizes, seed)
        multiple_choice = False
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, recs in splits.items():
        write_jsonl(data_dir / f"{split}.jsonl", recs)
    yamls = tasks.write_task_yamls(suite, data_dir, tasks_dir, multiple_choice)
    manifest = {"suite": suite, "seed": seed, "sizes": {k: len(v) for k, v in splits.items()},
                "kind": "heldout" if multiple_choice else "skill", "tasks": [p.stem for p in yamls]}
    write_json(data_dir / "manifest.json", manifest)
    log.info("suite %s: %s", suite, manifest["sizes"])
    return manifest


def run(args: argparse.Namespace) -> int:
    sizes = {"train": args.train, "validation": args.validation, "test": args.test}
    make_suite(args.suite, args.seed, sizes, args.data_dir, args.tasks_dir)
    return 0
