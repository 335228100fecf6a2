# Shared helpers: the sweep plan (from the library) and input functions.
import json
import sys

from mergesweep.errors import MergesweepError
from mergesweep.plan import build_plan, config_hash

try:
    PLAN = build_plan(config)
except MergesweepError as err:
    sys.exit(f"config error: {err}")

# the CLI, run by the interpreter that runs Snakemake (no PATH assumptions, same on SLURM nodes)
MS = f"{sys.executable} -m mergesweep"
THREADS = int(config.get("threads", 2))
EVAL = config.get("evaluation", {})
MERGE_CFG = config.get("merge", {})
SIZES = config["suites"].get("sizes", {})
HELDOUT_SIZES = config["suites"].get("heldout_sizes", {})
FETCHED_EXPERTS = [n for n, e in PLAN.experts.items() if e["source"]]
TRAINED_EXPERTS = [n for n, e in PLAN.experts.items() if not e["source"]]
DATA_SUITES = PLAN.skills + PLAN.heldout


def _alt(names):
    return "|".join(map(re.escape, names)) if names else "(?!x)x"


import re

wildcard_constraints:
    suite=_alt(PLAN.suites),
    data_suite=_alt(DATA_SUITES),
    expert=_alt(TRAINED_EXPERTS),
    fetched=_alt(FETCHED_EXPERTS),
    merge_id=_alt(list(PLAN.merges)),
    model_id=_alt(PLAN.models),


def model_dir(model_id):
    return PLAN.model_dir(model_id)


def eval_jsons():
    return [f"results/evals/{m}/{s}.json" for m in PLAN.models for s in PLAN.suites]


def shell_json(obj):
    """Quote a mapping for the shell (single quotes; JSON never contains them unescaped here)."""
    return "'" + json.dumps(obj, sort_keys=True).replace("'", "'\\''") + "'"
