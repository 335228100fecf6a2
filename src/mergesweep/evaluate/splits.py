"""Validation and test splits of real lm-eval tasks: which examples each split holds.

Every lm-eval suite is scored twice, on a ``validation`` and a ``test`` split (the leaderboard
selects on validation and ranks on test). Per leaf task (groups such as ``mmlu`` or
``leaderboard`` are walked down to their tasks), one rule, :func:`plan_splits`:

* **the task's own splits** (``rule: task_splits``): the task defines a validation split *and* a
  different test split (``validation_split`` and ``test_split`` in its YAML): validation is its
  validation split, test its test split;
* **a seeded slice** (``rule: seeded_slice``): otherwise, of the split lm-eval evaluates the task
  on (its ``test_split``, else its ``validation_split``: the *source split*), ``size`` examples
  drawn with ``random.Random(seed).sample`` form the validation split and every other example
  forms the test split; the two never overlap. ``size`` is capped at half the source split (a
  small task keeps a test split as large as its validation split; the record keeps the size asked
  for as ``requested_size``). The indices are those of the source split as the dataset holds it
  (before the task's ``process_docs``, which may drop some); a source split of fewer than two
  examples is an error naming the task.

When the few-shot examples of a sliced task come from its source split (it has no training or
separate few-shot split), each run draws them from its own slice only, so no test example is
ever shown while scoring validation, nor the other way round; and never the example being scored
(lm-eval 0.4.13 excludes it only when the task names its few-shot split explicitly).

lm-eval 0.4.13's ``ConfigurableTask`` evaluates ``test_docs()`` when ``config.test_split`` is set,
else ``validation_docs()`` (``eval_docs``); each reads ``task.dataset[<split>]`` through
``process_docs``. :func:`use_split` therefore points ``config.test_split`` at the split to score
and, for a slice, replaces that split of ``task.dataset`` by the selected rows; it restores both
afterwards, so the same task objects are evaluated once per split.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

SPLITS = ("validation", "test")


class SplitError(ValueError):
    """A task's splits cannot be formed (too few examples, a task class we cannot re-point)."""


def leaf_tasks(obj) -> list:
    """The leaf tasks of a built lm-eval Task or Group (recursively), in order."""
    from lm_eval.api.group import Group

    if isinstance(obj, Group):
        return list(obj.get_all_tasks(recursive=True))
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in leaf_tasks(o)]
    return [obj]


def slice_indices(n: int, size: int, seed: int) -> tuple[list[int], list[int]]:
    """(validation, test) indices of a source split of ``n`` examples: ``size`` drawn with
    ``seed``, and the rest; both sorted, disjoint, together ``range(n)``."""
    if size >= n:
        raise SplitError(f"validation size {size} leaves no test examples (the split has {n})")
    if size < 1:
        raise SplitError(f"validation size {size} must be at least 1")
    val = sorted(random.Random(seed).sample(range(n), size))
    chosen = set(val)
    return val, [i for i in range(n) if i not in chosen]


def _check_configurable(task) -> None:
    from lm_eval.api.task import ConfigurableTask

    name = getattr(getattr(task, "config", None), "task", type(task).__name__)
    if not isinstance(task, ConfigurableTask):
        raise SplitError(f"task {name}: a {type(task).__name__}, not a ConfigurableTask: its splits cannot be chosen")
    for attr in ("eval_docs", "test_docs", "validation_docs", "has_test_docs", "has_validation_docs"):
        if getattr(type(task), attr) is not getattr(ConfigurableTask, attr):
            raise SplitError(f"task {name}: its class {type(task).__name__} overrides {attr}: its splits cannot "
                             "be chosen")
    if task.dataset is None:
        raise SplitError(f"task {name}: no dataset was loaded")


def fewshot_split(task) -> str | None:
    """The dataset split the task draws its few-shot examples from (None: fixed samples)."""
    cfg = task.config
    fs = getattr(task, "fewshot_cfg", None)
    if fs is not None and getattr(fs, "split", None):
        return fs.split
    if fs is not None and cfg.fewshot_config is not None and getattr(fs, "samples", None) is not None:
        return None
    return cfg.training_split or cfg.validation_split or cfg.test_split


@dataclass
class SplitPlan:
    """Which examples of one leaf task form its validation and its test split (the record
    written to the result JSON: :meth:`to_dict`)."""

    task: str
    rule: str  # task_splits | seeded_slice
    validation: dict
    test: dict
    fewshot_split: str | None
    _indices: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {"rule": self.rule, "fewshot_split": self.fewshot_split,
                "validation": self.validation, "test": self.test}


def plan_splits(task, size: int, seed: int) -> SplitPlan:
    """The split rule of one built leaf task (see the module docstring)."""
    _check_configurable(task)
    cfg = task.config
    name = cfg.task
    fs = fewshot_split(task)
    if cfg.validation_split and cfg.test_split and cfg.validation_split != cfg.test_split:
        for s in (cfg.validation_split, cfg.test_split):
            if s not in task.dataset:
                raise SplitError(f"task {name}: its dataset has no split '{s}' (it has {', '.join(task.dataset)})")
        return SplitPlan(name, "task_splits",
                         {"split": cfg.validation_split, "n": len(task.dataset[cfg.validation_split])},
                         {"split": cfg.test_split, "n": len(task.dataset[cfg.test_split])}, fs)
    source = cfg.test_split or cfg.validation_split
    if not source or source not in task.dataset:
        raise SplitError(f"task {name}: no split to evaluate on (test_split {cfg.test_split!r}, validation_split "
                         f"{cfg.validation_split!r}; the dataset has {', '.join(task.dataset or [])})")
    n = len(task.dataset[source])
    # at most half of the source split: the default size (100) must not empty the test split of
    # a small task (COPA has 100 examples, CB 56); the record keeps the size asked for
    take = min(size, n // 2)
    if take < 1:
        raise SplitError(f"task {name}: its split '{source}' has {n} example(s): too few to hold out a "
                         "validation slice")
    val, test = slice_indices(n, take, seed)
    common = {"source_split": source, "seed": seed}
    return SplitPlan(name, "seeded_slice",
                     {**common, "size": len(val), "requested_size": size, "indices": val},
                     {**common, "size": len(test), "indices": test}, fs,
                     _indices={"validation": val, "test": test})


@contextmanager
def use_split(tasks: list, plans: dict[str, SplitPlan], which: str) -> Iterator[None]:
    """Within the block, each task of ``tasks`` evaluates the ``which`` split of its plan."""
    if which not in SPLITS:
        raise ValueError(f"split {which!r}: expected one of {SPLITS}")
    saved: list[tuple[Any, ...]] = []
    try:
        for task in tasks:
            plan = plans[task.config.task]
            sampler = getattr(task, "sampler", None)
            fs_cfg = getattr(task, "fewshot_cfg", None)
            saved.append((task, task.config.test_split, task.dataset, getattr(sampler, "df", None),
                          getattr(sampler, "_loaded", None), getattr(fs_cfg, "split", None)))
            if plan.rule == "task_splits":
                task.config.test_split = plan.validation["split"] if which == "validation" else plan.test["split"]
                continue
            source = plan.validation["source_split"]
            selected = task.dataset[source].select(plan._indices[which], keep_in_memory=True)
            dataset = type(task.dataset)(task.dataset)  # a shallow copy: the other splits as they are
            dataset[source] = selected
            task.dataset = dataset
            task.config.test_split = source
            if sampler is not None and plan.fewshot_split == source:
                # few-shot examples from this slice only, never the example being scored (lm-eval
                # leaves it out when the few-shot split is the evaluated one)
                sampler.df = list(task.test_docs())
                sampler._loaded = True  # the pool as given (no fewshot_indices applied to it)
                if fs_cfg is not None:
                    fs_cfg.split = source
        yield
    finally:
        for task, test_split, dataset, df, loaded, fs_split in reversed(saved):
            task.config.test_split = test_split
            task.dataset = dataset
            if df is not None:
                task.sampler.df = df
                task.sampler._loaded = loaded
            if getattr(task, "fewshot_cfg", None) is not None:
                task.fewshot_cfg.split = fs_split
