"""``mergesweep prefetch-datasets``: fetch every dataset the spec's lm-eval tasks need, before
the evaluation jobs, into the Hugging Face datasets cache; write a manifest of what was fetched.

The evaluation jobs run offline (``HF_DATASETS_OFFLINE=1``, set by ``mergesweep evaluate``): on
a cluster the compute nodes often cannot reach the Hub, and a hundred jobs downloading the same
dataset at once is wasteful. The workflow runs this command as a local rule (``rule
prefetch_datasets``, on the submitting host) whenever the plan has lm-eval suites, and every
evaluation job takes its manifest as an input.

Building each task with lm-eval's TaskManager loads its dataset (``datasets.load_dataset``), which
downloads it into the cache (``HF_DATASETS_CACHE``, else ``$HF_HOME/datasets``, else
``~/.cache/huggingface/datasets``: the user's setting is respected, and the evaluation jobs must
see the same one). The manifest (``Layout.datasets_manifest``, ``results/datasets.json``)
holds ``cache_dir``, ``hub_offline`` (whether downloads were disabled while fetching), library
``versions`` and ``tasks``: per leaf lm-eval task, ``suites``, ``dataset_path``,
``dataset_name``, ``revision`` (the task's pinned ``dataset_kwargs.revision``, or null: the
default branch), ``data_files`` and ``splits`` (name -> number of rows).

A dataset that cannot be fetched stops the command with one line naming the task and the
dataset (``task ms_x: cannot fetch dataset json (name None, data_files ...): FileNotFoundError:
...``), and no manifest is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import traceback
from pathlib import Path

from mergesweep.errors import MergesweepError

log = logging.getLogger(__name__)


class PrefetchError(MergesweepError):
    """A dataset (or the spec) could not be fetched: one line naming the task and the dataset."""


def _failing_task(e: BaseException):
    """The lm-eval task whose construction raised ``e`` (the innermost Task in the traceback)."""
    from lm_eval.api.task import Task

    found = None
    for frame, _ in traceback.walk_tb(e.__traceback__):
        obj = frame.f_locals.get("self")
        if isinstance(obj, Task):
            found = obj
    return found


def _describe_dataset(task) -> str:
    cfg = task.config
    kwargs = dict(cfg.dataset_kwargs or {})
    extra = f", data_files {kwargs['data_files']}" if kwargs.get("data_files") else ""
    rev = f", revision {kwargs['revision']}" if kwargs.get("revision") else ""
    return f"{cfg.dataset_path} (name {cfg.dataset_name}{rev}{extra})"


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def task_entry(task, suites: list[str]) -> dict:
    cfg = task.config
    kwargs = dict(cfg.dataset_kwargs or {})
    splits = {}
    if task.dataset is not None and hasattr(task.dataset, "items"):
        splits = {k: len(v) for k, v in task.dataset.items()}
    return {"suites": suites, "dataset_path": cfg.dataset_path, "dataset_name": cfg.dataset_name,
            "revision": kwargs.get("revision"), "data_files": kwargs.get("data_files"), "splits": splits}


def prefetch(spec: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Fetch the datasets of every lm-eval task of ``spec`` and write the manifest to ``out``
    (atomically, only when every dataset was fetched); return the manifest."""
    import datasets

    from mergesweep.atomic import write_json
    from mergesweep.evaluate.runner import EvaluationError, build_tasks, lm_eval_task_manager, read_spec
    from mergesweep.evaluate.splits import leaf_tasks
    from mergesweep.record import library_versions

    try:
        runs, options = read_spec(spec)
    except EvaluationError as e:
        raise PrefetchError(str(e)) from None
    wanted: dict[str, list[str]] = {}  # task name -> suites
    for r in runs:
        for t in r.lm_eval_tasks:
            wanted.setdefault(t, []).append(r.name)
    try:
        tm = lm_eval_task_manager(options.get("include_paths") or (), list(wanted), key=f"--spec {spec}")
    except EvaluationError as e:
        raise PrefetchError(str(e)) from None
    tasks: dict[str, dict] = {}
    for name, suites in wanted.items():
        log.info("fetching the datasets of %s", name)
        try:
            objs = build_tasks(tm, [name])
        except Exception as e:
            task = _failing_task(e)
            what = (f"task {task.config.task}: cannot fetch dataset {_describe_dataset(task)}" if task is not None
                    else f"task {name}: cannot fetch its dataset")
            raise PrefetchError(_one_line(f"{what}: {type(e).__name__}: {e}")) from e
        for leaf in leaf_tasks(objs):
            entry = tasks.setdefault(leaf.config.task, task_entry(leaf, []))
            entry["suites"] = sorted(set(entry["suites"]) | set(suites))
    manifest = {
        "cache_dir": str(datasets.config.HF_DATASETS_CACHE),
        "hub_offline": bool(getattr(datasets.config, "HF_HUB_OFFLINE", False)),
        "tasks": tasks,
        "versions": library_versions(),
    }
    write_json(out, manifest)
    log.info("%d task(s) ready in %s", len(tasks), manifest["cache_dir"])
    return manifest


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", required=True, type=Path, help="the evaluation spec (results/evaluation.json)")
    p.add_argument("--out", required=True, type=Path, help="the manifest to write (results/datasets.json)")


def run(args: argparse.Namespace) -> int:
    prefetch(args.spec, args.out)
    return 0
