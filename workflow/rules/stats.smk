# Statistics of data-aware merges (mergesweep.plan.StatsJob): one job per (model, kind,
# calibration data, settings), shared by every merge that reads it.
#   stats: Gram matrices of linear inputs (regmean), diagonal Fisher (fisher) of one expert on its
#          own domain's calibration data -> results/stats/<stats_id>/{stats.safetensors,stats.json}


def _stats_job(w):
    return PLAN.stats_jobs[w.stats_id]


rule stats:
    input:
        model=lambda w: model_dir(_stats_job(w).model),
        data=lambda w: _stats_job(w).calibration.input,
    output:
        # keep_models selected/none: removed once every merge reading them is done (recomputed on request)
        directory(L.stats_dir("{stats_id}")) if PLAN.keep_models == "all" else temp(directory(L.stats_dir("{stats_id}"))),
    wildcard_constraints:
        stats_id=_alt(list(PLAN.stats_jobs)),
    params:
        kind=lambda w: _stats_job(w).kind,
        data=lambda w: _stats_job(w).calibration.path,
        examples=PLAN.calibration_settings["examples"],
        max_length=PLAN.calibration_settings["max_length"],
        batch_size=PLAN.calibration_settings["batch_size"],
        seed=PLAN.stats_seed,
        device=PLAN.config["stats"]["device"],
    threads: RES.threads("stats", THREADS)
    resources:
        **RES.of("stats"),
    log:
        L.log("stats", "{stats_id}"),
    shell:
        "{MS} stats --model {input.model:q} --data {params.data:q} --kind {params.kind:q}"
        " --examples {params.examples} --max-length {params.max_length} --batch-size {params.batch_size}"
        " --seed {params.seed} --device {params.device:q} --threads {threads} --uid {wildcards.stats_id:q}"
        " --no-progress --out {output:q} 2> {log:q}"


rule calibration_data:
    # an lm-eval suite's validation examples (as the evaluation splits them: never a test example),
    # the calibration data of experts in that domain; datasets from the prefetched cache
    input:
        spec=L.eval_spec,
        datasets=L.datasets_manifest,
    output:
        L.calibration_data("{calibration_suite}"),
    wildcard_constraints:
        calibration_suite=_alt(PLAN.calibration_suites),
    params:
        examples=PLAN.calibration_settings["examples"],
    localrule: True
    log:
        L.log("calibration_data", "{calibration_suite}"),
    shell:
        "{MS} calibration-data --spec {input.spec:q} --suite {wildcards.calibration_suite:q}"
        " --examples {params.examples} --out {output:q} 2> {log:q}"
