# One lm-eval job per (model, suite) -> results/evals/<model_id>/<suite>.json.
# Base and experts are reference runs, computed once and shared by every merge.
# A job that cannot run (model missing, bad argument, out of memory) exits non-zero and is
# retried; a task-level failure after the model loaded is recorded as status "error".


def eval_inputs(w):
    inputs = {"model": model_dir(w.model_id)}
    if w.suite not in PLAN.lm_eval_suites:
        inputs["tasks"] = L.tasks(w.suite)
    return inputs


def eval_task_args(w, input):
    if w.suite not in PLAN.lm_eval_suites:
        return ["--tasks-dir", input.tasks]
    s = PLAN.lm_eval_suites[w.suite]
    args = ["--lm-eval-tasks", *s.tasks]
    if s.num_fewshot is not None:
        args += ["--num-fewshot", str(s.num_fewshot)]
    if s.unsafe_code:
        args.append("--confirm-run-unsafe-code")
    return args


rule evaluate:
    input:
        unpack(eval_inputs),
    output:
        L.eval_json("{model_id}", "{suite}"),
    params:
        tasks=eval_task_args,
        batch=str(EVAL["batch_size"]),
        device=EVAL["device"],
        limit=["--limit", str(EVAL["limit"])] if EVAL["limit"] else [],
        samples=["--log-samples"] if EVAL["log_samples"] else [],
    # evaluation of a small model is dominated by per-process start-up: by default one thread per
    # job, so two jobs share a 2-core machine (evaluation.threads overrides)
    threads: EVAL["threads"]
    resources:
        mem_mb=4000,
    log:
        L.log("evaluate", "{model_id}", "{suite}"),
    shell:
        "{MS} evaluate --model {input.model:q} --suite {wildcards.suite:q} {params.tasks:q}"
        " --batch-size {params.batch:q} --device {params.device:q} {params.limit:q} {params.samples:q}"
        " --threads {threads} --out {output:q} 2> {log:q}"
