# Evaluation JSONs -> results/tables/scores.parquet -> leaderboard tables, markdown and report.
# `mergesweep leaderboard` regenerates everything downstream of scores.parquet by itself.


rule provenance:
    input:
        [model_dir(m) for m in [PLAN.base, *PLAN.experts]],
    output:
        "results/tables/provenance.json",
    localrule: True
    run:
        from mergesweep.atomic import write_json
        from mergesweep.plan import provenance

        write_json(output[0], provenance(config, PLAN))


rule aggregate:
    input:
        evals=eval_jsons(),
        provenance="results/tables/provenance.json",
    output:
        report("results/tables/scores.parquet", caption="../report/scores.rst", category="Tables"),
    log:
        "results/logs/aggregate.log",
    shell:
        "{MS} aggregate --evals {input.evals} --provenance {input.provenance} --out {output} 2> {log}"


rule leaderboard:
    input:
        scores="results/tables/scores.parquet",
        provenance="results/tables/provenance.json",
    output:
        lb=report("results/tables/leaderboard.parquet", caption="../report/tables.rst", category="Tables"),
        sel="results/tables/selection.parquet",
        par="results/tables/pareto.parquet",
        md=report("results/leaderboard.md", caption="../report/leaderboard_md.rst", category="Leaderboard"),
        html=report("results/report/report.html", caption="../report/report_html.rst", category="Leaderboard"),
        bars=report("results/report/bars.png", caption="../report/bars.rst", category="Figures"),
        heat=report("results/report/heatmap.png", caption="../report/heatmap.rst", category="Figures"),
        sens=report("results/report/sensitivity.png", caption="../report/sensitivity.rst", category="Figures"),
        pareto=report("results/report/pareto.png", caption="../report/pareto.rst", category="Figures"),
    log:
        "results/logs/leaderboard.log",
    shell:
        "{MS} leaderboard --scores {input.scores} --provenance {input.provenance} --out-dir results 2> {log}"


rule lmc_table:
    input:
        [p for p in ALIGN_TARGETS if p.startswith("results/lmc/") and p.endswith(".json")],
    output:
        report("results/tables/lmc.parquet", caption="../report/tables.rst", category="Alignment"),
    log:
        "results/logs/lmc_table.log",
    shell:
        "{MS} lmc-table --lmc {input} --out {output} 2> {log}"
