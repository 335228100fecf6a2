# LoRA experts and reversible merges.
# - extract_lora: a LoRA adapter extracted from a dense expert of the plan (experts[i].extract:
#   truncated SVD of its task vector per linear weight) -> resources/experts/<name>/.
# - revert: one task's adapter reconstructed from a reversible merge (RMM: basis + per-task
#   coefficients) -> results/reverted/<merge id>--<expert>/.
# - evaluate_reverted: a reverted task's model, evaluated on its expert's domain only (an adapter:
#   lm-eval's HF backend with peft=, over the base).


def _extract(w):
    return PLAN.experts[w.extracted]


rule extract_lora:
    input:
        base=PLAN.base.dir,
        expert=lambda w: model_dir(_extract(w).recipe["from"]),
    output:
        directory(L.trained_expert("{extracted}")),
    params:
        rank=lambda w: _extract(w).recipe["rank"],
        domain=lambda w: _extract(w).domain,
        uid=lambda w: _extract(w).uid,
    priority: PRIORITY["finetune"]
    resources:
        **RES.of("merge"),
    log:
        L.log("extract_lora", "{extracted}"),
    shell:
        "{MS} lora-extract --base {input.base:q} --expert {input.expert:q} --rank {params.rank}"
        " --name {wildcards.extracted:q} --domain {params.domain:q} --uid {params.uid:q}"
        " --out {output:q} 2> {log:q}"


def _reverted(w):
    if w.reverted not in PLAN.reverted:
        raise ValueError(f"{w.reverted} is not a reverted model of this plan (its config changed?)")
    return PLAN.reverted[w.reverted]


rule revert:
    input:
        merged=lambda w: PLAN.merges[_reverted(w).merge].dir,
        base=PLAN.base.dir,
    output:
        directory(L.reverted_model("{reverted}")),
    params:
        task=lambda w: _reverted(w).expert,
    priority: PRIORITY["merge"]
    resources:
        **RES.of("merge"),
    log:
        L.log("revert", "{reverted}"),
    shell:
        "{MS} revert --merged {input.merged:q} --task {params.task:q} --base {input.base:q}"
        " --model-id {wildcards.reverted:q} --out {output:q} 2> {log:q}"


rule evaluate_reverted:
    input:
        model=ancient(L.reverted_model("{reverted}")),
        base=PLAN.base.dir,
        tasks=GEN_TASKS,
        spec=L.eval_spec,
        datasets=EVAL_DATASETS,
    output:
        # its expert's domain only (PLAN.model_suites): the task it was reverted for
        L.eval_json("{reverted}", "{domain}"),
    threads: EVAL_THREADS
    priority: PRIORITY["evaluate_merged"]
    resources:
        # one suite: the time limit of a one-suite evaluation job
        **RES.of("evaluate", units=1),
    log:
        L.log("evaluate", "{reverted}", "{domain}"),
    shell:
        "{MS} evaluate --model {input.model:q} --base {input.base:q} --spec {input.spec:q}"
        " --suites {wildcards.domain:q} --threads {threads} --out {output:q} 2> {log:q}"
