# Base and fetched experts -> resources/checkpoints/<name>/ (verified HF layout + model record).
# Skill data and lm-eval task YAMLs -> resources/data/<suite>/, resources/tasks/<suite>/.
import json


rule make_data:
    output:
        data=directory(L.data("{data_suite}")),
        tasks=directory(L.tasks("{data_suite}")),
    params:
        # scalars, not mappings: a reordered config must not look like a changed one
        train=lambda w: PLAN.data_sizes(w.data_suite)["train"],
        validation=lambda w: PLAN.data_sizes(w.data_suite)["validation"],
        test=lambda w: PLAN.data_sizes(w.data_suite)["test"],
        seed=PLAN.config["seed"],
    resources:
        **RES.of("make_data"),
    log:
        L.log("make_data", "{data_suite}"),
    shell:
        "{MS} make-data --suite {wildcards.data_suite:q} --seed {params.seed}"
        " --train {params.train} --validation {params.validation} --test {params.test}"
        " --data-dir {output.data:q} --tasks-dir {output.tasks:q} 2> {log:q}"


def _adapter_base(w):
    """A fetched LoRA adapter is checked against the base it must fit: the base comes first."""
    return [PLAN.base.dir] if PLAN.checkpoint(w.fetched).adapter else []


rule fetch:
    input:
        base=_adapter_base,
    output:
        directory(L.checkpoint("{fetched}")),
    params:
        adapter=lambda w: (["--base-dir", PLAN.base.dir] + [a for n in PLAN.base_names() for a in ("--base-name", n)]
                           if PLAN.checkpoint(w.fetched).adapter else []),
        source=lambda w: json.dumps(PLAN.checkpoint(w.fetched).source, sort_keys=True),
        role=lambda w: PLAN.checkpoint(w.fetched).role,
        domain=lambda w: ["--domain", PLAN.checkpoint(w.fetched).domain] if PLAN.checkpoint(w.fetched).domain else [],
        uid=lambda w: PLAN.checkpoint(w.fetched).uid,
        cache=L.downloads,
    priority: PRIORITY["fetch"]
    resources:
        **RES.of("fetch"),
    log:
        L.log("fetch", "{fetched}"),
    shell:
        "{MS} fetch --name {wildcards.fetched:q} --role {params.role:q} {params.domain:q}"
        " --uid {params.uid:q} --source {params.source:q} --cache-dir {params.cache:q} {params.adapter:q}"
        " --out {output:q} 2> {log:q}"


if PLAN.base.stage == "pretrain":

    rule pretrain_base:
        input:
            [L.data(s) for s in PLAN.data_suites],
        output:
            directory(PLAN.base.dir),
        params:
            args=[f"--{k.replace('_', '-')}={v}" for k, v in sorted(PLAN.base.recipe.items())],
            name=PLAN.base.name,
            uid=PLAN.base.uid,
        threads: RES.threads("pretrain", THREADS)
        priority: PRIORITY["fetch"]
        resources:
            **RES.of("pretrain"),
        log:
            L.log("pretrain", PLAN.base.name),
        shell:
            "{MS} pretrain --name {params.name:q} --uid {params.uid:q} --data-dirs {input:q} {params.args:q}"
            " --device {TRAIN[device]:q} --precision {TRAIN[precision]:q}"
            " --threads {threads} --out {output:q} 2> {log:q}"
