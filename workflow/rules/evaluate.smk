# One lm-eval job per (model, suite) -> results/evals/<model_id>/<suite>.json.
# Base and experts are reference runs, computed once and shared by every merge.
# A failing suite writes status "error" into its JSON (the sweep goes on; the tables show it).


def eval_inputs(w):
    inputs = {"model": model_dir(w.model_id)}
    if w.suite not in PLAN.lm_eval_suites:
        inputs["tasks"] = f"resources/tasks/{w.suite}"
    return inputs


def lm_eval_args(suite):
    s = PLAN.lm_eval_suites[suite]
    args = f"--lm-eval-tasks {' '.join(s.tasks)}"
    if s.num_fewshot is not None:
        args += f" --num-fewshot {s.num_fewshot}"
    if s.unsafe_code:
        args += " --confirm-run-unsafe-code"
    return args


rule evaluate:
    input:
        unpack(eval_inputs),
    output:
        "results/evals/{model_id}/{suite}.json",
    params:
        tasks=lambda w, input: lm_eval_args(w.suite) if w.suite in PLAN.lm_eval_suites else f"--tasks-dir {input.tasks}",
        batch=EVAL.get("batch_size", 16),
        device=EVAL.get("device", "cpu"),
        limit=f"--limit {EVAL['limit']}" if EVAL.get("limit") else "",
        samples="--log-samples" if EVAL.get("log_samples") else "",
    # evaluation of a small model is dominated by per-process start-up: by default one thread per
    # job, so two jobs share a 2-core machine (evaluation.threads overrides)
    threads: int(EVAL.get("threads", 1))
    resources:
        mem_mb=4000,
    log:
        "results/logs/evaluate/{model_id}/{suite}.log",
    shell:
        "{MS} evaluate --model {input.model} --suite {wildcards.suite} {params.tasks}"
        " --batch-size {params.batch} --device {params.device} {params.limit} {params.samples}"
        " --threads {threads} --out {output} 2> {log}"
