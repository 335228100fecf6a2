# One lm-eval job per (model, suite) -> results/evals/<model_id>/<suite>.json.
# Base and experts are reference runs (rule evaluate), computed once and shared by every merge;
# merged models are evaluated by evaluate_merged (generated suites: plain patterns, no per-job
# Python function, since a sweep has thousands of these jobs) and evaluate_merged_lm_eval.
# A job that cannot run (model missing, bad argument, out of memory) exits non-zero and is
# retried; a task-level failure after the model loaded is recorded as status "error".

EVAL_OPTIONS = [
    "--batch-size", str(EVAL["batch_size"]), "--device", EVAL["device"],
    *(["--limit", str(EVAL["limit"])] if EVAL["limit"] else []),
    *(["--log-samples"] if EVAL["log_samples"] else []),
]


def _suite_args(suite):
    """The task arguments of a suite: generated suites read their task YAMLs, lm-eval suites name tasks."""
    if suite not in PLAN.lm_eval_suites:
        return ["--tasks-dir", L.tasks(suite)]
    s = PLAN.lm_eval_suites[suite]
    args = ["--lm-eval-tasks", *s.tasks]
    if s.num_fewshot is not None:
        args += ["--num-fewshot", str(s.num_fewshot)]
    if s.unsafe_code:
        args.append("--confirm-run-unsafe-code")
    return args


SUITE_ARGS = {s: _suite_args(s) for s in PLAN.suites}
SUITE_INPUTS = {s: [] if s in PLAN.lm_eval_suites else [L.tasks(s)] for s in PLAN.suites}


def _suite_inputs(w):
    return SUITE_INPUTS[w.suite]


rule evaluate:
    input:
        model=lambda w: model_dir(w.reference),
        tasks=_suite_inputs,
    output:
        L.eval_json("{reference}", "{suite}"),
    wildcard_constraints:
        reference=_alt([PLAN.base.name, *PLAN.experts]),
    params:
        tasks=lambda w: SUITE_ARGS[w.suite],
        options=EVAL_OPTIONS,
    # evaluation of a small model is dominated by per-process start-up: by default one thread per
    # job, so two jobs share a 2-core machine (evaluation.threads overrides)
    threads: EVAL["threads"]
    resources:
        mem_mb=4000,
    log:
        L.log("evaluate", "{reference}", "{suite}"),
    shell:
        "{MS} evaluate --model {input.model:q} --suite {wildcards.suite:q} {params.tasks:q} {params.options:q}"
        " --threads {threads} --out {output:q} 2> {log:q}"


rule evaluate_merged:
    input:
        model=L.merged_model("{merge_id}"),
        tasks=L.tasks("{gen_suite}"),
    output:
        L.eval_json("{merge_id}", "{gen_suite}"),
    wildcard_constraints:
        gen_suite=_alt(PLAN.data_suites),
    params:
        options=EVAL_OPTIONS,
    threads: EVAL["threads"]
    resources:
        mem_mb=4000,
    log:
        L.log("evaluate", "{merge_id}", "{gen_suite}"),
    shell:
        "{MS} evaluate --model {input.model:q} --suite {wildcards.gen_suite:q} --tasks-dir {input.tasks:q}"
        " {params.options:q} --threads {threads} --out {output:q} 2> {log:q}"


rule evaluate_merged_lm_eval:
    input:
        model=L.merged_model("{merge_id}"),
    output:
        L.eval_json("{merge_id}", "{lm_suite}"),
    wildcard_constraints:
        lm_suite=_alt(list(PLAN.lm_eval_suites)),
    params:
        tasks=lambda w: SUITE_ARGS[w.lm_suite],
        options=EVAL_OPTIONS,
    threads: EVAL["threads"]
    resources:
        mem_mb=4000,
    log:
        L.log("evaluate", "{merge_id}", "{lm_suite}"),
    shell:
        "{MS} evaluate --model {input.model:q} --suite {wildcards.lm_suite:q} {params.tasks:q} {params.options:q}"
        " --threads {threads} --out {output:q} 2> {log:q}"
