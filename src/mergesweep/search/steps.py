"""The two jobs a search adds to the workflow, as library functions over the plan.

* :func:`plan_generation` (Snakemake checkpoint ``search_generation``): generation ``g`` of a
  search from generation ``g-1``'s file and the evaluation JSONs of its proposals (validation
  rows only, read by the aggregate's own reader :func:`mergesweep.aggregate.scores.build_scores`);
  generation 0 needs only the experts' validation scores (the objective's normalisation).
* :func:`write_search_result` (rule ``search_result``): the finished search's ``result.json``
  (:mod:`mergesweep.search.results`) from its generation files and the plan's merge ids.

Both are also what ``mergesweep search-step`` runs by hand. Generation files are written
atomically and are a pure function of their inputs: re-running a job after a kill rewrites the
same file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mergesweep.search.base import SearchError
from mergesweep.search.driver import plan_generation as _plan_generation
from mergesweep.search.observations import Observation, observations_from_scores, reference_scores
from mergesweep.search.results import result_doc, write_result
from mergesweep.search.state import Generation, generation_path, load_all, load_generation

log = logging.getLogger(__name__)


def _validation_table(paths: list[str]):
    """The scores rows of ``paths`` (evaluation JSONs), through the aggregate's reader; the
    strategies' reader (observations_from_scores) keeps the validation rows only."""
    from mergesweep.aggregate.scores import build_scores

    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise SearchError(f"{missing[0]}: evaluation missing ({len(missing)} of {len(paths)} files)")
    return build_scores(paths)


def reference_of(plan, search_id: str) -> dict[str, float] | None:
    """The objective suites' expert validation scores (None: the objective is not normalised)."""
    s = plan.searches[search_id]
    if not s.reference:
        return None
    L = plan.layout
    table = _validation_table([L.eval_json(e, q) for q, e in s.reference.items()])
    ref = reference_scores(table, dict(s.reference))
    missing = [q for q in s.reference if q not in ref]
    if missing:
        q = missing[0]
        raise SearchError(f"{L.eval_json(s.reference[q], q)}: expert '{s.reference[q]}' has no validation score on "
                          f"suite '{q}' (its evaluation failed?); search[{s.entry}]'s objective is normalised by it")
    return ref


def observations_of(plan, search_id: str, generation: int, strategy) -> list[Observation]:
    """The validation observations of generation ``generation``'s proposals (one per proposal)."""
    s = plan.searches[search_id]
    gen = load_generation(generation_path(s.dir, generation))
    ids = plan.search_generation_ids(search_id, generation)
    unique = list(dict.fromkeys(ids))
    suites = list(strategy.objective.suites)
    table = _validation_table([plan.layout.eval_json(m, q) for m in unique for q in suites])
    params = {m: p.params for m, p in zip(ids, gen.proposals)}
    seen = {o.model_id: o.scores for o in observations_from_scores(table, {m: params[m] for m in unique}, suites)}
    return [Observation(p.params, seen.get(m, {}), m) for p, m in zip(gen.proposals, ids)]


def plan_generation(plan, search_id: str, generation: int) -> Generation:
    """Write generation ``generation`` of a search (see the module docstring); returns it."""
    s = plan.searches[search_id]
    strategy = plan.search_strategy(search_id, reference_of(plan, search_id))
    observations = [] if generation == 0 else observations_of(plan, search_id, generation - 1, strategy)
    gen = _plan_generation(strategy, s.dir, generation, observations)
    log.info("search %s (%s): generation %d proposes %d candidate(s)%s", s.label, search_id, generation,
             len(gen.proposals), "; finished" if gen.done else "")
    return gen


def write_search_result(plan, search_id: str, out: str | Path) -> dict:
    """Write a finished search's result.json to ``out``; returns the document."""
    s = plan.searches[search_id]
    gens = load_all(s.dir)
    if not gens or not gens[-1].done:
        raise SearchError(f"{s.dir}: search '{s.label}' is not finished (its last generation proposes candidates)")
    strategy = plan.search_strategy(search_id, reference_of(plan, search_id))
    ids = [plan.search_generation_ids(search_id, g.generation) for g in gens]
    doc = result_doc(strategy, gens, ids, label=s.label, search_id=search_id, method=s.method,
                     experts=list(s.experts))
    write_result(out, doc)
    return doc


__all__ = ["observations_of", "plan_generation", "reference_of", "write_search_result"]
