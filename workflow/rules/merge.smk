# Merges: one job per grid point -> results/models/<model_id>/ (HF layout + model card).
# The merge YAML is exactly what `mergesweep merge --config` takes, so any merge can be re-run by hand.
import yaml


def merge_inputs(w):
    m = PLAN.merges[w.merge_id]
    return {"base": model_dir(PLAN.base), "experts": [model_dir(e) for e in m.experts],
            "align_maps": list(align_maps(m).values())}


rule merge_spec:
    output:
        "results/merges/{merge_id}.yaml",
    params:
        # the merge id already hashes the content; the id is the parameter Snakemake tracks
        merge_id=lambda w: w.merge_id,
    localrule: True
    run:
        from mergesweep.atomic import atomic_file

        doc = PLAN.merges[wildcards.merge_id].yaml_doc(
            model_dir(PLAN.base), [model_dir(e) for e in PLAN.merges[wildcards.merge_id].experts], MERGE_CFG,
            align_maps(PLAN.merges[wildcards.merge_id]),
        )
        with atomic_file(output[0]) as f:
            yaml.safe_dump(doc, f, sort_keys=False)


rule merge:
    input:
        unpack(merge_inputs),
        spec="results/merges/{merge_id}.yaml",
    output:
        directory("results/models/{merge_id}"),
    threads: THREADS
    resources:
        mem_mb=4000,
    log:
        "results/logs/merge/{merge_id}.log",
    shell:
        "{MS} merge --config {input.spec} --model-id {wildcards.merge_id} --out {output} 2> {log}"
