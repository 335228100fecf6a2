"""A small causal-LM training loop shared by ``finetune`` (experts) and ``pretrain`` (tiny bases).

Loss: mean token cross-entropy on the *target* tokens of ``{"prompt", "target"}`` records
(prompt tokens are context only), or on every token with ``loss_on="all"``::

    L(θ) = − 1/|T| Σ_{t∈T} log p_θ(x_t | x_<t)

Logits are computed only at the positions that carry loss (the LM head over a 49k vocabulary is
a fifth of SmolLM2-135M's forward cost), embeddings can be frozen (``freeze_embeddings``), and the
optimiser is AdamW with linear warm-up then constant learning rate. Batches are drawn with a
seeded generator, so a run is reproducible for a given thread count.

Devices: ``device`` is a resolved device (:func:`mergesweep.devices.resolve_device`); the model
and each batch are moved there, and with ``autocast`` (a dtype from
:func:`mergesweep.devices.autocast_dtype`) the forward pass runs under ``torch.autocast`` (the
weights, gradients and optimiser state stay float32). Batches are built and drawn on the CPU from
the same seeded generator on every device, so a CUDA run sees the CPU run's batches in the same
order; the model is back on the CPU, in float32, when :func:`train` returns. On the CPU without
autocast the loop is exactly the CPU-only loop it always was.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): :func:`attach_lora`
injects, through ``peft``, a trainable low-rank update into every target linear layer while its
weight ``W`` (shape ``[out, in]``) stays frozen::

    h = W x + (α / r) · B A x,   A ∈ R^{r×in} (Kaiming-uniform init), B ∈ R^{out×r} (zero init)

so the adapted layer starts equal to the base's and the expert's task vector on that layer is
``ΔW = (α / r) · B A`` (rank ≤ r). The same :func:`train` loop then optimises only A and B (the
loop trains whatever ``requires_grad``; peft freezes everything else).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from mergesweep.devices import precision_name

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 60
    batch_size: int = 8
    lr: float = 1e-4
    warmup: int = 5
    weight_decay: float = 0.0
    freeze_embeddings: bool = True
    loss_on: str = "target"  # or "all"
    seed: int = 0
    max_length: int = 64


@dataclass
class LoraSpec:
    """Rank ``r``, ``alpha`` (ΔW = alpha/r · B A), the linear-layer names adapted, input dropout
    (defaults: the config schema's ``finetune.lora``, :func:`mergesweep.zoo.cli_finetune.lora_defaults`)."""
    r: int
    alpha: float
    target_modules: tuple[str, ...]
    dropout: float = 0.0


def linear_names(model) -> dict[str, int]:
    """The last name component of every ``torch.nn.Linear`` of ``model`` (what a peft
    ``target_modules`` entry matches) -> how many linear layers carry it."""
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            counts[leaf] = counts.get(leaf, 0) + 1
    return counts


def attach_lora(model, spec: LoraSpec, *, base_name: str | None = None):
    """Inject LoRA layers (``peft.get_peft_model``) into ``model`` in place and return the
    ``PeftModel``; only the adapters' A and B are trainable afterwards. ``model`` itself (now with
    the LoRA layers inside) is what :func:`train` trains; the returned wrapper is what saves the
    adapter. ``base_name`` is recorded as the adapter's ``base_model_name_or_path``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=list(spec.target_modules),
                        lora_dropout=spec.dropout, bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    return peft_model


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _encode(tokenizer, rec: dict, loss_on: str, max_length: int) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(rec["prompt"], add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(rec["prompt"] + rec["target"], add_special_tokens=False)["input_ids"]
    full_ids = full_ids[:max_length]
    # tokens after the prompt prefix are targets (lm-eval splits context/continuation the same way)
    n_ctx = len(prompt_ids) if full_ids[: len(prompt_ids)] == prompt_ids else len(prompt_ids) - 1
    if loss_on == "all":
        labels = list(full_ids)
        labels[0] = -100
    else:
        labels = [-100] * min(n_ctx, len(full_ids)) + full_ids[n_ctx:]
    return full_ids, labels


def _batch(encoded: list[tuple[list[int], list[int]]], pad_id: int):
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (x, y) in enumerate(encoded):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, labels, mask


def causal_lm_loss(model, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at the positions whose *next* token carries a label, computing logits there only."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    nxt = labels[:, 1:]
    sel = nxt != -100
    h = hidden[:, :-1][sel]
    logits = model.lm_head(h).float()
    return torch.nn.functional.cross_entropy(logits, nxt[sel])


def train(model, tokenizer, records: list[dict], cfg: TrainConfig, desc: str = "train", *,
          device: str = "cpu", autocast: torch.dtype | None = None,
          on_step: Callable[[int, float], None] | None = None) -> dict:
    """Train ``model`` in place on ``records`` on ``device`` (resolved: ``cpu``, ``cuda``,
    ``cuda:N``...), the forward pass autocast to ``autocast`` if given; return a summary (losses,
    tokens, seconds, device, precision). ``on_step(step, loss)`` is called after every step (loss
    curves). The model is on the CPU when this returns."""
    if not records:
        raise ValueError("no training records")
    dev = torch.device(device)
    on_cpu = dev.type == "cpu"
    if not on_cpu:
        model.to(dev)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [_encode(tokenizer, r, cfg.loss_on, cfg.max_length) for r in records]
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
        out_emb = model.get_output_embeddings()
        if out_emb is not None:
            out_emb.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    model.train()
    losses, tokens, t0 = [], 0, time.time()
    bar = tqdm(range(cfg.steps), desc=desc, unit="step", mininterval=2.0)
    for step in bar:
        batch = [encoded[rng.randrange(len(encoded))] for _ in range(cfg.batch_size)]
        ids, labels, mask = _batch(batch, pad_id)
        n_tokens = int(mask.sum())
        if not on_cpu:
            ids, labels, mask = (t.to(dev, non_blocking=True) for t in (ids, labels, mask))
        with (torch.autocast(device_type=dev.type, dtype=autocast) if autocast is not None
              else contextlib.nullcontext()):
            loss = causal_lm_loss(model, ids, labels, mask)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"{desc}: loss became {value} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(value)
        tokens += n_tokens
        bar.set_postfix(loss=f"{value:.3f}")
        if on_step is not None:
            on_step(step, value)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    if not on_cpu:
        del opt, sched, params
        model.to("cpu")
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()
    seconds = time.time() - t0
    k = max(1, len(losses) // 10)
    summary = {
        "config": asdict(cfg),
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
        "tokens": tokens,
        "trainable_params": n_trainable,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
        "device": str(dev),
        "precision": precision_name(autocast),
    }
    log.info("%s: loss %.3f -> %.3f in %.1fs on %s (%s)", desc, summary["loss_first"], summary["loss_last"], seconds,
             summary["device"], summary["precision"])
    return summary
