"""lm-eval task YAMLs for the embedded suites: data and prompt as configuration, not code.

Each suite gets one task per evaluation split, named ``ms_<suite>_<split>``, reading local jsonl
(no hub). Skill suites are scored with ``output_type: loglikelihood`` (``acc`` = the target is
the greedy continuation, i.e. exact match under greedy decoding, computed in one forward pass;
``perplexity`` = exp(−mean log p(target | prompt)), a smooth score of the same skill);
the held-out ``capitals`` suite is four-way ``multiple_choice`` (``acc``, ``acc_norm``).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mergesweep.atomic import atomic_file

EVAL_SPLITS = ("validation", "test")
TASK_VERSION = 1.0


def task_name(suite: str, split: str) -> str:
    return f"ms_{suite}_{split}"


def _common(suite: str, split: str, data_file: Path) -> dict:
    return {
        "task": task_name(suite, split),
        "tag": [f"ms_{suite}"],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {split: str(data_file.resolve())}},
        "test_split": split,
        "metadata": {"version": TASK_VERSION, "suite": suite, "split": split},
    }


def _skill_task(suite: str, split: str, data_file: Path) -> dict:
    return {
        **_common(suite, split, data_file),
        "output_type": "loglikelihood",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{target}}",
        "target_delimiter": "",
        # acc: the target is the greedy continuation (exact match); perplexity: exp of the mean
        # negative target log-likelihood over examples, a smooth measure of the same skill
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
        ],
    }


def _choice_task(suite: str, split: str, data_file: Path) -> dict:
    return {
        **_common(suite, split, data_file),
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }


def write_task_yamls(suite: str, data_dir: Path, tasks_dir: Path, multiple_choice: bool) -> list[Path]:
    """Write one YAML per evaluation split of ``suite`` into ``tasks_dir``; return their paths."""
    tasks_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for split in EVAL_SPLITS:
        data_file = data_dir / f"{split}.jsonl"
        spec = (_choice_task if multiple_choice else _skill_task)(suite, split, data_file)
        path = tasks_dir / f"{task_name(suite, split)}.yaml"
        with atomic_file(path) as f:
            yaml.safe_dump(spec, f, sort_keys=False)
        written.append(path)
    return written
