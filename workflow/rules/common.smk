# The plan and the lookups every rule uses. Rules only look things up here: every path comes from
# the plan's Layout (mergesweep.layout), every job and id from the plan (mergesweep.plan).
# Every config value that reaches a shell command is validated by the schema and quoted with
# Snakemake's `:q` format (shlex.quote) in the command.
import sys

from mergesweep.errors import MergesweepError
from mergesweep.ids import MERGE_ID_PATTERN
from mergesweep.plan import build_plan
import mergesweep.resources as _resources

try:
    PLAN = build_plan(config)
except MergesweepError as err:
    sys.exit(f"config error: {err}")

L = PLAN.layout
# per-rule GPUs, time and memory (from the config and the base's size): mergesweep.resources
RES = _resources.Resources(PLAN)
# the CLI, run by the interpreter that runs Snakemake (no PATH assumptions, same on SLURM nodes)
MS = f"{sys.executable} -m mergesweep"
THREADS = PLAN.threads
EVAL = PLAN.evaluation
TRAIN = PLAN.config["training"]  # device and precision of pretrain_base and finetune
# Snakemake runs ready jobs of higher priority first: the critical path (base -> fine-tunes ->
# merges -> their evaluations) before the reference evaluations, which fill the gaps
PRIORITY = {"fetch": 100, "finetune": 80, "merge": 60, "evaluate_merged": 40}
# A merged model's id as Snakemake matches it in a path: the id's shape, not a list of every id
# (Snakemake scans a wildcard's pattern each time it fills one in; an alternation of 10k ids
# made dry runs 1.6-2x slower, see benchmarks/bench_dryrun.py). Base and expert names never
# have this shape (the plan rejects them), so paths are unambiguous; an id that has the shape
# but is not planned fails in the merge rule's input function, naming it.


def _alt(names):
    import re

    return "|".join(map(re.escape, names)) if names else "(?!x)x"


wildcard_constraints:
    suite=_alt(PLAN.suites),
    data_suite=_alt(PLAN.data_suites),
    expert=_alt(PLAN.trained_experts),
    extracted=_alt(PLAN.extracted_experts),
    reverted=_alt(list(PLAN.reverted)),
    domain=_alt(PLAN.suites),
    fetched=_alt([c.name for c in PLAN.fetched]),
    merge_id=MERGE_ID_PATTERN,


def model_dir(model_id):
    return PLAN.model_dir(model_id)


def plan_document(path, doc):
    """``doc`` (a JSON-able mapping the plan derives) as a rule's params; when its file ``path``
    holds another document, it is rewritten now (atomically), so everything that reads it is older
    than its input and runs again - also where Snakemake has no record of the old params (results/
    copied or rsynced without .snakemake/). A missing file is left to its rule. Only the
    submitting process does this."""
    import json as _json
    import os as _os

    text = _json.dumps(doc, sort_keys=True)
    if workflow.is_main_process and not workflow.remote_exec and _os.path.exists(path):
        try:
            with open(path) as f:
                same = _json.dumps(_json.load(f), sort_keys=True) == text
        except (OSError, ValueError):
            same = False
        if not same:
            from mergesweep.atomic import write_json

            write_json(path, _json.loads(text))
    return text
