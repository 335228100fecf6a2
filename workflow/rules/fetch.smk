# Base and fetched experts -> resources/checkpoints/<name>/ (verified HF layout).
# Skill data and lm-eval task YAMLs -> resources/data/<suite>/, resources/tasks/<suite>/.


rule make_data:
    output:
        data=directory("resources/data/{data_suite}"),
        tasks=directory("resources/tasks/{data_suite}"),
    params:
        # scalars, not mappings: a reordered config must not look like a changed one
        train=lambda w: 0 if w.data_suite in PLAN.heldout else SIZES["train"],
        validation=lambda w: (HELDOUT_SIZES if w.data_suite in PLAN.heldout else SIZES)["validation"],
        test=lambda w: (HELDOUT_SIZES if w.data_suite in PLAN.heldout else SIZES)["test"],
        seed=config.get("seed", 0),
    log:
        "results/logs/make_data/{data_suite}.log",
    shell:
        "{MS} make-data --suite {wildcards.data_suite} --seed {params.seed}"
        " --train {params.train} --validation {params.validation} --test {params.test}"
        " --data-dir {output.data} --tasks-dir {output.tasks} 2> {log}"


if "source" in config["base"]:

    rule fetch_base:
        output:
            directory(f"resources/checkpoints/{PLAN.base}"),
        params:
            source=shell_json(config["base"]["source"]),  # sorted keys (shell_json)
        log:
            f"results/logs/fetch/{PLAN.base}.log",
        resources:
            mem_mb=4000,
        shell:
            "{MS} fetch --name {PLAN.base} --role base --source {params.source} --out {output} 2> {log}"

else:

    rule pretrain_base:
        input:
            expand("resources/data/{s}", s=DATA_SUITES),
        output:
            directory(f"resources/checkpoints/{PLAN.base}"),
        params:
            args=" ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(config["base"]["pretrain"].items())),
        threads: THREADS
        log:
            f"results/logs/pretrain/{PLAN.base}.log",
        shell:
            "{MS} pretrain --name {PLAN.base} --data-dirs {input} {params.args} --threads {threads}"
            " --out {output} 2> {log}"


rule fetch_expert:
    output:
        directory("resources/checkpoints/{fetched}"),
    params:
        source=lambda w: shell_json(PLAN.experts[w.fetched]["source"]),
        domain=lambda w: PLAN.experts[w.fetched]["skill"],
    log:
        "results/logs/fetch/{fetched}.log",
    shell:
        "{MS} fetch --name {wildcards.fetched} --role expert --domain {params.domain}"
        " --source {params.source} --out {output} 2> {log}"
