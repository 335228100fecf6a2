# Experts fine-tuned from the base on their skill's train split -> resources/experts/<name>/.


rule finetune:
    input:
        base=f"resources/checkpoints/{PLAN.base}",
        data=lambda w: f"resources/data/{PLAN.experts[w.expert]['skill']}",
    output:
        directory("resources/experts/{expert}"),
    params:
        skill=lambda w: PLAN.experts[w.expert]["skill"],
        steps=lambda w: PLAN.experts[w.expert]["finetune"]["steps"],
        batch_size=lambda w: PLAN.experts[w.expert]["finetune"]["batch_size"],
        lr=lambda w: PLAN.experts[w.expert]["finetune"]["lr"],
        warmup=lambda w: PLAN.experts[w.expert]["finetune"]["warmup"],
        seed=lambda w: PLAN.experts[w.expert]["finetune"]["seed"],
        emb=lambda w: "--train-embeddings" if PLAN.experts[w.expert]["finetune"].get("train_embeddings") else "",
    threads: THREADS
    resources:
        mem_mb=6000,
    log:
        "results/logs/finetune/{expert}.log",
    shell:
        "{MS} finetune --base {input.base} --data {input.data}/train.jsonl --domain {params.skill}"
        " --name {wildcards.expert} --steps {params.steps} --batch-size {params.batch_size}"
        " --lr {params.lr} --warmup {params.warmup} --seed {params.seed} {params.emb}"
        " --threads {threads} --out {output} 2> {log}"
