# mergesweep: fetch -> finetune -> (align, stats) -> merge -> evaluate -> aggregate.
# Thin on purpose: every rule calls the `mergesweep` CLI; every job, path and id comes from the
# plan (mergesweep.plan), built once from the validated config in workflow/rules/common.smk.
# Run: snakemake --cores 2   (or --profile profiles/slurm)
import os
import sys

from snakemake.utils import min_version

from mergesweep.config import load_config_file
from mergesweep.errors import MergesweepError

min_version("8.20")


# The embedded default, unless a config file was given (--configfile): presets are whole configs,
# not overlays, so they are never deep-merged into the default. Values given with --config (on
# the command line or by a profile, e.g. keep_models=selected) are laid over either.
if "name" not in config:
    try:
        _default = load_config_file(os.path.join(workflow.basedir, "config", "config.yaml"))
    except MergesweepError as err:
        sys.exit(f"config error: {err}")
    _overlay = dict(config)
    config.clear()
    config.update(_default)
    config.update(_overlay)


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/align.smk"
include: "workflow/rules/stats.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/lora.smk"
include: "workflow/rules/search.smk"
include: "workflow/rules/aggregate.smk"


if workflow.is_main_process and not workflow.remote_exec:
    # what the sweep will write, before it starts (also in a dry run)
    print(f"mergesweep: {len(PLAN.models)} models ({len(PLAN.merges)} merged), {len(PLAN.suites)} suites; "
          f"{RES.disk_summary()}", file=sys.stderr)


rule all:
    input:
        # the base and experts, and the merged models keep_models keeps: a deleted one is rebuilt
        [c.dir for c in (PLAN.base, *PLAN.experts.values())],
        kept_models,
        L.table("scores"),
        *L.leaderboard_outputs().values(),
        ALIGN_TARGETS,
        # each search's result: a target of its own (what depends on a checkpoint is not re-checked
        # until the checkpoint ran, so a search added to a finished run must be asked for here)
        SEARCH_RESULTS,
        [L.table("lmc")] if ALIGN_TARGETS else [],
    default_target: True
