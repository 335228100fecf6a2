# Experts fine-tuned from the base on their skill's train split -> resources/experts/<name>/.
# A LoRA expert (finetune.method: lora) is a PEFT adapter directory there instead of a dense checkpoint.

import shlex


def _recipe(w):
    return PLAN.experts[w.expert].recipe


def _method_flags(w):
    """--method lora and its settings for a LoRA expert (an adapter directory); nothing for full."""
    r = _recipe(w)
    if r.get("method", "full") != "lora":
        return ""
    lora = r["lora"]
    return (f"--method lora --lora-r {int(lora['r'])} --lora-alpha {float(lora['alpha'])!r}"
            f" --lora-targets {shlex.quote(','.join(lora['target_modules']))}"
            f" --lora-dropout {float(lora['dropout'])!r}")


rule finetune:
    input:
        base=PLAN.base.dir,
        data=lambda w: L.data(PLAN.experts[w.expert].domain),
    output:
        directory(L.trained_expert("{expert}")),
    params:
        skill=lambda w: PLAN.experts[w.expert].domain,
        train=lambda w: L.data_split(PLAN.experts[w.expert].domain, "train"),
        uid=lambda w: PLAN.experts[w.expert].uid,
        steps=lambda w: _recipe(w)["steps"],
        batch_size=lambda w: _recipe(w)["batch_size"],
        lr=lambda w: _recipe(w)["lr"],
        warmup=lambda w: _recipe(w)["warmup"],
        seed=lambda w: _recipe(w)["seed"],
        emb=lambda w: "--train-embeddings" if _recipe(w)["train_embeddings"] else "",
        method=_method_flags,
    threads: RES.threads("finetune", THREADS)
    # the longest fine-tune first: it is the run's critical path
    priority: lambda w: PRIORITY["finetune"] + min(_recipe(w)["steps"] // 10, 9)
    resources:
        **RES.of("finetune"),
    log:
        L.log("finetune", "{expert}"),
    shell:
        "{MS} finetune --base {input.base:q} --data {params.train:q} --domain {params.skill:q}"
        " --name {wildcards.expert:q} --uid {params.uid:q} --steps {params.steps} --batch-size {params.batch_size}"
        " --lr {params.lr} --warmup {params.warmup} --seed {params.seed} {params.emb} {params.method}"
        " --device {TRAIN[device]:q} --precision {TRAIN[precision]:q}"
        " --threads {threads} --out {output:q} 2> {log:q}"
