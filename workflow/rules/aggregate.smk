# Evaluation JSONs -> results/tables/scores.parquet -> leaderboard tables, markdown and report.
# `mergesweep leaderboard` regenerates everything downstream of scores.parquet by itself.
LB = L.leaderboard_outputs()


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


rule aggregate:
    input:
        evals=PLAN.eval_jsons(),
        provenance=L.provenance,
    output:
        report(L.table("scores"), caption="../report/scores.rst", category="Tables"),
    log:
        L.log("aggregate", "aggregate"),
    shell:
        "{MS} aggregate --evals {input.evals:q} --provenance {input.provenance:q} --out {output:q} 2> {log:q}"


rule leaderboard:
    input:
        scores=L.table("scores"),
        provenance=L.provenance,
    output:
        lb=report(LB["leaderboard"], caption="../report/tables.rst", category="Tables"),
        sel=LB["selection"],
        par=LB["pareto"],
        md=report(LB["markdown"], caption="../report/leaderboard_md.rst", category="Leaderboard"),
        html=report(LB["report"], caption="../report/report_html.rst", category="Leaderboard"),
        bars=report(LB["fig_bars"], caption="../report/bars.rst", category="Figures"),
        heat=report(LB["fig_heatmap"], caption="../report/heatmap.rst", category="Figures"),
        sens=report(LB["fig_sensitivity"], caption="../report/sensitivity.rst", category="Figures"),
        pareto=report(LB["fig_pareto"], caption="../report/pareto.rst", category="Figures"),
    params:
        out_dir=L.results,
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
    log:
        L.log("aggregate", "lmc_table"),
    shell:
        "{MS} lmc-table --lmc {input:q} --out {output:q} 2> {log:q}"
