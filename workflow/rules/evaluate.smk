# lm-eval -> results/evals/<model_id>/<suite>.json, one JSON per (model, suite).
# By default one job per model (evaluation.jobs: per_model): the model is loaded once and every
# suite of the plan runs in that process; evaluation.jobs: per_suite gives one job per (model,
# suite) instead, for huge suites. Base and experts are reference runs (rule evaluate), computed
# once and shared by every merge; merged models are evaluated by evaluate_merged. Every job reads
# the evaluation spec (the plan's suites and options, rule evaluation_spec).
# A job that cannot run (model missing, bad argument, out of memory) exits non-zero and is
# retried; a task-level failure after the model loaded is recorded as status "error" for that
# suite only.
# Every job gets the plan's base (--base, an input; it is built before anything else anyway): a
# model that is a PEFT LoRA adapter (a LoRA expert, a LoRA-native merge) is evaluated over it with
# lm-eval's peft=, without a dense copy; a dense model ignores it.
import json


rule evaluation_spec:
    output:
        L.eval_spec,
    params:
        # a changed suite or option rewrites the spec, and so re-runs the evaluations
        doc=plan_document(L.eval_spec, PLAN.eval_spec_doc()),
    localrule: True
    run:
        from mergesweep.atomic import write_json

        write_json(output[0], json.loads(params.doc))


rule prefetch_datasets:
    # the lm-eval suites' datasets, fetched on the submitting host into the HF datasets cache
    # (HF_DATASETS_CACHE / HF_HOME as the user set them) before any evaluation job; the jobs
    # themselves run offline. A dataset that cannot be fetched stops here, naming task and dataset.
    input:
        spec=L.eval_spec,
    output:
        L.datasets_manifest,
    log:
        L.log("prefetch_datasets", "datasets"),
    localrule: True
    shell:
        "{MS} prefetch-datasets --spec {input.spec:q} --out {output:q} 2> {log:q}"


GEN_TASKS = [L.tasks(s) for s in PLAN.data_suites]  # generated suites' task YAMLs (directories)
# the prefetched datasets' manifest, when the plan has lm-eval suites
EVAL_DATASETS = [L.datasets_manifest] if PLAN.lm_eval_suites else []
EVAL_THREADS = RES.threads("evaluate", EVAL["threads"])
PER_SUITE = EVAL["jobs"] == "per_suite"
# per model: every suite's JSON is an output of the one job; per suite: {suite} is a wildcard
EVAL_SUITES = ["{suite}"] if PER_SUITE else PLAN.suites
EVAL_PICK = "--suites {wildcards.suite:q}" if PER_SUITE else ""
EVAL_LOG = ("{suite}",) if PER_SUITE else ()
EVAL_LOG_STAGE = "evaluate_suite" if PER_SUITE else "evaluate"  # logs/<stage>/<model>[/<suite>].log
# the same resources and command for reference and merged models
EVAL_RESOURCES = RES.of("evaluate", units=RES.eval_units())
EVAL_CMD = ("{MS} evaluate --model {input.model:q} --base {input.base:q} --spec {input.spec:q} " + EVAL_PICK +
            " --threads {threads} --out {output:q} 2> {log:q}")


rule evaluate:
    input:
        model=lambda w: model_dir(w.reference),
        base=PLAN.base.dir,
        tasks=GEN_TASKS,
        spec=L.eval_spec,
        datasets=EVAL_DATASETS,
    output:
        [L.eval_json("{reference}", s) for s in EVAL_SUITES],
    wildcard_constraints:
        reference=_alt([PLAN.base.name, *PLAN.experts]),
    threads: EVAL_THREADS
    resources:
        **EVAL_RESOURCES,
    log:
        L.log(EVAL_LOG_STAGE, "{reference}", *EVAL_LOG),
    shell:
        EVAL_CMD


rule evaluate_merged:
    input:
        # ancient: a merged model rebuilt from its recipe (same id, same bytes) is not a reason
        # to evaluate it again
        model=ancient(L.merged_model("{merge_id}")),
        # ancient: the base is the merges' input already; what changes it re-runs the merges
        base=ancient(PLAN.base.dir),
        tasks=GEN_TASKS,
        spec=L.eval_spec,
        datasets=EVAL_DATASETS,
    output:
        [L.eval_json("{merge_id}", s) for s in EVAL_SUITES],
    threads: EVAL_THREADS
    priority: PRIORITY["evaluate_merged"]
    resources:
        **EVAL_RESOURCES,
    log:
        L.log(EVAL_LOG_STAGE, "{merge_id}", *EVAL_LOG),
    shell:
        EVAL_CMD
