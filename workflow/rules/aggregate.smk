# Evaluation JSONs -> results/tables/scores.parquet -> leaderboard tables, markdown and report.
# `mergesweep leaderboard` regenerates everything downstream of scores.parquet by itself.
import json

LB = L.leaderboard_outputs()
if PLAN.searches:
    from mergesweep.layout import SEARCH_FIGURES

    SEARCH_FIGURE_OUTPUTS = {f"fig_{name}": report(L.figure(name), caption="../report/search.rst", category="Figures")
                             for name in SEARCH_FIGURES}
else:
    SEARCH_FIGURE_OUTPUTS = {}


def kept_models(wildcards):
    """The merged models to keep on disk: every planned one (keep_models: all), each sweep's
    selected point once the leaderboard selected it (selected), none (none)."""
    if PLAN.keep_models == "all":
        return [m.dir for m in PLAN.merges.values()]
    if PLAN.keep_models == "none" or not PLAN.merges:
        return []
    from mergesweep.aggregate.outputs import selected_model_ids

    selection = checkpoints.leaderboard.get().output.sel
    return [PLAN.merges[i].dir for i in selected_model_ids(selection) if i in PLAN.merges]


rule provenance:
    input:
        [c.dir for c in (PLAN.base, *PLAN.experts.values())],
    output:
        L.provenance,
    localrule: True
    run:
        from mergesweep.atomic import write_json
        from mergesweep.plan import provenance

        write_json(output[0], provenance(PLAN))


# the plan's models and suites: a changed sweep rewrites the list, and so re-runs the aggregate
plan_document(L.eval_models, PLAN.eval_models_doc())


rule evaluation_models:
    input:
        # a search's candidates are known once it is finished
        SEARCH_RESULTS,
    output:
        L.eval_models,
    params:
        # without the searches' candidates (they come with the searches' results)
        doc=json.dumps(PLAN.eval_models_doc(candidates=False), sort_keys=True),
    localrule: True
    run:
        from mergesweep.atomic import write_json

        PLAN.load_searches()
        write_json(output[0], PLAN.eval_models_doc())


# the aggregate reads the planned models' evaluations from the evaluation directory (listed in
# L.eval_models): its command line does not grow with the sweep; `input:` still names every JSON
rule aggregate:
    input:
        evals=GRID_EVAL_JSONS,
        search_evals=search_candidate_jsons,
        # the searches' results: summarised into scores.parquet (the leaderboard's search groups)
        searches=SEARCH_RESULTS,
        models=L.eval_models,
        provenance=L.provenance,
    output:
        report(L.table("scores"), caption="../report/scores.rst", category="Tables"),
    params:
        evals_dir=L.evals_dir,
    resources:
        **RES.of("aggregate"),
    log:
        L.log("aggregate", "aggregate"),
    shell:
        "{MS} aggregate --evals-dir {params.evals_dir:q} --models {input.models:q} --provenance {input.provenance:q}"
        " --out {output:q} 2> {log:q}"


# a checkpoint: with keep_models: selected, the selection it writes decides which merged models
# are kept (rule all asks for them after it ran)
checkpoint leaderboard:
    input:
        scores=L.table("scores"),
        provenance=L.provenance,
    output:
        lb=report(LB["leaderboard"], caption="../report/tables.rst", category="Tables"),
        sel=LB["selection"],
        par=LB["pareto"],
        rev=LB["reversible"],
        md=report(LB["markdown"], caption="../report/leaderboard_md.rst", category="Leaderboard"),
        html=report(LB["report"], caption="../report/report_html.rst", category="Leaderboard"),
        bars=report(LB["fig_bars"], caption="../report/bars.rst", category="Figures"),
        heat=report(LB["fig_heatmap"], caption="../report/heatmap.rst", category="Figures"),
        sens=report(LB["fig_sensitivity"], caption="../report/sensitivity.rst", category="Figures"),
        pareto=report(LB["fig_pareto"], caption="../report/pareto.rst", category="Figures"),
        # with searches: their convergence and MAP's fronts (mergesweep.aggregate.figures.SEARCH_FIGURES)
        **SEARCH_FIGURE_OUTPUTS,
    params:
        out_dir=L.results,
    resources:
        **RES.of("aggregate"),
    log:
        L.log("aggregate", "leaderboard"),
    shell:
        "{MS} leaderboard --scores {input.scores:q} --provenance {input.provenance:q} --out-dir {params.out_dir:q}"
        " 2> {log:q}"


rule lmc_table:
    input:
        [job.lmc_json for job in PLAN.align_jobs.values()],
    output:
        report(L.table("lmc"), caption="../report/tables.rst", category="Alignment"),
    resources:
        **RES.of("aggregate"),
    log:
        L.log("aggregate", "lmc_table"),
    shell:
        "{MS} lmc-table --lmc {input:q} --out {output:q} 2> {log:q}"
