# mergesweep: fetch -> finetune -> (align) -> merge -> evaluate -> aggregate.
# Thin on purpose: every rule calls the `mergesweep` CLI; the plan (which merges, which ids)
# comes from mergesweep.plan. Run: snakemake --cores 2   (or --profile profiles/slurm)
import os

from snakemake.utils import min_version, validate

min_version("8.20")


# The embedded default, unless a config was given (--configfile / --config): presets are whole
# configs, not overlays, so they are never deep-merged into the default.
if not config:

    configfile: os.path.join(workflow.basedir, "config", "config.yaml")


validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/align.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/aggregate.smk"


rule all:
    input:
        "results/tables/scores.parquet",
        "results/leaderboard.md",
        "results/report/report.html",
        ALIGN_TARGETS,
        ["results/tables/lmc.parquet"] if ALIGN_TARGETS else [],
    default_target: True
