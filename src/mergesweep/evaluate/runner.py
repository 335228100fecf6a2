"""Evaluate one model on one suite with lm-eval and write our own result JSON.

lm-eval's own output files carry timestamps in their names; we call
``lm_eval.simple_evaluate`` (HF backend) and write ``results/evals/<model_id>/<suite>.json`` at a
fixed path, holding per (task, metric, split) value, stderr and sample count, task versions,
few-shot settings, chat-template use and library versions (format: docs/ARCHITECTURE.md).

A suite that fails to load or run does not stop the sweep: the JSON records ``status: error`` and
the message, and the aggregation shows it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
import traceback
from pathlib import Path
from typing import Any

from mergesweep.atomic import write_json

log = logging.getLogger(__name__)


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _clean(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def suite_tasks(tasks_dir: Path, suite: str) -> list[tuple[str, str]]:
    """(task name, split) pairs for a suite, read from its task YAMLs' metadata."""
    import yaml

    out = []
    for p in sorted(Path(tasks_dir).glob("*.yaml")):
        spec = yaml.safe_load(p.read_text())
        meta = spec.get("metadata") or {}
        if meta.get("suite", suite) == suite:
            out.append((spec["task"], meta.get("split", "test")))
    return out


def results_to_rows(raw: dict, task_splits: dict[str, str], suite: str) -> list[dict]:
    """Turn lm-eval's ``results`` dict into rows ``{task, metric, split, value, stderr, n}``.

    lm-eval keys metrics as ``"<metric>,<filter>"`` with the stderr under
    ``"<metric>_stderr,<filter>"``; sample counts come from ``n-samples``.
    """
    rows = []
    n_samples = raw.get("n-samples", {})
    for task, metrics in raw.get("results", {}).items():
        if task not in task_splits:
            continue  # group aggregates
        n = n_samples.get(task, {}).get("effective")
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or key.startswith("alias"):
                continue
            metric, filt = key.split(",", 1)
            rows.append({
                "task": suite,
                "lm_eval_task": task,
                "metric": metric,
                "filter": filt,
                "split": task_splits[task],
                "value": _clean(value),
                "stderr": _clean(metrics.get(f"{metric}_stderr,{filt}")),
                "n": int(n) if n is not None else None,
            })
    return sorted(rows, key=lambda r: (r["split"], r["metric"]))


def evaluate(
    model_dir: str | os.PathLike,
    suite: str,
    tasks_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    batch_size: int | str = 16,
    device: str = "cpu",
    dtype: str = "float32",
    limit: int | None = None,
    log_samples: bool = False,
    num_fewshot: int | None = None,
    apply_chat_template: bool = False,
    extra_tasks: list[str] | None = None,
    confirm_run_unsafe_code: bool = False,
) -> dict:
    """Run lm-eval for (model, suite) and write the result JSON atomically. Never raises for a
    failing task: returns (and writes) a record with ``status: "error"``."""
    model_dir, tasks_dir, out = Path(model_dir), Path(tasks_dir), Path(out)
    meta_path = model_dir / "mergesweep.json"
    model_meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    model_id = model_meta.get("model_id", model_dir.name)
    t0 = time.time()
    record: dict[str, Any] = {
        "model_id": model_id,
        "suite": suite,
        "status": "ok",
        "error": None,
        "model": model_meta,
        "model_path": str(model_dir),
        "results": [],
        "device": device,
        "chat_template": bool(apply_chat_template),
        "log_samples": bool(log_samples),
    }
    try:
        import lm_eval
        import torch
        import transformers
        from lm_eval.tasks import TaskManager

        record["versions"] = {
            "lm_eval": getattr(lm_eval, "__version__", None) or _dist_version("lm_eval"),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }
        if extra_tasks:
            task_splits = {t: "test" for t in extra_tasks}
            tm = TaskManager()
            unknown = [t for t in extra_tasks if t not in tm.all_tasks]
            if unknown:
                raise KeyError(f"lm-eval has no task named {', '.join(unknown)}")
        else:
            task_splits = dict(suite_tasks(tasks_dir, suite))
            if not task_splits:
                raise FileNotFoundError(f"{tasks_dir}: no task YAML for suite '{suite}'")
            tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        raw = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "dtype": dtype, "trust_remote_code": False},
            tasks=list(task_splits),
            task_manager=tm,
            batch_size=batch_size,
            device=device,
            limit=limit,
            log_samples=log_samples,
            num_fewshot=num_fewshot,
            apply_chat_template=apply_chat_template,
            confirm_run_unsafe_code=confirm_run_unsafe_code,
        )
        if raw is None:
            raise RuntimeError("lm_eval.simple_evaluate returned nothing")
        record["results"] = results_to_rows(raw, task_splits, suite)
        record["task_versions"] = {k: v for k, v in raw.get("versions", {}).items() if k in task_splits}
        record["num_fewshot"] = {k: v for k, v in raw.get("n-shot", {}).items() if k in task_splits}
        record["lm_eval_config"] = {k: raw.get("config", {}).get(k) for k in ("batch_size", "limit", "model")}
        if log_samples:
            samples_path = out.with_suffix(".samples.jsonl")
            from mergesweep.atomic import atomic_file

            with atomic_file(samples_path) as f:
                for task, samples in raw.get("samples", {}).items():
                    for s in samples:
                        f.write(json.dumps({"task": task, **s}, default=str) + "\n")
            record["samples_file"] = str(samples_path)
        if not record["results"]:
            raise RuntimeError("lm-eval returned no metrics for the suite's tasks")
    except Exception as e:  # a failing suite must not stop the sweep
        log.error("evaluation of %s on %s failed: %s", model_id, suite, e)
        record["status"] = "error"
        record["error"] = f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc(limit=5)
    record["runtime_s"] = round(time.time() - t0, 3)
    record["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    write_json(out, record)
    return record


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
