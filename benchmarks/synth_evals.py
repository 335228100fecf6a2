#!/usr/bin/env python
"""A synthetic evaluation tree of a MergeBench-sized sweep, for the aggregate/leaderboard tests and
benchmarks.

    .venv/bin/python benchmarks/synth_evals.py --models 5000 --out /tmp/synth-5000
    .venv/bin/python benchmarks/synth_evals.py --models 1000 --tasks 20 --error-rate 0.03 --out DIR

writes, under ``OUT``::

    evals/<model_id>/<suite>.json     one evaluation JSON per (model, suite), as `mergesweep evaluate`
                                      writes it (evaluate/runner.py `_run_suite`; the `model` block is
                                      the model's record built with mergesweep.record.ModelRecord)
    evaluation_models.json            {"models": [...], "suites": [...]}: what the workflow's
                                      evaluation_models rule writes (`aggregate --models`)
    provenance.json                   as mergesweep.plan.provenance writes it (config hash, config,
                                      checkpoints, versions, every merge)

The sweep: one base, ``--experts`` experts (one skill suite each), one held-out suite, and merged
models of ``len(METHODS)`` methods over every subset of 2 or more experts, each (method, subset) a
hyperparameter sweep whose points fill ``--models`` (5 experts: 26 subsets x 10 methods = 260
sweeps). Every suite has ``--tasks`` lm-eval tasks per split (validation, test), each one row with
metric ``acc``, filter ``none``. A few percent (``--error-rate``) of the merged models' (model, suite)
evaluations are ``status: error``.

Every value is known: :func:`generate` returns a :class:`SynthTree` whose ``values`` hold each
(model, suite, split)'s per-task accuracies and ``errors`` the failed (model, suite) pairs, so a test
can check the aggregate against them. Deterministic for a given seed (the same bytes every time,
whatever the platform: values are multiples of 1/n).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from mergesweep.aggregate.analysis import SPLITS  # noqa: E402
from mergesweep.ids import definition_uid, merge_model_id  # noqa: E402
from mergesweep.record import ModelRecord, library_versions  # noqa: E402

SKILLS = ("arithmetic", "reverse", "dateformat", "sorting", "copying", "counting", "parity", "lookup")
HELDOUT = "capitals"
BASE = "synth-base"
#: method -> its hyperparameter axes (name -> values, in grid order); a sweep takes the first
#: points of the product
METHODS: dict[str, dict[str, list]] = {
    "task_arithmetic": {"lambda": [round(0.1 * i, 1) for i in range(1, 25)]},
    "ties": {"density": [0.1, 0.2, 0.3, 0.5, 0.7], "lambda": [0.5, 0.75, 1.0, 1.25, 1.5]},
    "dare_ties": {"density": [0.1, 0.3, 0.5, 0.7, 0.9], "lambda": [0.5, 0.75, 1.0, 1.25, 1.5], "seed": [0]},
    "dare_linear": {"density": [0.1, 0.3, 0.5, 0.7, 0.9], "lambda": [0.5, 0.75, 1.0, 1.25, 1.5], "seed": [0]},
    "breadcrumbs": {"density": [0.7, 0.8, 0.9], "gamma": [0.01, 0.05], "lambda": [0.5, 1.0, 1.5, 2.0]},
    "della": {"density": [0.3, 0.5, 0.7], "epsilon": [0.05, 0.1], "lambda": [0.5, 1.0, 1.5, 2.0]},
    "consensus": {"k": [1, 2, 3], "lambda": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]},
    "tsv": {"alpha": [0.125 * i for i in range(1, 25)]},
    "pcb": {"ratio": [0.05, 0.1, 0.2, 0.3], "lambda": [0.5, 1.0, 1.5, 2.0, 2.5]},
    "linear": {"normalize": [True, False], "weight": [0.25 * i for i in range(1, 13)]},
}
N_PER_TASK = 100  # samples per lm-eval task (values are multiples of 1/N_PER_TASK)
VERSIONS = {"lm_eval": "0.4.13", "torch": "2.13.0", "transformers": "4.57.1"}


@dataclass
class SynthModel:
    model_id: str
    role: str
    record: dict
    domain: str | None = None
    method: str | None = None
    params: dict = field(default_factory=dict)
    experts: list[str] = field(default_factory=list)


@dataclass
class SynthTree:
    """What was written: the models, the suites, every value and every failure."""

    root: Path
    models: list[SynthModel]
    skills: list[str]
    heldout: list[str]
    tasks: int
    #: (model_id, suite, split) -> per-task accuracies (absent for a failed evaluation)
    values: dict[tuple[str, str, str], np.ndarray]
    errors: set[tuple[str, str]]

    @property
    def evals(self) -> Path:
        return self.root / "evals"

    @property
    def models_file(self) -> Path:
        return self.root / "evaluation_models.json"

    @property
    def provenance(self) -> Path:
        return self.root / "provenance.json"

    @property
    def suites(self) -> list[str]:
        return [*self.skills, *self.heldout]

    def suite_score(self, model_id: str, suite: str, split: str) -> float:
        """The suite score the aggregation must find: the mean over its tasks (NaN if failed)."""
        v = self.values.get((model_id, suite, split))
        return math.nan if v is None else float(np.mean(v))


def _fingerprint(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def sweep_points(method: str, n: int) -> list[dict]:
    """The first ``n`` points of the method's grid (cycling its last axis with a seed when the grid
    is smaller than ``n``)."""
    axes = METHODS[method]
    grid = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    out = []
    for i in range(n):
        p = dict(grid[i % len(grid)])
        if i >= len(grid):
            p["seed"] = i // len(grid)
        out.append(p)
    return out


def _quality(method: str, params: dict, n_experts: int, rng: np.random.Generator) -> float:
    """A plausible normalised score: a method-specific optimum in its scaling hyperparameter,
    interference growing with the number of experts."""
    scale = next((float(params[k]) for k in ("lambda", "alpha", "weight") if k in params), 1.0)
    best = 1.0 + 0.1 * (sum(map(ord, method)) % 5)
    peak = 0.95 - 0.015 * (sum(map(ord, method)) % 7)
    q = peak - 0.35 * (scale - best) ** 2 - 0.06 * (n_experts - 2)
    if "density" in params:
        q -= 0.2 * (float(params["density"]) - 0.5) ** 2
    return float(np.clip(q + rng.normal(0, 0.02), 0.05, 1.05))


def _task_values(level: float, tasks: int, rng: np.random.Generator) -> np.ndarray:
    p = np.clip(level + rng.normal(0, 0.05, size=tasks), 0.0, 1.0)
    return np.round(p * N_PER_TASK) / N_PER_TASK


def _eval_doc(m: SynthModel, suite: str, tasks: int, values: dict | None, error: str | None,
              versions: dict, rng: np.random.Generator) -> dict:
    """One evaluation JSON, with the keys `mergesweep evaluate` writes (evaluate/runner.py)."""
    names = {split: [f"ms_{suite}_{t:02d}_{split}" for t in range(tasks)] for split in SPLITS}
    doc = {
        "model_id": m.model_id,
        "suite": suite,
        "status": "ok" if error is None else "error",
        "error": error,
        "model": m.record,
        "model_path": f"results/models/{m.model_id}",
        "results": [],
        "device": "cpu",
        "requested_device": "auto",
        "chat_template": False,
        "log_samples": False,
        "versions": versions,
        "runtime_s": round(float(rng.uniform(5, 40)), 3),
        "load_s": 1.5,
        "peak_rss_mb": round(float(rng.uniform(700, 1200)), 1),
    }
    if error is not None:
        doc["traceback"] = f"Traceback (most recent call last):\n  ...\n{error}\n"
        return doc
    rows = []
    for split in SPLITS:
        for name, v in zip(names[split], values[split]):
            se = math.sqrt(v * (1 - v) / (N_PER_TASK - 1))
            rows.append({"task": suite, "lm_eval_task": name, "metric": "acc", "filter": "none",
                         "split": split, "value": float(v), "stderr": None if se == 0 else round(se, 6),
                         "n": N_PER_TASK})
    doc["results"] = sorted(rows, key=lambda r: (r["split"], r["metric"]))
    all_names = [n for split in SPLITS for n in names[split]]
    doc["task_versions"] = {n: 1.0 for n in all_names}
    doc["num_fewshot"] = {n: 0 for n in all_names}
    doc["lm_eval_config"] = {"batch_size": 16, "limit": None, "model": "hf"}
    return doc


def plan_models(n_models: int, n_experts: int = 5, min_subset: int = 2) -> list[SynthModel]:
    """The sweep's models: the base, the experts, and ``n_models - 1 - n_experts`` merges spread
    evenly over every (method, expert subset) sweep."""
    if not 2 <= n_experts <= len(SKILLS):
        raise ValueError(f"--experts {n_experts}: between 2 and {len(SKILLS)}")
    versions = library_versions()
    base_uid = definition_uid(BASE, {"recipe": "synthetic"})
    base = ModelRecord(model_id=BASE, role="base", stage="pretrain", uid=base_uid, fingerprint=_fingerprint(BASE),
                       source={"type": "pretrain", "recipe": "synthetic"}, versions=versions,
                       runtime_s=600.0, peak_rss_mb=2048.0)
    models = [SynthModel(BASE, "base", base.to_dict())]
    experts = {}
    for d in SKILLS[:n_experts]:
        name = f"synth-{d}"
        rec = ModelRecord(model_id=name, role="expert", stage="finetune", uid=definition_uid(name, {"skill": d}),
                          fingerprint=_fingerprint(name), domain=d, base=BASE,
                          source={"type": "finetune", "skill": d}, versions=versions, runtime_s=300.0,
                          peak_rss_mb=2500.0)
        experts[name] = rec
        models.append(SynthModel(name, "expert", rec.to_dict(), domain=d))
    n_merged = max(0, n_models - len(models))
    subsets = [list(s) for k in range(min_subset, n_experts + 1) for s in itertools.combinations(experts, k)]
    sweeps = [(method, s) for s in subsets for method in METHODS]
    per, extra = divmod(n_merged, len(sweeps))
    for i, (method, subset) in enumerate(sweeps):
        for params in sweep_points(method, per + (1 if i < extra else 0)):
            mid = merge_model_id(method, params, base_uid, [experts[e].uid for e in subset])
            rec = ModelRecord(model_id=mid, role="merged", stage="merge", uid=mid, fingerprint=_fingerprint(mid),
                              method=method, params=params, base=BASE, experts=list(subset),
                              source={"type": "merge"}, versions=versions, runtime_s=9.5, peak_rss_mb=3300.0,
                              extra={"align": None})
            models.append(SynthModel(mid, "merged", rec.to_dict(), method=method, params=params,
                                     experts=list(subset)))
    ids = [m.model_id for m in models]
    if len(set(ids)) != len(ids):
        raise RuntimeError("synthetic merge ids collide")
    return models


def generate(out: str | Path, n_models: int, *, n_experts: int = 5, tasks: int = 20, error_rate: float = 0.03,
             seed: int = 0, write: bool = True, indent: int | None = 2) -> SynthTree:
    """Write the tree under ``out`` (see the module docstring) and return what it holds.
    ``indent=None`` writes compact JSON (faster to write and read; same content)."""
    root = Path(out)
    models = plan_models(n_models, n_experts)
    skills = [m.domain for m in models if m.role == "expert"]
    suites = [*skills, HELDOUT]
    domain_of = {m.model_id: m.domain for m in models if m.role == "expert"}
    rng = np.random.default_rng(seed)
    expert_level = {d: {s: float(rng.uniform(0.75, 0.95)) for s in SPLITS} for d in skills}
    base_level = {s: {sp: (0.15 if s in skills else 0.55) for sp in SPLITS} for s in suites}
    values: dict[tuple[str, str, str], np.ndarray] = {}
    errors: set[tuple[str, str]] = set()
    versions = VERSIONS
    for idx, m in enumerate(models):
        mrng = np.random.default_rng([seed, idx])
        cost_rng = np.random.default_rng([seed, idx, 1])  # only the written files' costs draw from it
        q = _quality(m.method, m.params, len(m.experts), mrng) if m.role == "merged" else 1.0
        own = {domain_of[e] for e in m.experts}
        for suite in suites:
            failed = m.role == "merged" and mrng.random() < error_rate
            per_split = {}
            for split in SPLITS:
                if suite == HELDOUT:
                    level = base_level[suite][split] - (0.25 * (1 - q) + 0.05 if m.role != "base" else 0.0)
                elif m.role == "base":
                    level = base_level[suite][split]
                elif m.role == "expert":
                    level = expert_level[suite][split] if m.domain == suite else base_level[suite][split]
                else:
                    level = (q * expert_level[suite][split] if suite in own
                             else base_level[suite][split] * 0.9)
                per_split[split] = _task_values(level, tasks, mrng)
            if failed:
                errors.add((m.model_id, suite))
                error = "RuntimeError: lm-eval reported non-finite scores: synthetic failure"
            else:
                error = None
                for split in SPLITS:
                    values[(m.model_id, suite, split)] = per_split[split]
            if write:
                doc = _eval_doc(m, suite, tasks, per_split, error, versions, cost_rng)
                path = root / "evals" / m.model_id / f"{suite}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                # the bytes mergesweep.atomic.write_json writes (indented, sorted keys)
                path.write_text(json.dumps(doc, indent=indent, sort_keys=True, default=str) + "\n")
    tree = SynthTree(root, models, skills, [HELDOUT], tasks, values, errors)
    if write:
        ids = [m.model_id for m in models]
        tree.models_file.write_text(json.dumps({"models": ids, "suites": suites}, indent=2) + "\n")
        config = {"name": "synth", "seed": seed, "suites": {"skills": skills, "heldout": [HELDOUT]},
                  "merges": [{"method": k, "params": v} for k, v in METHODS.items()]}
        prov = {
            "config_hash": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16],
            "config": config,
            "checkpoints": {m.model_id: {"role": m.role, "uid": m.record["uid"], "stage": m.record["stage"],
                                         "source": m.record["source"]["type"], "revision": None, "sha256": None,
                                         "fingerprint": m.record["fingerprint"]}
                            for m in models if m.role != "merged"},
            "versions": library_versions(),
            "merges": {m.model_id: {"method": m.method, "params": m.params, "experts": m.experts}
                       for m in models if m.role == "merged"},
        }
        tree.provenance.write_text(json.dumps(prov, indent=2, sort_keys=True) + "\n")
    return tree


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=1000, help="number of models, base and experts included")
    ap.add_argument("--experts", type=int, default=5)
    ap.add_argument("--tasks", type=int, default=20, help="lm-eval tasks per suite and split")
    ap.add_argument("--error-rate", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        ap.error(f"--out {args.out}: not empty")
    t0 = time.perf_counter()
    tree = generate(args.out, args.models, n_experts=args.experts, tasks=args.tasks, error_rate=args.error_rate,
                    seed=args.seed)
    n_files = len(tree.models) * len(tree.suites)
    print(f"{args.out}: {len(tree.models)} models x {len(tree.suites)} suites = {n_files} files "
          f"({len(tree.errors)} status: error), {args.tasks} tasks x {len(SPLITS)} splits each, "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
