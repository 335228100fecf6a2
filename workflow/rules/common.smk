# The plan and the lookups every rule uses. Rules only look things up here: every path comes from
# the plan's Layout (mergesweep.layout), every job and id from the plan (mergesweep.plan).
# Every config value that reaches a shell command is validated by the schema and quoted with
# Snakemake's `:q` format (shlex.quote) in the command.
import sys

from mergesweep.errors import MergesweepError
from mergesweep.plan import build_plan

try:
    PLAN = build_plan(config)
except MergesweepError as err:
    sys.exit(f"config error: {err}")

L = PLAN.layout
# the CLI, run by the interpreter that runs Snakemake (no PATH assumptions, same on SLURM nodes)
MS = f"{sys.executable} -m mergesweep"
THREADS = PLAN.threads
EVAL = PLAN.evaluation
# A name or id as Snakemake matches it in a path. Generic on purpose: listing every id makes
# Snakemake scan a huge alternation each time it fills in wildcards (see benchmarks/bench_dryrun.py);
# input functions look the id up in the plan and fail naming it when it is not planned.
ID = "[A-Za-z0-9][A-Za-z0-9_.-]*"


def _alt(names):
    import re

    return "|".join(map(re.escape, names)) if names else "(?!x)x"


wildcard_constraints:
    suite=_alt(PLAN.suites),
    data_suite=_alt(PLAN.data_suites),
    expert=_alt(PLAN.trained_experts),
    fetched=_alt([c.name for c in PLAN.fetched]),
    merge_id=ID,
    model_id=ID,


def model_dir(model_id):
    return PLAN.model_dir(model_id)
