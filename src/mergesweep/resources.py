"""What each workflow job asks the cluster for: GPUs, CPUs, time and memory.

The one owner of per-rule resources. The rules take theirs from here (``resources:`` and
``threads:`` in workflow/rules/*.smk); no profile sets them, so ``--set-resources
merge:runtime=240`` on the command line changes that one value and nothing else.

**GPUs** follow the stage's device in the config (a stage asks for a GPU exactly when it will use
one):

==============  =====================================  ==================================
stage           device key                              GPUs asked (``auto`` means)
==============  =====================================  ==================================
pretrain,       ``training.device``                     1 for ``cuda``/``cuda:N``/``auto``
finetune
evaluate        ``evaluation.device``                   1 for ``cuda``/``cuda:N``/``auto``
stats           ``stats.device``                        1 for ``cuda``/``cuda:N``/``auto``
merge           ``merge.device``                        1 for ``cuda``/``cuda:N``; 0 for ``auto``
                                                        (merging streams tensors: CPU is fine);
                                                        a whole-model merge (forward passes:
                                                        regmean_plus_plus, pleas...) follows
                                                        ``stats.device`` instead
others          (none: CPU only)                        0
==============  =====================================  ==================================

``cpu`` asks for none. ``auto`` resolves at run time (mergesweep.devices): CUDA when the job was
given a GPU, else CPU, so a laptop without GPU runs the same config on CPU (locally Snakemake
does not constrain ``gpu`` unless ``--resources gpu=N`` is given).

**Time and memory** scale with the model: from the base's parameter count (read from its
safetensors headers once it exists, estimated from the recipe for a pretrained base, or a 1B
guess before a fetched base is there), ``G`` = its float32 size in GB. Per attempt ``a`` (1, 2, 3:
Snakemake's retries get more):

=============  =======================  ==========================
stage          runtime (min)            mem_mb
=============  =======================  ==========================
make_data      15 a                     2000 a
fetch          (30 + 10 G) a            (4000 + 3000 G) a
pretrain,      (60 + 60 G) a            (4000 + 6000 G) a
finetune
align, lmc     (30 + 20 G) a            (4000 + 3000 G) a
merge          (20 + 5 G (n+1)) a       (3000 + 2000 G) a  (n experts; tensors are streamed)
stats          (30 + 20 G) a            (4000 + 6000 G) a  (Fisher holds gradients)
evaluate       (30 + 5 G s) a           (4000 + 2000 G) a  (s suites)
aggregate      30 a                     8000 a
=============  =======================  ==========================

The config's ``resources.<stage>`` sets any of ``gpu``, ``runtime``, ``mem_mb``, ``threads`` for a
stage (runtime and memory then still grow with the attempt). The schema checks the keys; asking
for a GPU on a stage whose device is ``cpu`` (or none for a ``cuda`` stage) is a config error.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from mergesweep.errors import ConfigError

#: config stage -> the Snakemake rules it covers
STAGES: dict[str, tuple[str, ...]] = {
    "make_data": ("make_data",),
    "fetch": ("fetch",),
    "pretrain": ("pretrain_base",),
    "finetune": ("finetune",),
    "align": ("align",),
    "lmc": ("lmc",),
    "merge": ("merge", "extract_lora", "revert"),
    "stats": ("stats",),
    "evaluate": ("evaluate", "evaluate_merged", "evaluate_reverted"),
    "aggregate": ("aggregate", "leaderboard", "lmc_table"),
}
#: stage -> (runtime base, runtime per GB, mem base, mem per GB)
_SCALE = {
    "make_data": (15, 0, 2000, 0),
    "fetch": (30, 10, 4000, 3000),
    "pretrain": (60, 60, 4000, 6000),
    "finetune": (60, 60, 4000, 6000),
    "align": (30, 20, 4000, 3000),
    "lmc": (30, 20, 4000, 3000),
    "merge": (20, 5, 3000, 2000),
    "stats": (30, 20, 4000, 6000),
    # 5 min per GB per suite: a 3B base (12.8 GB) on six suites asks for 6.9 h, an 8B base on four
    # 10.7 h (30 min/GB asked for 39 h and 64 h: over many clusters' 24-48 h caps). lm-eval's HF
    # backend on one data-centre GPU runs a suite of an 8B model in well under that; a job that
    # needs more gets twice the time on its retry, or set resources.evaluate.runtime.
    "evaluate": (30, 5, 4000, 2000),
    "aggregate": (30, 0, 8000, 0),
}
#: parameters assumed for a fetched base that is not on disk yet (only a dry run sees this)
GUESS_PARAMS = 1_000_000_000


def device_key(stage: str) -> str | None:
    """The config key (``section.device``) whose device a stage runs on, or None (CPU only)."""
    return {"pretrain": "training", "finetune": "training", "merge": "merge", "evaluate": "evaluation",
            "stats": "stats"}.get(stage)


def wants_gpu(stage: str, config: dict) -> bool:
    """Whether the stage will use a GPU when given one (its configured device)."""
    section = device_key(stage)
    if section is None:
        return False
    device = config[section]["device"]
    if section == "evaluation" and config["evaluation"].get("backend") == "vllm":
        return True
    if device.startswith("cuda"):
        return True
    return device == "auto" and stage != "merge"


def check(config: dict) -> None:
    """The config's ``resources`` section agrees with the stages' devices (errors name the key)."""
    for stage, res in (config.get("resources") or {}).items():
        if "gpu" not in res:
            continue
        section = device_key(stage)
        key = f"resources.{stage}.gpu"
        if res["gpu"] > 0 and section is None:
            raise ConfigError(f"{key}: {res['gpu']}, but the {stage} stage runs on CPU only (the GPU would sit idle)")
        if section is None:
            continue
        device = config[section]["device"]
        if res["gpu"] > 0 and device == "cpu":
            raise ConfigError(f"{key}: {res['gpu']}, but {section}.device is cpu (the GPU would sit idle); "
                              f"set {section}.device to auto or cuda")
        if res["gpu"] == 0 and device.startswith("cuda"):
            raise ConfigError(f"{key}: 0, but {section}.device is {device}: the job would have no GPU to run on")


def llama_params(recipe: dict) -> int:
    """Parameters of the Llama a pretrain recipe builds (mergesweep.zoo.tiny; tied embeddings)."""
    h, layers, inter, vocab = recipe["hidden"], recipe["layers"], recipe["intermediate"], recipe["vocab_size"]
    kv = h // recipe["heads"] * recipe["kv_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    return vocab * h + layers * per_layer + h


def _llama_dims(plan) -> tuple[int, int, int] | None:
    """(hidden, intermediate, layers) of the base: its recipe, or its config.json once it exists."""
    base = plan.base
    if base.stage == "pretrain":
        r = base.recipe
        return r["hidden"], r["intermediate"], r["layers"]
    import json

    try:
        cfg = json.loads((Path(base.dir) / "config.json").read_text())
        return int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checkpoint_params(path: str | Path) -> int | None:
    """Parameters stored in a checkpoint directory (from the safetensors headers: no tensor is
    read), or None when there is no readable checkpoint yet."""
    from mergesweep.checkpoints.layout import CheckpointReader

    try:
        with CheckpointReader(path) as r:
            return sum(math.prod(r.shape(k)) for k in r.keys())
    except Exception:
        return None


class Resources:
    """Resource values for the rules of one plan (``Resources(plan).of("merge")``).

    Every value is a callable Snakemake evaluates per job (with ``wildcards`` and ``attempt``);
    the base's size is read once, when it first exists."""

    def __init__(self, plan) -> None:
        self.plan = plan
        self.config = plan.config
        self._params: int | None = None

    # -- the model's size ------------------------------------------------------------------------
    def base_params(self) -> int:
        if self._params is not None:
            return self._params
        base = self.plan.base
        if base.stage == "pretrain":
            self._params = llama_params(base.recipe)
            return self._params
        n = checkpoint_params(base.dir)
        if n is None:
            return GUESS_PARAMS  # not fetched yet: ask again next time
        self._params = n
        return n

    def stats_gb(self, kind: str) -> float:
        """Disk of one stats job's output in GB (float32): a Fisher is the model's size; Gram matrices
        are ``sum over linear layers of in^2`` (``6 h^2 + i^2`` per Llama block: q, k, v, o, gate, up
        read width ``h``, down reads ``i``), from the base's config (or recipe); the model's size when
        neither is known."""
        if kind != "gram":
            return self.base_params() * 4 / 1e9
        dims = _llama_dims(self.plan)
        if dims is None:
            return self.base_params() * 4 / 1e9
        h, i, layers = dims
        return layers * (6 * h * h + i * i) * 4 / 1e9

    def base_gb(self) -> float:
        """The base's size in GB at float32."""
        return self.base_params() * 4 / 1e9

    # -- what a job's runtime scales with -------------------------------------------------------
    def eval_units(self) -> int:
        """Suites one evaluation job runs: every suite (``evaluation.jobs: per_model``) or one."""
        return 1 if self.plan.evaluation["jobs"] == "per_suite" else len(self.plan.suites)

    def merge_units(self, merge_id: str) -> int:
        """Checkpoints one merge job streams: its experts and the base."""
        m = self.plan.merges.get(merge_id)
        return len(m.experts) + 1 if m is not None else 1

    def merge_stage(self, merge_id: str) -> str:
        """The stage whose resources a merge job asks for: ``stats`` for a whole-model merge (it
        runs forward passes like the stats stage), else ``merge``."""
        m = self.plan.merges.get(merge_id)
        return "stats" if m is not None and m.calibration else "merge"

    def merge_job(self) -> dict:
        """``resources:`` of the merge rule: the merge stage's, or the stats stage's for whole-model
        merges (per job, from its merge id)."""
        def gpu(wildcards):
            return self.gpu(self.merge_stage(wildcards.merge_id))

        def runtime(wildcards, attempt):
            stage = self.merge_stage(wildcards.merge_id)
            return self.runtime(stage, attempt, self.merge_units(wildcards.merge_id) if stage == "merge" else 1)

        def mem_mb(wildcards, attempt):
            return self.mem_mb(self.merge_stage(wildcards.merge_id), attempt)

        return {"gpu": gpu, "runtime": runtime, "mem_mb": mem_mb}

    # -- per stage -------------------------------------------------------------------------------
    def overrides(self, stage: str) -> dict:
        return dict((self.config.get("resources") or {}).get(stage) or {})

    def gpu(self, stage: str) -> int:
        over = self.overrides(stage)
        if "gpu" in over:
            return int(over["gpu"])
        return 1 if wants_gpu(stage, self.config) else 0

    def threads(self, stage: str, default: int) -> int:
        return int(self.overrides(stage).get("threads", default))

    def runtime(self, stage: str, attempt: int = 1, units: float = 1.0) -> int:
        """Minutes for one attempt; ``units`` scales the per-GB part (experts merged, suites run)."""
        over = self.overrides(stage)
        if "runtime" in over:
            return int(over["runtime"]) * attempt
        base, per_gb, _, _ = _SCALE[stage]
        return int(math.ceil((base + per_gb * self.base_gb() * units) * attempt))

    def mem_mb(self, stage: str, attempt: int = 1) -> int:
        over = self.overrides(stage)
        if "mem_mb" in over:
            return int(over["mem_mb"]) * attempt
        _, _, base, per_gb = _SCALE[stage]
        return int(math.ceil((base + per_gb * self.base_gb()) * attempt))

    def of(self, stage: str, units: float | Callable[[Any], float] = 1.0) -> dict:
        """``resources:`` of a rule: gpu, runtime and mem_mb as Snakemake callables. ``units``
        (a number, or a function of the job's wildcards) scales the per-GB part of the runtime."""
        if stage not in _SCALE:
            raise KeyError(stage)
        gpu = self.gpu(stage)

        def runtime(wildcards, attempt):
            return self.runtime(stage, attempt, units(wildcards) if callable(units) else units)

        def mem_mb(wildcards, attempt):
            return self.mem_mb(stage, attempt)

        return {"gpu": gpu, "runtime": runtime, "mem_mb": mem_mb}

    # -- a sweep's footprint ---------------------------------------------------------------------
    def disk_summary(self) -> str:
        """One line: the disk the merged models need (models x size), given keep_models."""
        n = len(self.plan.merges)
        size = self.base_params() * _bytes_per_param(self.config) / 1e9
        keep = self.config["keep_models"]
        guess = " (base not fetched yet: 1B-parameter guess)" if (
            self.plan.base.stage == "fetch" and self._params is None) else ""
        if keep == "all":
            return f"disk: {n} merged model(s) x {_gb(size)} = {_gb(n * size)} kept (keep_models: all){guess}"
        kept = len({(m.method, bool(m.align), m.experts) for m in self.plan.merges.values()}) if keep == "selected" else 0
        return (f"disk: {n} merged model(s) x {_gb(size)}; removed once evaluated (keep_models: {keep}), "
                f"{kept} kept = {_gb(kept * size)} at the end{guess}")


def _bytes_per_param(config: dict) -> int:
    return {None: 4, "float32": 4, "fp32": 4, "float": 4}.get(config["merge"]["dtype"], 2)


def _gb(x: float) -> str:
    """A size in GB, written in MB, GB or TB."""
    if x < 0.1:
        return f"{x * 1000:.1f} MB"
    return f"{x:.2f} GB" if x < 100 else f"{x / 1000:.1f} TB" if x >= 1000 else f"{x:.0f} GB"

