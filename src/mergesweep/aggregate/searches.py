"""Searches (MAP, CMA-ES, CycleQD over a base merge method's parameters) in the aggregation.

The workflow lists a run's searches in ``results/evaluation_models.json`` (two optional keys):

* ``searches``: ``[{"label": "map:task_arithmetic", "id": <search id>, "result": <path of the
  search's result.json>}, ...]`` (paths relative to the working directory);
* ``search_only``: the merged model ids that only a search planned (not the config's ``merges:``
  grid); every one of them is in ``models`` and is some search's candidate.

``mergesweep aggregate`` reads each result.json (:func:`mergesweep.search.results.read_result`),
checks that every candidate is a listed model, and embeds a small summary of every search
(:func:`summarise`) in ``scores.parquet``'s schema metadata, under :data:`SEARCHES_KEY`, next to
the provenance; :func:`read_searches` reads it back, so ``mergesweep leaderboard`` needs nothing
but scores.parquet. A table written without searches (or by an older version) has none.

The summary holds what the leaderboard and the report show, and no test score (a search never
sees one): label, id, strategy, base method, experts, objective, budget, seed, the number of
generation files, every candidate's model id, generation, ``info`` and validation objective, the
convergence per generation, and for MAP the predicted front (each point's predicted validation
score per suite) and the predicted-vs-measured summary per suite.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mergesweep.aggregate.scores import SEARCHES_KEY, EvalFileError, ScoresError

#: version of the embedded document
FORMAT = 1
#: the keys every embedded search has
SEARCH_FIELDS = ("label", "id", "strategy", "method", "experts", "objective", "budget", "seed", "generations",
                 "result_file", "candidates", "convergence", "front")


def no_searches() -> dict:
    """The embedded document of a run without searches."""
    return {"format": FORMAT, "searches": [], "search_only": []}


def _number(v) -> float | None:
    """``v`` as a float when it is a finite number, else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(float(v)) else None


def _front(result: Any) -> dict | None:
    """MAP's part of a strategy result: the objective suites (``tasks``), the predicted front as
    one ``{suite: predicted validation score}`` per point, and the predicted-vs-measured summary
    per suite (``{n, rmse, max_abs_error, loo_rmse, within_2_loo}``). None for another strategy
    or a MAP search that did not get to its front."""
    if not isinstance(result, Mapping) or result.get("strategy") != "map":
        return None
    front = result.get("predicted_front")
    if not isinstance(front, list):
        return None
    tasks = [str(t) for t in (result.get("tasks") or [])]
    predicted = []
    for p in front:
        pred = p.get("predicted") if isinstance(p, Mapping) else None
        if isinstance(pred, Mapping):
            predicted.append({str(k): _number(v) for k, v in pred.items()})
    report = result.get("report")
    summary = report.get("summary") if isinstance(report, Mapping) else None
    keep = ("n", "rmse", "max_abs_error", "loo_rmse", "within_2_loo")
    summary = ({str(s): {k: _number(v.get(k)) if isinstance(v, Mapping) else None for k in keep}
                for s, v in summary.items()} if isinstance(summary, Mapping) else None)
    return {"tasks": tasks, "predicted": predicted, "summary": summary}


def summarise(entry: Mapping[str, str], result: Mapping[str, Any]) -> dict:
    """The embedded summary of one search: the fields of :data:`SEARCH_FIELDS` from its
    evaluation_models.json entry (``label``, ``id``, ``result``) and its result document."""
    candidates = [{"model_id": c["model_id"], "generation": c.get("generation"),
                   "info": dict(c.get("info") or {}), "objective": _number(c.get("objective"))}
                  for c in result["candidates"]]
    convergence = [{"generation": g.get("generation"), "n": g.get("n"), "best": _number(g.get("best")),
                    "best_so_far": _number(g.get("best_so_far"))}
                   for g in (result.get("convergence") or []) if isinstance(g, Mapping)]
    return {"label": entry["label"], "id": entry["id"], "strategy": str(result["strategy"]),
            "method": str(result["method"]), "experts": list(result.get("experts") or []),
            "objective": result.get("objective"), "budget": result.get("budget"), "seed": result.get("seed"),
            "generations": result.get("generations"), "result_file": entry["result"],
            "candidates": candidates, "convergence": convergence, "front": _front(result.get("result"))}


def _entry_error(path: Path, key: str, message: str) -> EvalFileError:
    return EvalFileError(f"{path}: key '{key}' {message}")


def read_searches_list(path: str | Path, models: Sequence[str]) -> dict | None:
    """The searches a models list names (its optional keys ``searches`` and ``search_only``), as
    the document :func:`write_scores` embeds: ``{"format", "searches": [summary, ...],
    "search_only": [...]}``; None when the file has neither key (or is not JSON: a text list of
    models has no searches).

    Raises :class:`EvalFileError` naming the file and the key for: a key of the wrong type; an
    entry without a non-empty ``label``, ``id`` or ``result``; a label or id given twice; a result
    file that is missing or unreadable (:func:`mergesweep.search.results.read_result`) or whose
    label/id differ from the entry's; a candidate that ``models`` does not list; a
    ``search_only`` id that ``models`` does not list or that is no search's candidate."""
    from mergesweep.search.base import SearchError
    from mergesweep.search.results import read_result

    path = Path(path)
    if path.suffix != ".json":
        return None
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise EvalFileError(f"{path}: models list not found") from None
    except (OSError, ValueError) as e:
        raise EvalFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, Mapping) or ("searches" not in doc and "search_only" not in doc):
        return None
    listed = set(models)
    entries = doc.get("searches")
    if entries is None:
        entries = []
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        raise _entry_error(path, "searches", "must be a list of objects {label, id, result}")
    searches, labels, ids = [], {}, {}
    for i, e in enumerate(entries):
        key = f"searches[{i}]"
        for k in ("label", "id", "result"):
            if not isinstance(e.get(k), str) or not e.get(k):
                raise _entry_error(path, f"{key}.{k}", "must be a non-empty string")
        unknown = sorted(set(e) - {"label", "id", "result"})
        if unknown:
            raise _entry_error(path, f"{key}.{unknown[0]}", "is not a key of a search entry (label, id, result)")
        for k, seen in (("label", labels), ("id", ids)):
            if e[k] in seen:
                raise _entry_error(path, f"{key}.{k}", f"repeats {e[k]!r} of searches[{seen[e[k]]}]")
            seen[e[k]] = i
        try:
            result = read_result(e["result"])
        except SearchError as err:
            raise _entry_error(path, f"{key}.result", f"names an unusable search result: {err}") from None
        for k in ("label", "id"):
            if result.get(k) != e[k]:
                raise _entry_error(path, f"{key}.{k}", f"is {e[k]!r} but {e['result']} says {result.get(k)!r}")
        for c in result["candidates"]:
            if c["model_id"] not in listed:
                raise _entry_error(path, f"{key}.result",
                                   f"names {e['result']}, whose candidate {c['model_id']!r} key 'models' does not list")
        searches.append(summarise(e, result))
    only = doc.get("search_only")
    if only is None:
        only = []
    if not isinstance(only, list) or not all(isinstance(m, str) and m for m in only):
        raise _entry_error(path, "search_only", "must be a list of non-empty model ids")
    candidates = {c["model_id"] for s in searches for c in s["candidates"]}
    for j, m in enumerate(only):
        if m not in listed:
            raise _entry_error(path, f"search_only[{j}]", f"names model {m!r}, which key 'models' does not list")
        if m not in candidates:
            raise _entry_error(path, f"search_only[{j}]", f"names model {m!r}, which is no candidate of a search "
                                                          "in key 'searches'")
    if len(set(only)) != len(only):
        raise _entry_error(path, "search_only", "lists a model twice")
    return {"format": FORMAT, "searches": searches, "search_only": list(only)}


def check_candidates(doc: Mapping | None, scores: pd.DataFrame, where: str) -> None:
    """Every search candidate of ``doc`` is a merged model of the scores table, of the search's
    base method. Raises :class:`EvalFileError` naming ``where`` (the models list), the search's
    key and the model."""
    if not doc:
        return
    first = scores.drop_duplicates("model_id").set_index("model_id")
    for i, s in enumerate(doc["searches"]):
        for c in s["candidates"]:
            m = c["model_id"]
            role = first.at[m, "role"] if m in first.index else None
            if role != "merged":
                raise EvalFileError(f"{where}: key 'searches[{i}]' ({s['label']}): candidate {m!r} is "
                                    + ("not in the scores" if role is None else f"a {role} model, not a merge"))
            method = first.at[m, "method"]
            if method != s["method"]:
                raise EvalFileError(f"{where}: key 'searches[{i}]' ({s['label']}): candidate {m!r} was merged with "
                                    f"{method!r}, not the search's method {s['method']!r}")


def check_embedded(doc: Any, where: str) -> dict:
    """An embedded searches document, checked (ScoresError naming ``where`` and the key)."""
    if not isinstance(doc, Mapping) or doc.get("format") != FORMAT:
        raise ScoresError(f"{where}: metadata key {SEARCHES_KEY.decode()!r} is not a searches document of "
                          f"format {FORMAT}")
    searches, only = doc.get("searches"), doc.get("search_only")
    if not isinstance(searches, list) or not isinstance(only, list):
        raise ScoresError(f"{where}: metadata key {SEARCHES_KEY.decode()!r} lacks its 'searches' or 'search_only' list")
    for i, s in enumerate(searches):
        missing = [k for k in SEARCH_FIELDS if not isinstance(s, Mapping) or k not in s]
        if missing:
            raise ScoresError(f"{where}: metadata key {SEARCHES_KEY.decode()!r}: searches[{i}] lacks "
                              f"{', '.join(missing)}")
    return {"format": FORMAT, "searches": [dict(s) for s in searches], "search_only": [str(m) for m in only]}


def read_searches(path: str | Path) -> dict:
    """The searches embedded in a scores.parquet (:func:`read_searches_list`'s document, checked);
    :func:`no_searches` for a table without them. Reads the schema only."""
    path = Path(path)
    try:
        meta = pq.read_schema(path).metadata or {}
    except FileNotFoundError:
        raise ScoresError(f"{path}: scores table not found (run 'mergesweep aggregate' first)") from None
    except (pa.ArrowException, OSError) as e:
        raise ScoresError(f"{path}: not a readable parquet file ({e})") from None
    if SEARCHES_KEY not in meta:
        return no_searches()
    try:
        doc = json.loads(meta[SEARCHES_KEY])
    except ValueError as e:
        raise ScoresError(f"{path}: metadata key {SEARCHES_KEY.decode()!r} is not valid JSON ({e})") from None
    return check_embedded(doc, str(path))
