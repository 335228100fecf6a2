"""A finished search's result file, ``results/search/<search id>/result.json``: what the reports
read (the leaderboard's search methods, MAP's fronts, the convergence plot).

Written by :func:`write_result` from the search's generation files and the merge id of every
proposal (the plan owns the ids); read back, checked, by :func:`read_result`. Format::

    format        1
    label         the search's method label in the leaderboard ("map:task_arithmetic" or its name)
    id            the search id (its directory under results/search/)
    strategy      "map" | "cmaes" | "cycleqd"
    method        the base merge method searched over
    experts       the merge's experts (plan names, in order)
    objective     {suites, weights, reference}: the validation objective (reference: each suite's
                  expert validation score, null when not normalised)
    budget, seed
    generations   the number of generation files (the last one proposes nothing)
    candidates    every distinct candidate, in the order first proposed:
                  {model_id, generation, params, x, info, scores, objective}; ``scores`` are its
                  validation scores per objective suite (as the strategy saw them; missing suites
                  failed), ``objective`` their objective value (null when a suite is missing)
    convergence   per generation that was evaluated: {generation, n, best, best_so_far} (the
                  objective's best value among that generation's candidates, and up to it)
    result        the strategy's own result (``Strategy.result``: MAP's fits, predicted front and
                  predicted-vs-measured report; CMA-ES's best; CycleQD's archives)

No test score is in this file: a strategy never sees one, and neither does this summary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from mergesweep.atomic import write_json
from mergesweep.search.base import SearchError, Strategy, params_key
from mergesweep.search.state import Generation

FORMAT = 1
FIELDS = ("format", "label", "id", "strategy", "method", "experts", "objective", "budget", "seed",
          "generations", "candidates", "convergence", "result")


def _finite(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def result_doc(strategy: Strategy, generations: Sequence[Generation], ids: Sequence[Sequence[str]], *,
               label: str, search_id: str, method: str, experts: Sequence[str]) -> dict:
    """The result document of a search from its generations (in order, the last one empty) and
    the merge id of each generation's proposals (``ids[g][i]`` for ``generations[g].proposals[i]``)."""
    if len(ids) != len(generations):
        raise SearchError(f"search {search_id}: {len(generations)} generation(s) but ids for {len(ids)}")
    # a generation's observations are the previous generation's proposals' validation scores
    seen: dict[str, Mapping[str, float]] = {}
    for gen in generations:
        for o in gen.observations:
            seen.setdefault(params_key(o.params), dict(o.scores))
    candidates: dict[str, dict] = {}
    convergence = []
    best_so_far = None
    for gen, gen_ids in zip(generations, ids):
        if len(gen_ids) != len(gen.proposals):
            raise SearchError(f"{gen.path or gen.generation}: {len(gen.proposals)} proposal(s) but {len(gen_ids)} id(s)")
        values = []
        for p, mid in zip(gen.proposals, gen_ids):
            scores = seen.get(params_key(p.params))
            value = None if scores is None else _finite(strategy.objective.value(scores))
            if scores is not None:
                values.append(value)
            if mid not in candidates:
                candidates[mid] = {"model_id": mid, "generation": gen.generation, "params": dict(p.params),
                                   "x": list(p.x), "info": dict(p.info),
                                   "scores": None if scores is None else dict(scores), "objective": value}
        if values:
            finite = [v for v in values if v is not None]
            best = max(finite) if finite else None
            if best is not None:
                best_so_far = best if best_so_far is None else max(best_so_far, best)
            convergence.append({"generation": gen.generation, "n": len(values), "best": best,
                                "best_so_far": best_so_far})
    last = generations[-1] if generations else None
    return {
        "format": FORMAT, "label": label, "id": search_id, "strategy": strategy.name, "method": method,
        "experts": list(experts), "objective": strategy.objective.to_dict(), "budget": strategy.budget,
        "seed": strategy.seed, "generations": len(generations), "candidates": list(candidates.values()),
        "convergence": convergence, "result": strategy.result(last.state) if last is not None else None,
    }


def write_result(path: str | Path, doc: Mapping[str, Any]) -> None:
    """Write a result document atomically (checked as :func:`read_result` checks it)."""
    check_result(doc, str(path))
    write_json(path, json.loads(json.dumps(doc)))


def check_result(doc: Any, where: str) -> dict:
    if not isinstance(doc, Mapping):
        raise SearchError(f"{where}: not a search result (expected a JSON object)")
    missing = [k for k in FIELDS if k not in doc]
    if missing:
        raise SearchError(f"{where}: not a complete search result (no {', '.join(missing)})")
    if doc["format"] != FORMAT:
        raise SearchError(f"{where}: search result format {doc['format']!r}, this version reads {FORMAT}")
    if not isinstance(doc["candidates"], list) or not all(
            isinstance(c, Mapping) and isinstance(c.get("model_id"), str) for c in doc["candidates"]):
        raise SearchError(f"{where}: key 'candidates' must be a list of objects with a 'model_id'")
    if not isinstance(doc["label"], str) or not doc["label"]:
        raise SearchError(f"{where}: key 'label' must be a non-empty string")
    return dict(doc)


def read_result(path: str | Path) -> dict:
    """A search's result.json, checked; SearchError naming the file and key."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise SearchError(f"{path}: search result not found") from None
    except (OSError, ValueError) as e:
        raise SearchError(f"{path}: not a readable search result ({e})") from None
    return check_result(doc, str(path))


__all__ = ["FORMAT", "check_result", "read_result", "result_doc", "write_result"]
