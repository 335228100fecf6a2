# Merges: one job per planned merge -> results/models/<model_id>/ (HF layout + model record/card).
# The merge YAML is exactly what `mergesweep merge --config` takes, so any merge can be re-run by
# hand; `--model-id` makes the merge fail if the id it computes from its inputs' records differs
# from the plan's (the two would have drifted).


def merge_inputs(w):
    if w.merge_id not in PLAN.merges:
        raise ValueError(f"{w.merge_id} is not a merge of this plan (its config changed?)")
    m = PLAN.merges[w.merge_id]
    maps = [job.perm for job in (m.align or ()) if job is not None]
    stats = [job.dir for jobs in (m.stats or ()) for job in jobs]
    calibration = sorted({c.input for c in (m.calibration or ())})
    return {"base": PLAN.base.dir, "experts": [model_dir(e) for e in m.experts], "align_maps": maps,
            "stats": stats, "calibration": calibration}


rule merge_yaml:
    # no params: the merge id (the file name) hashes everything the YAML says
    output:
        L.merge_yaml("{merge_id}"),
    localrule: True
    run:
        import yaml

        from mergesweep.atomic import atomic_file

        with atomic_file(output[0]) as f:
            yaml.safe_dump(PLAN.merge_yaml_doc(wildcards.merge_id), f, sort_keys=False)


MERGED = directory(L.merged_model("{merge_id}"))


rule merge:
    input:
        unpack(merge_inputs),
        spec=L.merge_yaml("{merge_id}"),
    output:
        # keep_models selected/none: removed once evaluated (rebuilt on request, bit-identical)
        MERGED if PLAN.keep_models == "all" else temp(MERGED),
    # one intra-op thread: the streaming engine already overlaps reading, computing and writing,
    # and on a busy 2-core machine a TIES merge took 40 s with one thread and 370 s with two
    # (docs/merge.md); the job asks for exactly what it uses
    # a whole-model merge runs forward passes: the stats stage's threads (THREADS by default)
    threads: lambda w: RES.threads("stats", THREADS) if RES.merge_stage(w.merge_id) == "stats" else RES.threads("merge", 1)
    priority: PRIORITY["merge"]
    resources:
        # a whole-model merge (forward passes on calibration data) asks for the stats stage's
        **RES.merge_job(),
    log:
        L.log("merge", "{merge_id}"),
    shell:
        "{MS} merge --config {input.spec:q} --model-id {wildcards.merge_id:q} --threads {threads}"
        " --out {output:q} 2> {log:q}"
