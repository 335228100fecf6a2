# Alignment and linear mode connectivity; the jobs are planned in mergesweep.plan (AlignJob).
#   align: permutation map of a model (expert) onto a reference (base or another expert)
#          -> results/align/<model>--<reference>--<method>/{perm.safetensors,summary.json}
#   lmc:   loss along the linear path reference -> model, before and after alignment
#          -> results/lmc/<model>--<reference>--<method>.{json,png}


def _job(w):
    return PLAN.align_jobs[(w.align_model, w.align_ref, w.align_method)]


def _align_inputs(w):
    job = _job(w)
    inputs = {"model": model_dir(job.model), "reference": model_dir(job.reference)}
    if job.data:
        inputs["data"] = job.data.rsplit("/", 1)[0]
    return inputs


ALIGN_WILDCARDS = dict(
    align_model=_alt([PLAN.base.name, *PLAN.experts]),
    align_ref=_alt([PLAN.base.name, *PLAN.experts]),
    align_method=_alt(["weight_matching", "activation_matching"]),
)
_A = ("{align_model}", "{align_ref}", "{align_method}")


rule align:
    input:
        unpack(_align_inputs),
    output:
        perm=L.perm_map(*_A),
        summary=L.align_summary(*_A),
    wildcard_constraints:
        **ALIGN_WILDCARDS,
    params:
        data=lambda w: ["--data", _job(w).data] if _job(w).data else [],
        seed=lambda w: _job(w).seed,
        max_iter=lambda w: _job(w).max_iter,
        uid=lambda w: _job(w).uid,
    # weight matching is fastest single-threaded (docs/align.md); activation matching runs models
    threads: lambda w: RES.threads("align", 1 if w.align_method == "weight_matching" else THREADS)
    resources:
        **RES.of("align"),
    log:
        L.log("align", "--".join(_A)),
    shell:
        "{MS} align --model {input.model:q} --reference {input.reference:q} --method {wildcards.align_method:q}"
        " --seed {params.seed} --max-iter {params.max_iter} {params.data:q} --uid {params.uid:q}"
        " --threads {threads} --no-progress --out {output.perm:q} --summary {output.summary:q} 2> {log:q}"


rule lmc:
    input:
        a=lambda w: model_dir(_job(w).reference),
        b=lambda w: model_dir(_job(w).model),
        perm=L.perm_map(*_A),
        data=lambda w: _job(w).lmc_data.rsplit("/", 1)[0],
    output:
        json=L.lmc(*_A, "json"),
        plot=report(
            L.lmc(*_A, "png"),
            caption="../report/lmc.rst",
            category="Alignment",
            subcategory="{align_model} onto {align_ref}",
        ),
    wildcard_constraints:
        **ALIGN_WILDCARDS,
    params:
        data=lambda w: _job(w).lmc_data,
        points=PLAN.config["align"]["lmc_points"],
        max_examples=PLAN.config["align"]["lmc_max_examples"],
    threads: RES.threads("lmc", THREADS)
    resources:
        **RES.of("lmc"),
    log:
        L.log("lmc", "--".join(_A)),
    shell:
        "{MS} lmc --model-a {input.a:q} --model-b {input.b:q} --perm {input.perm:q}"
        " --data {params.data:q} --points {params.points} --max-examples {params.max_examples}"
        " --threads {threads} --out {output.json:q} --plot {output.plot:q} 2> {log:q}"


ALIGN_TARGETS = [p for job in PLAN.align_jobs.values() for p in (job.perm, job.summary, job.lmc_json, job.lmc_plot)]
