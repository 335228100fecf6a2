"""A small local lm-eval task directory over local datasets, for tests of real lm-eval suites
(``suites.lm_eval`` with ``evaluation.include_paths``) without the Hub.

:func:`build_lm_eval_tasks` writes, under ``root``:

* ``data/sums/{train,validation,test}.jsonl`` and task ``ms_lm_sums`` (``validation_split`` and
  ``test_split`` both set): the suite's validation split is the task's own validation split;
* ``data/pairs/test.jsonl`` and task ``ms_lm_pairs`` (``test_split`` only): the validation split
  is a seeded slice of its test split;
* group ``ms_lm_all`` over both (lm-eval groups are walked down to their tasks);
* with ``broken=True`` also ``ms_lm_broken``, whose data file does not exist (a dataset that
  cannot be fetched).

Every task is four-way multiple choice (``acc``, ``acc_norm``) over short arithmetic prompts a
tiny Llama from :func:`helpers_pipeline.tiny_eval_model` tokenizes (byte-level BPE), with a few
dozen examples, so a suite costs a second or two on one CPU thread. The task YAMLs read local
JSON files (``dataset_path: json``, ``dataset_kwargs.data_files``), so ``datasets`` builds them
into its cache (``HF_DATASETS_CACHE``) the first time they are loaded.

Use in a workflow config::

    t = build_lm_eval_tasks(tmp_path / "lm_eval")
    cfg["evaluation"]["include_paths"] = [str(t.include_path)]
    cfg["suites"]["lm_eval"] = {"local_mc": {"tasks": list(t.tasks), "validation": {"size": t.slice_size}}}
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

WITH_VALIDATION = "ms_lm_sums"
WITHOUT_VALIDATION = "ms_lm_pairs"
GROUP = "ms_lm_all"
BROKEN = "ms_lm_broken"


@dataclass(frozen=True)
class LmEvalTasks:
    include_path: Path  # pass to evaluation.include_paths / --include-path
    tasks: tuple[str, ...]  # the two task names (WITH_VALIDATION, WITHOUT_VALIDATION)
    group: str  # a group over both
    data_dir: Path
    sizes: dict  # task -> {split: examples}
    slice_size: int  # a validation size that suits WITHOUT_VALIDATION (a third of its test split)
    broken: str | None = None  # a task whose dataset cannot be fetched (broken=True)


def _sum_docs(rng: random.Random, n: int) -> list[dict]:
    docs = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        right = a + b
        wrong = rng.sample([x for x in range(19) if x != right], 3)
        choices = [str(x) for x in [right, *wrong]]
        rng.shuffle(choices)
        docs.append({"question": f"{a}+{b}=", "choices": choices, "label": choices.index(str(right))})
    return docs


def _pair_docs(rng: random.Random, n: int) -> list[dict]:
    docs = []
    for i, a in enumerate(rng.sample(range(10, 100), n)):  # distinct questions: a prompt names its doc
        right = str(a)[::-1]
        wrong = rng.sample([str(x) for x in range(10, 100) if str(x) != right], 3)
        choices = [right, *wrong]
        rng.shuffle(choices)
        docs.append({"id": i, "question": f"reverse {a}:", "choices": choices, "label": choices.index(right)})
    return docs


def _write_jsonl(path: Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


def _task(name: str, data_files: dict, **splits) -> dict:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data_files},
        **splits,
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


def build_lm_eval_tasks(root: Path, *, train: int = 8, validation: int = 10, test: int = 16, pairs: int = 24,
                        seed: int = 0, broken: bool = False) -> LmEvalTasks:
    """Write the datasets and task YAMLs under ``root`` (see the module docstring); return where
    they are and their names."""
    root = Path(root)
    rng = random.Random(seed)
    data = root / "data"
    tasks_dir = root / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    sums = {"train": _sum_docs(rng, train), "validation": _sum_docs(rng, validation), "test": _sum_docs(rng, test)}
    for split, docs in sums.items():
        _write_jsonl(data / "sums" / f"{split}.jsonl", docs)
    _write_jsonl(data / "pairs" / "test.jsonl", _pair_docs(rng, pairs))
    specs = [
        _task(WITH_VALIDATION, {s: str((data / "sums" / f"{s}.jsonl").resolve()) for s in sums},
              training_split="train", validation_split="validation", test_split="test"),
        _task(WITHOUT_VALIDATION, {"test": str((data / "pairs" / "test.jsonl").resolve())}, test_split="test"),
    ]
    if broken:
        specs.append(_task(BROKEN, {"test": str((data / "missing" / "test.jsonl").resolve())}, test_split="test"))
    for spec in specs:
        (tasks_dir / f"{spec['task']}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (tasks_dir / f"{GROUP}.yaml").write_text(yaml.safe_dump(
        {"group": GROUP, "task": [WITH_VALIDATION, WITHOUT_VALIDATION], "metadata": {"version": 1.0}},
        sort_keys=False))
    return LmEvalTasks(include_path=tasks_dir, tasks=(WITH_VALIDATION, WITHOUT_VALIDATION), group=GROUP,
                       data_dir=data,
                       sizes={WITH_VALIDATION: {k: len(v) for k, v in sums.items()},
                              WITHOUT_VALIDATION: {"test": pairs}},
                       slice_size=max(1, pairs // 3), broken=BROKEN if broken else None)
