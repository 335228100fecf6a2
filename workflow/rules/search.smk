# Searches (config `search:`): each generation is a Snakemake checkpoint that writes
# results/search/<search id>/generation-NNNN.json from the previous generation's file and the
# validation scores of its candidates. A generation's candidates are ordinary plan merges (content
# ids: one seen before - in the grid, an earlier generation or another search - is neither merged
# nor evaluated again), built by rule merge and evaluated by rule evaluate_merged like any other.
# A generation proposing nothing ends the search; rule search_result then writes its result.json.
# Killed and re-run, Snakemake finds the generation files and evaluations already made and goes
# on from there (the strategy's state and RNG are in each generation file).
# Planning a generation is cheap (no model is loaded): a local job, in the submitting process.


def search_generation_inputs(w):
    """Generation 0: the experts' evaluations (the objective's normalisation). Generation g > 0:
    generation g-1's file and its candidates' evaluations (registering them as plan merges)."""
    s = PLAN.searches[w.search]
    g = int(w.generation)
    out = {"reference": [L.eval_json(e, q) for q, e in s.reference.items()]}
    if g > 0:
        out["previous"] = checkpoints.search_generation.get(search=w.search, generation=f"{g - 1:04d}").output[0]
        ids = dict.fromkeys(PLAN.search_generation_ids(w.search, g - 1))
        out["evals"] = [L.eval_json(i, q) for i in ids for q in s.config["objective"]["suites"]]
    return out


checkpoint search_generation:
    input:
        unpack(search_generation_inputs),
    output:
        L.search_generation("{search}", "{generation}"),
    wildcard_constraints:
        search=_alt(list(PLAN.searches)),
        generation=r"\d\d\d\d+",
    localrule: True
    run:
        from mergesweep.search.steps import plan_generation

        plan_generation(PLAN, wildcards.search, int(wildcards.generation))


def search_generation_files(search):
    """Every generation file of a search, to the one proposing nothing (Snakemake plans each
    generation once the previous one's candidates are evaluated)."""
    files, g = [], 0
    while True:
        files.append(checkpoints.search_generation.get(search=search, generation=f"{g:04d}").output[0])
        if not PLAN.search_generation_ids(search, g):
            return files
        g += 1


rule search_result:
    input:
        lambda w: search_generation_files(w.search),
    output:
        L.search_result("{search}"),
    wildcard_constraints:
        search=_alt(list(PLAN.searches)),
    localrule: True
    run:
        from mergesweep.search.steps import write_search_result

        write_search_result(PLAN, wildcards.search, output[0])


SEARCH_RESULTS = [L.search_result(s) for s in PLAN.searches]


def search_candidate_jsons(w):
    """The evaluations of every search's candidates (known once the searches are finished)."""
    for s in PLAN.searches:
        search_generation_files(s)
    grid = set(GRID_EVAL_JSONS)
    return [f for f in PLAN.eval_jsons() if f not in grid]


# the evaluations of the plan's models without the searches (a separate input: they are in the
# DAG from the start, not only once the searches are finished)
GRID_EVAL_JSONS = PLAN.eval_jsons()
