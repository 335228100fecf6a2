# Experts fine-tuned from the base on their skill's train split -> resources/experts/<name>/.


rule finetune:
    input:
        base=f"resources/checkpoints/{PLAN.base}",
        data=lambda w: f"resources/data/{PLAN.experts[w.expert]['skill']}",
    output:
        directory("resources/experts/{expert}"),
    params:
        skill=lambda w: PLAN.experts[w.expert]["skill"],
        ft=lambda w: PLAN.experts[w.expert]["finetune"],
        emb=lambda w: "--train-embeddings" if PLAN.experts[w.expert]["finetune"].get("train_embeddings") else "",
    threads: THREADS
    resources:
        mem_mb=6000,
    log:
        "results/logs/finetune/{expert}.log",
    shell:
        "{MS} finetune --base {input.base} --data {input.data}/train.jsonl --domain {params.skill}"
        " --name {wildcards.expert} --steps {params.ft[steps]} --batch-size {params.ft[batch_size]}"
        " --lr {params.ft[lr]} --warmup {params.ft[warmup]} --seed {params.ft[seed]} {params.emb}"
        " --threads {threads} --out {output} 2> {log}"
