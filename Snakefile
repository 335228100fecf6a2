# mergesweep: fetch -> finetune -> (align) -> merge -> evaluate -> aggregate.
# Thin on purpose: every rule calls the `mergesweep` CLI; every job, path and id comes from the
# plan (mergesweep.plan), built once from the validated config in workflow/rules/common.smk.
# Run: snakemake --cores 2   (or --profile profiles/slurm)
import os
import sys

from snakemake.utils import min_version

from mergesweep.config import load_config_file
from mergesweep.errors import MergesweepError

min_version("8.20")


# The embedded default, unless a config was given (--configfile / --config): presets are whole
# configs, not overlays, so they are never deep-merged into the default.
if not config:
    try:
        config.update(load_config_file(os.path.join(workflow.basedir, "config", "config.yaml")))
    except MergesweepError as err:
        sys.exit(f"config error: {err}")


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
        # every planned model: a deleted checkpoint or merged model is rebuilt
        [model_dir(m) for m in PLAN.models],
        L.table("scores"),
        *L.leaderboard_outputs().values(),
        ALIGN_TARGETS,
        [L.table("lmc")] if ALIGN_TARGETS else [],
    default_target: True
