"""``mergesweep finetune``: fine-tune an expert from a base checkpoint on one skill's train split.

``--method full`` (the default): full fine-tuning of every transformer weight with the embeddings
frozen (see ``zoo.train``); the result is a dense HF checkpoint with ``mergesweep.json`` (role
``expert``, its ``domain``, the recipe and the training summary).

``--method lora``: LoRA (Hu et al. 2021) through ``peft`` - the base stays frozen and a rank-``r``
update ``ΔW = (α/r)·B·A`` is trained on every ``--lora-targets`` linear layer of the decoder
(default: all of them, q/k/v/o and gate/up/down). The result is a PEFT adapter directory
(``adapter_config.json`` + ``adapter_model.safetensors``, its ``base_model_name_or_path`` the
base's model id) with the base's tokenizer files and ``mergesweep.json``, whose ``adapter`` entry
holds rank, alpha, target modules and the base's uid and fingerprint.

:func:`finetune_recipe` is the one place a config's ``finetune`` settings become an expert's
recipe (the plan hashes it into the expert's uid; the workflow passes it to this command).
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

from mergesweep.atomic import atomic_dir
from mergesweep.errors import ConfigError
from mergesweep.record import ModelRecord, peak_rss_mb, read_record, write_record

log = logging.getLogger(__name__)

METHODS = ("full", "lora")


def _finetune_defaults() -> dict:
    from mergesweep.config import schema

    return schema()["properties"]["finetune"]["properties"]


def full_lr() -> float:
    """Full fine-tuning's default learning rate: the config schema's ``finetune.lr`` default."""
    return _finetune_defaults()["lr"]["default"]


def lora_defaults() -> dict:
    """The config schema's ``finetune.lora`` defaults (the one place they live): ``r``, ``alpha``,
    ``target_modules`` (every linear layer of a Llama decoder: attention q/k/v/o and MLP
    gate/up/down; lm_head excluded), ``dropout`` and ``lr`` (a LoRA fine-tune's learning rate)."""
    props = _finetune_defaults()["lora"]["properties"]
    return {k: copy.deepcopy(v["default"]) for k, v in props.items()}


def finetune_recipe(common: dict, own: dict | None = None, key: str = "finetune") -> dict:
    """The recipe of one expert: the config's ``finetune`` settings (``common``, defaults filled)
    overridden key by key by the expert's own ``finetune`` (``own``); ``lora`` is merged key by key
    too. Full fine-tuning's recipe holds neither ``method`` nor ``lora`` (so the uids of full
    fine-tuned experts are those they had before LoRA existed); a LoRA recipe holds
    ``method: lora``, ``lora: {r, alpha, target_modules, dropout}`` with the defaults filled in,
    and ``lr`` = ``lora.lr`` (defaults: :func:`lora_defaults`), never ``finetune.lr``.

    Raises ConfigError naming ``<key>.lr`` when an expert sets ``lr`` for a LoRA fine-tune (its
    learning rate is ``lora.lr``)."""
    defaults = lora_defaults()
    own = dict(own or {})
    recipe = {**common, **own}
    method = recipe.pop("method", "full")
    lora = {**(common.get("lora") or {}), **(own.get("lora") or {})}
    recipe.pop("lora", None)
    if method not in METHODS:
        raise ConfigError(f"{key}.method: {method!r} is not one of {', '.join(METHODS)}")
    if method == "full":
        return recipe
    if "lr" in own:
        raise ConfigError(f"{key}.lr: a LoRA fine-tune's learning rate is {key}.lora.lr "
                          f"(default {defaults['lr']}); finetune.lr is full fine-tuning's")
    lora = {**defaults, **lora}
    lora["target_modules"] = list(lora["target_modules"])
    recipe["lr"] = lora.pop("lr")
    recipe["method"] = "lora"
    recipe["lora"] = lora
    return recipe


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, type=Path, help="base checkpoint directory")
    p.add_argument("--data", required=True, type=Path, help="train.jsonl of the skill")
    p.add_argument("--domain", required=True, help="the skill / suite this expert is for")
    p.add_argument("--name", required=True, help="expert name (its model id)")
    p.add_argument("--uid", help="the uid of the expert's definition in the plan (recorded for merge ids)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    lora = lora_defaults()
    p.add_argument("--lr", type=float, help=f"learning rate (default: {full_lr()} for full, {lora['lr']} for lora)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-embeddings", action="store_true", help="also train the (tied) embeddings")
    p.add_argument("--threads", type=int)
    p.add_argument("--method", default="full",
                   help="full (every transformer weight, default) or lora (a PEFT LoRA adapter; the base frozen)")
    p.add_argument("--lora-r", type=int, help=f"LoRA rank r (default {lora['r']})")
    p.add_argument("--lora-alpha", type=float, help=f"LoRA alpha; ΔW = (alpha/r)·B·A (default {lora['alpha']})")
    p.add_argument("--lora-targets", help="comma-separated names of the linear layers the adapter targets "
                                          f"(default: {','.join(lora['target_modules'])})")
    p.add_argument("--lora-dropout", type=float, help=f"dropout on the LoRA input (default {lora['dropout']})")
    add_device_arguments(p)


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--precision`` of the training commands (finetune, pretrain)."""
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when this process was given a GPU, else CPU), cpu, cuda, cuda:N or mps "
                        "(default: auto). The device never changes the model's id")
    p.add_argument("--precision", default="auto",
                   help="auto (bf16 autocast on a CUDA device that supports it, else fp32), fp32 or bf16 "
                        "(default: auto); weights are saved in float32 either way")


def training_device(args: argparse.Namespace) -> tuple[str, object, dict]:
    """``(device, autocast dtype or None, record entry)`` for ``--device``/``--precision``
    (DeviceError naming the option when this machine lacks the device)."""
    from mergesweep.devices import autocast_dtype, device_summary, precision_name, resolve_device

    device = resolve_device(args.device, "--device")
    autocast = autocast_dtype(device, args.precision, "--precision")
    entry = {"device": device, "requested_device": args.device, "precision": precision_name(autocast),
             "requested_precision": args.precision, "hardware": device_summary(device)}
    log.info("training on %s, %s", entry["hardware"], entry["precision"])
    return device, autocast, entry


def load_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        raise ConfigError(f"{path}: not a checkpoint directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def save_model(model, tok, out: Path, record: ModelRecord, dtype=None) -> ModelRecord:
    """Save as safetensors into ``out`` atomically, with its model record (whose fingerprint is
    this checkpoint's own, computed from the files just written)."""
    with atomic_dir(out) as tmp:
        if dtype is not None:
            model = model.to(dtype)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        record.peak_rss_mb = peak_rss_mb()
        return write_record(tmp, record)


def lora_spec(args: argparse.Namespace):
    """The :class:`~mergesweep.zoo.train.LoraSpec` of ``--method lora`` (defaults filled), or
    ``None`` for ``--method full``; ConfigError naming the flag for a bad value, or for a
    ``--lora-*`` flag given without ``--method lora``."""
    from mergesweep.zoo.train import LoraSpec

    method = getattr(args, "method", "full")
    given = {flag: getattr(args, attr, None) for flag, attr in
             (("--lora-r", "lora_r"), ("--lora-alpha", "lora_alpha"), ("--lora-targets", "lora_targets"),
              ("--lora-dropout", "lora_dropout"))}
    if method not in METHODS:
        raise ConfigError(f"--method: {method!r} is not one of {', '.join(METHODS)}")
    if method == "full":
        stray = [flag for flag, v in given.items() if v is not None]
        if stray:
            raise ConfigError(f"{stray[0]}: only applies with --method lora (this is --method full)")
        return None
    if args.train_embeddings:
        raise ConfigError("--train-embeddings: a LoRA fine-tune trains adapters only (the embeddings stay the base's)")
    defaults = lora_defaults()
    r = defaults["r"] if given["--lora-r"] is None else given["--lora-r"]
    alpha = defaults["alpha"] if given["--lora-alpha"] is None else given["--lora-alpha"]
    dropout = defaults["dropout"] if given["--lora-dropout"] is None else given["--lora-dropout"]
    targets = (defaults["target_modules"] if given["--lora-targets"] is None
               else [t.strip() for t in given["--lora-targets"].split(",")])
    if not isinstance(r, int) or r < 1:
        raise ConfigError(f"--lora-r: the rank must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise ConfigError(f"--lora-alpha: must be > 0, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ConfigError(f"--lora-dropout: must be in [0, 1), got {dropout!r}")
    if not targets or any(not t for t in targets):
        raise ConfigError(f"--lora-targets: expected comma-separated module names, got {given['--lora-targets']!r}")
    if len(set(targets)) != len(targets):
        raise ConfigError(f"--lora-targets: a module name is repeated in {given['--lora-targets']!r}")
    return LoraSpec(r=r, alpha=float(alpha), target_modules=tuple(targets), dropout=float(dropout))


def adapter_summary(path: Path) -> dict:
    """Rank, alpha and targets of the adapter just written: ``mergesweep.lora``'s
    ``AdapterReader.summary()`` (the one owner of the adapter format)."""
    from mergesweep.lora.adapter import AdapterReader

    with AdapterReader(path) as reader:
        return reader.summary()


def _sort_target_modules(path: Path) -> None:
    """peft writes ``target_modules`` from a set, in string-hash order, which changes from one
    Python process to the next; sorted, the same training writes the same bytes (and fingerprint)."""
    import json

    cfg = json.loads(path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_adapter(peft_model, tok, out: Path, record: ModelRecord, *, base_uid: str | None,
                 base_fingerprint: str | None) -> ModelRecord:
    """Save a LoRA expert into ``out`` atomically: the PEFT adapter (``adapter_config.json`` +
    ``adapter_model.safetensors``), the tokenizer files and the record, whose ``adapter`` entry
    is the adapter's summary plus the base's uid and fingerprint."""
    with atomic_dir(out) as tmp:
        # no embedding layers are adapted; "auto" would look the base name up on the Hub
        peft_model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
        (Path(tmp) / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
        _sort_target_modules(Path(tmp) / "adapter_config.json")
        tok.save_pretrained(tmp)
        record.extra["adapter"] = {**adapter_summary(Path(tmp)), "base_uid": base_uid,
                                   "base_fingerprint": base_fingerprint}
        record.peak_rss_mb = peak_rss_mb()
        return write_record(tmp, record)


def run(args: argparse.Namespace) -> int:
    import torch

    from mergesweep.zoo.train import TrainConfig, attach_lora, linear_names, read_jsonl, train

    spec = lora_spec(args)  # flag errors before anything is loaded
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data.exists():
        raise ConfigError(f"{args.data}: training data not found")
    device, autocast, hw = training_device(args)
    lr = args.lr if args.lr is not None else (full_lr() if spec is None else lora_defaults()["lr"])
    if not lr > 0:
        raise ConfigError(f"--lr: must be > 0, got {lr!r}")
    t0 = time.time()
    model, tok = load_model(args.base)
    base_rec = read_record(args.base, required=False)
    base_name = base_rec.model_id if base_rec else args.base.name
    stored_dtype = getattr(torch, str(model.config.to_dict().get("dtype") or "float32").replace("torch.", ""), torch.float32)
    recipe = {"steps": args.steps, "batch_size": args.batch_size, "lr": lr, "warmup": args.warmup,
              "seed": args.seed, "train_embeddings": args.train_embeddings, "method": "full" if spec is None else "lora"}
    peft_model = None
    if spec is not None:
        have = linear_names(model)
        missing = [t for t in spec.target_modules if t not in have]
        if missing:
            raise ConfigError(f"--lora-targets: {missing[0]!r} is no linear layer of {args.base} "
                              f"(its linear layers: {', '.join(sorted(have))})")
        recipe["lora"] = {"r": spec.r, "alpha": spec.alpha, "target_modules": list(spec.target_modules),
                          "dropout": spec.dropout}
        torch.manual_seed(args.seed)  # A's initialisation
        peft_model = attach_lora(model, spec, base_name=base_name)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, warmup=args.warmup,
                      seed=args.seed, freeze_embeddings=not args.train_embeddings)
    summary = train(model, tok, read_jsonl(args.data), cfg, desc=f"finetune {args.name}", device=device,
                    autocast=autocast)
    base_uid = base_rec.uid if base_rec else None
    record = ModelRecord(
        model_id=args.name, role="expert", stage="finetune", uid=args.uid, domain=args.domain, base=base_name,
        source={"type": "finetune", "base": str(args.base), "base_uid": base_uid,
                "base_fingerprint": base_rec.fingerprint if base_rec else None, "data": str(args.data),
                "recipe": recipe},
        runtime_s=round(time.time() - t0, 2), extra={"train": summary, "compute": hw},
    )
    if peft_model is None:
        save_model(model, tok, args.out, record, dtype=stored_dtype)
    else:
        from mergesweep.checkpoints.layout import checkpoint_fingerprint

        save_adapter(peft_model, tok, args.out, record, base_uid=base_uid,
                     base_fingerprint=checkpoint_fingerprint(args.base))
    log.info("expert %s (%s) written to %s", args.name, recipe["method"], args.out)
    return 0
