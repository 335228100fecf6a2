# Alignment and linear mode connectivity.
#   align: permutation map of a model (expert) onto a reference (base or another expert)
#          -> results/align/<model>--<reference>--<method>/{perm.safetensors,summary.json}
#   lmc:   loss along the linear path reference -> model, before and after alignment
#          -> results/lmc/<model>--<reference>--<method>.{json,png}
# A merge entry with `align: {method: weight_matching, reference: base}` needs one map per expert
# (the reference itself excepted); `align_maps(merge)` gives {expert name: map path} for the merge
# YAML, and `ALIGN_TARGETS` lists every map, summary and LMC output of the plan.
# Uses PLAN, MS, THREADS, model_dir() and _alt() from common.smk. Optional config keys (all
# defaulted): align.seed, align.max_iter, align.data_split (activation matching, default train),
# align.lmc_split (default validation), align.lmc_points (11), align.lmc_max_examples (64).

ALIGN_CFG = config.get("align") or {}
ALIGN_METHODS = ["weight_matching", "activation_matching"]


def align_reference(name):
    """`reference: base` (or no reference) means the plan's base; otherwise a model name."""
    return PLAN.base if name in (None, "base") else name


def align_dir(model, reference, method):
    return f"results/align/{model}--{reference}--{method}"


def align_maps(merge):
    """{expert name: permutation map} for one merge of the plan (empty when it has no `align`)."""
    if not merge.align:
        return {}
    ref = align_reference(merge.align.get("reference"))
    method = merge.align.get("method", "weight_matching")
    return {e: f"{align_dir(e, ref, method)}/perm.safetensors" for e in merge.experts if e != ref}


def _align_jobs():
    jobs = set()
    for m in PLAN.merges.values():
        if m.align:
            ref = align_reference(m.align.get("reference"))
            method = m.align.get("method", "weight_matching")
            jobs.update((e, ref, method) for e in m.experts if e != ref)
    return sorted(jobs)


def _skill_of(model):
    e = PLAN.experts.get(model)
    return e["skill"] if e else PLAN.skills[0]


def _align_inputs(w):
    inputs = {"model": model_dir(w.align_model), "reference": model_dir(w.align_ref)}
    if w.align_method == "activation_matching":
        inputs["data"] = f"resources/data/{_skill_of(w.align_model)}"
    return inputs


def _align_data_arg(w, input):
    if "data" not in input.keys():
        return ""
    return f"--data {input.data}/{ALIGN_CFG.get('data_split', 'train')}.jsonl"


ALIGN_TARGETS = [
    path
    for model, ref, method in _align_jobs()
    for path in (
        f"{align_dir(model, ref, method)}/perm.safetensors",
        f"{align_dir(model, ref, method)}/summary.json",
        f"results/lmc/{model}--{ref}--{method}.json",
        f"results/lmc/{model}--{ref}--{method}.png",
    )
]


rule align:
    input:
        unpack(_align_inputs),
    output:
        perm="results/align/{align_model}--{align_ref}--{align_method}/perm.safetensors",
        summary="results/align/{align_model}--{align_ref}--{align_method}/summary.json",
    wildcard_constraints:
        align_model=_alt([PLAN.base, *PLAN.experts]),
        align_ref=_alt([PLAN.base, *PLAN.experts]),
        align_method="|".join(ALIGN_METHODS),
    params:
        data=_align_data_arg,
        seed=ALIGN_CFG.get("seed", config.get("seed", 0)),
        max_iter=ALIGN_CFG.get("max_iter", 100),
    # weight matching is fastest single-threaded (docs/align.md); activation matching runs models
    threads: lambda w: 1 if w.align_method == "weight_matching" else THREADS
    resources:
        mem_mb=8000,
    log:
        "results/logs/align/{align_model}--{align_ref}--{align_method}.log",
    shell:
        "{MS} align --model {input.model} --reference {input.reference} --method {wildcards.align_method}"
        " --seed {params.seed} --max-iter {params.max_iter} {params.data} --threads {threads} --no-progress"
        " --out {output.perm} --summary {output.summary} 2> {log}"


rule lmc:
    input:
        a=lambda w: model_dir(w.align_ref),
        b=lambda w: model_dir(w.align_model),
        perm="results/align/{align_model}--{align_ref}--{align_method}/perm.safetensors",
        data=lambda w: f"resources/data/{_skill_of(w.align_model)}",
    output:
        json="results/lmc/{align_model}--{align_ref}--{align_method}.json",
        plot=report(
            "results/lmc/{align_model}--{align_ref}--{align_method}.png",
            caption="../report/lmc.rst",
            category="Alignment",
            subcategory="{align_model} onto {align_ref}",
        ),
    wildcard_constraints:
        align_model=_alt([PLAN.base, *PLAN.experts]),
        align_ref=_alt([PLAN.base, *PLAN.experts]),
        align_method="|".join(ALIGN_METHODS),
    params:
        split=ALIGN_CFG.get("lmc_split", "validation"),
        points=ALIGN_CFG.get("lmc_points", 11),
        max_examples=ALIGN_CFG.get("lmc_max_examples", 64),
    threads: THREADS
    resources:
        mem_mb=8000,
    log:
        "results/logs/lmc/{align_model}--{align_ref}--{align_method}.log",
    shell:
        "{MS} lmc --model-a {input.a} --model-b {input.b} --perm {input.perm}"
        " --data {input.data}/{params.split}.jsonl --points {params.points}"
        " --max-examples {params.max_examples} --threads {threads}"
        " --out {output.json} --plot {output.plot} 2> {log}"
