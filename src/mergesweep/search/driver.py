"""Planning one generation from the files on disk, and a whole search loop (for tests and for
anything that evaluates in-process).

:func:`plan_next` is what one Snakemake checkpoint job calls: it reads the last generation file
of the search directory, hands the strategy that generation's state and the observations of its
proposals (validation scores only), and writes the next generation file. It is idempotent in
the sense that matters for a killed workflow: nothing is written until the new file is complete
(atomic rename), and re-running it after a kill recomputes the same file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from mergesweep.search.base import Proposal, SearchError, Strategy
from mergesweep.search.observations import Observation
from mergesweep.search.state import (Generation, check_config, generation_path, load_generation, resume,
                                     save_generation)


def plan_next(strategy: Strategy, directory: str | Path, observations: Sequence[Observation] = ()) -> Generation:
    """Plan and write the next generation of ``strategy`` in ``directory``.

    With no generation file yet, this is generation 0 (``observations`` must be empty). Else the
    last generation's proposals must each have an observation. Returns the written generation
    (``done`` when it proposes nothing). Planning past a finished search is a SearchError."""
    last = resume(directory)
    return plan_generation(strategy, directory, 0 if last is None else last.generation + 1, observations)


def plan_generation(strategy: Strategy, directory: str | Path, index: int,
                    observations: Sequence[Observation] = ()) -> Generation:
    """Plan and write generation ``index`` from generation ``index - 1``'s file (whatever
    follows it on disk is ignored and, for ``index``, overwritten): what a workflow job re-run
    after a kill does, writing the same file again."""
    config = strategy.config()
    if index == 0:
        if observations:
            raise SearchError(f"{directory}: no generation yet, so there is nothing to observe "
                              f"({len(observations)} observation(s) given)")
        state = strategy.initial_state()
    else:
        last = load_generation(generation_path(directory, index - 1))
        check_config(last, strategy.name, config)
        if last.done:
            raise SearchError(f"{last.path}: the search is finished (generation {last.generation} proposed nothing)")
        state = last.state
    proposals, new_state = strategy.propose(state, list(observations))
    gen = Generation(strategy=strategy.name, generation=index, seed=strategy.seed, config=config,
                     observations=list(observations), proposals=list(proposals), state=new_state)
    save_generation(directory, gen)
    return gen


def run_loop(
    strategy: Strategy,
    evaluate: Callable[[list[Proposal]], list[Observation]],
    directory: str | Path,
    max_generations: int | None = None,
) -> Generation:
    """Run (or resume) a search to its end: plan a generation, evaluate its proposals, repeat.
    ``evaluate`` gets a generation's proposals and returns their observations. Returns the last
    generation (``max_generations`` stops earlier, e.g. to simulate a kill)."""
    count = 0
    while True:
        last = resume(directory)
        if last is not None and last.done:
            return last
        if max_generations is not None and count >= max_generations:
            return last
        observations = [] if last is None else list(evaluate(list(last.proposals)))
        plan_next(strategy, directory, observations)
        count += 1
