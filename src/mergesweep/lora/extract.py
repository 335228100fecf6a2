"""LoRA extraction from a dense expert: truncated SVD of its task vector, per linear weight.

For every 2-D weight ``W`` of the decoder's linear layers (``q_proj k_proj v_proj o_proj
gate_proj up_proj down_proj`` by default) the task vector ``τ = θ_expert − θ_base`` is factored
by its singular value decomposition ``τ = U diag(S) Vᵀ`` and truncated to rank
``R = min(rank, out, in)``:

    B = U_R · diag(S_R)   [out, R],     A = V_Rᵀ   [R, in]          (split "singular", default)
    B = U_R · diag(√S_R), A = diag(√S_R) · V_Rᵀ                      (split "sqrt")

written as a PEFT adapter with ``lora_alpha = R`` so that ``s = α / r = 1`` and ``ΔW = B @ A``.
By the Eckart–Young–Mirsky theorem ``B @ A`` is the best rank-``R`` approximation of ``τ`` in
Frobenius norm, with error ``‖τ − B A‖_F = sqrt(Σ_{i>R} S_i²)``; the record stores each module's
relative error ``‖τ − B A‖_F / ‖τ‖_F`` (measured, not derived) and their summary. This is what
"Towards Reversible Model Merging for Low-rank Weights" (RMM) calls *post-training SVD
compression*: a fine-tune-free way to get low-rank experts from any dense one (the idea of
mergekit's LoRA extraction).

Not represented by the adapter (LoRA adapts linear layers only): embeddings, ``lm_head``,
normalisation weights, biases, and any linear layer not in the module list. The record says
what fraction of the task vector lies there (``outside_norm`` = ‖τ_outside‖ / ‖τ‖, and
``outside_energy`` = its square); a model rebuilt from the adapter keeps the base's values for
those tensors.

``svd="exact"`` (default) uses ``torch.linalg.svd`` in float32; ``svd="lowrank"`` uses
``torch.svd_lowrank`` (randomised, ``q = R + 10`` columns, 4 power iterations, seeded) for
large matrices where only a small rank is wanted - approximate.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from mergesweep.checkpoints.layout import CheckpointError, CheckpointReader
from mergesweep.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from mergesweep.record import ModelRecord

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MODULES", "SPLITS", "SVDS", "extract_lora", "truncated_factors"]

#: the decoder's linear layers of Llama-family models
DEFAULT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPLITS = ("singular", "sqrt")
SVDS = ("exact", "lowrank")


def check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"rank: expected a positive integer, got {rank!r}")
    return rank


def truncated_factors(tau: "torch.Tensor", rank: int, *, split: str = "singular", svd: str = "exact",
                      seed: int = 0) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``(B [out, R], A [R, in])`` with ``B @ A`` the rank-``R`` truncated SVD of ``tau``
    (``R = min(rank, *tau.shape)``), computed in float32 on ``tau``'s device (module docstring)."""
    import torch

    check_rank(rank)
    if split not in SPLITS:
        raise ConfigError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
    if svd not in SVDS:
        raise ConfigError(f"svd: {svd!r} is not one of {', '.join(SVDS)}")
    t = tau.to(torch.float32)
    r = min(rank, *t.shape)
    if svd == "lowrank" and r < min(t.shape):
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            u, s, v = torch.svd_lowrank(t, q=min(r + 10, *t.shape), niter=4)
        finally:
            torch.random.set_rng_state(gen_state)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    if split == "sqrt":
        root = s.sqrt()
        return (u * root).contiguous(), (root[:, None] * vh).contiguous()
    return (u * s).contiguous(), vh.contiguous()


def _short(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``q_proj``."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 and parts[-1] == "weight" else ""


def extract_lora(
    base: str | os.PathLike,
    expert: str | os.PathLike,
    out: str | os.PathLike,
    *,
    rank: int,
    modules: Sequence[str] = DEFAULT_MODULES,
    split: str = "singular",
    svd: str = "exact",
    name: str | None = None,
    domain: str | None = None,
    uid: str | None = None,
    device: str = "cpu",
) -> "ModelRecord":
    """Extract a rank-``rank`` LoRA adapter of ``expert`` over ``base`` into ``out`` (atomically):
    the PEFT files (:func:`mergesweep.lora.write.write_adapter`), the expert's tokenizer files
    and the record (role expert, stage ``extract``; ``domain`` defaults to the expert's recorded
    one; ``adapter``: summary, base uid and fingerprint, extraction errors). ``expert`` may
    itself be an adapter over ``base``. ConfigError for bad options, CheckpointError naming the
    tensor when expert and base differ in shapes or tensors."""
    import torch

    from mergesweep.atomic import atomic_dir
    from mergesweep.checkpoints.layout import checkpoint_fingerprint, copy_non_weight_files
    from mergesweep.lora.adapter import AdapterReader, open_checkpoint
    from mergesweep.lora.write import write_adapter
    from mergesweep.merge.engine import parse_device
    from mergesweep.merge.identity import checkpoint_uid
    from mergesweep.merge.names import is_embedding, is_lm_head
    from mergesweep.record import ModelRecord, peak_rss_mb, read_record

    t0 = time.perf_counter()
    check_rank(rank)
    if split not in SPLITS:
        raise ConfigError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
    if svd not in SVDS:
        raise ConfigError(f"svd: {svd!r} is not one of {', '.join(SVDS)}")
    if isinstance(modules, str) or not modules or not all(isinstance(m, str) and m for m in modules):
        raise ConfigError(f"modules: expected a non-empty list of module names (e.g. q_proj), got {modules!r}")
    dev = parse_device(device)
    base, expert, out = Path(base), Path(expert), Path(out)
    wanted = set(modules)
    factors: dict[str, tuple] = {}
    errors: dict[str, float] = {}
    inside2 = outside2 = 0.0
    with CheckpointReader(base, "base") as b_in, open_checkpoint(expert, "expert", base=base) as e_in:
        b_keys, e_keys = b_in.keys(), set(e_in.keys())
        for k in b_keys:
            if k not in e_keys:
                raise CheckpointError(f"expert {expert}: tensor '{k}' of the base {base} is missing")
        extra = sorted(e_keys - set(b_keys))
        if extra:
            raise CheckpointError(f"expert {expert}: has tensor '{extra[0]}' that the base {base} lacks")
        for k in b_keys:  # every shape checked before anything is computed
            if tuple(b_in.shape(k)) != tuple(e_in.shape(k)):
                raise CheckpointError(f"tensor '{k}': the expert {expert} has shape {list(e_in.shape(k))} but the "
                                      f"base {base} has {list(b_in.shape(k))} (not the same architecture)")
        found = set()
        for k in b_keys:
            if not b_in.is_floating_point(k):
                continue
            tau = e_in.get(k).to(dev, torch.float32) - b_in.get(k).to(dev, torch.float32)
            n2 = float(tau.square().sum())
            short = _short(k)
            if short in wanted and tau.dim() == 2 and not is_embedding(k) and not is_lm_head(k):
                found.add(short)
                bf, af = truncated_factors(tau, rank, split=split, svd=svd)
                resid = float(torch.linalg.norm(tau - bf @ af))
                errors[k] = resid / math.sqrt(n2) if n2 > 0 else 0.0
                factors[k] = (bf.cpu(), af.cpu())
                inside2 += n2
            else:
                outside2 += n2
            del tau
        missing = [m for m in modules if m not in found]
        if missing:
            raise ConfigError(f"modules: '{missing[0]}' matches no 2-D linear weight of the base {base} "
                              "(module names are the last component before .weight, e.g. q_proj)")
        config = dict(b_in.config)
    ranks = {k: int(a.shape[0]) for k, (_, a) in factors.items()}
    common = max(set(ranks.values()), key=lambda r: (list(ranks.values()).count(r), r))
    alpha_pattern = {k[: -len(".weight")]: float(r) for k, r in ranks.items() if r != common}
    total2 = inside2 + outside2
    outside_norm = math.sqrt(outside2 / total2) if total2 > 0 else 0.0
    if outside_norm > 0.05:
        log.warning("%.1f%% of the task vector's norm lies outside the adapted modules (embeddings, norms, "
                    "lm_head, other layers) and is not represented by the adapter", 100 * outside_norm)
    vals = list(errors.values())
    base_rec, exp_rec = read_record(base, required=False), read_record(expert, required=False)
    base_name = base_rec.model_id if base_rec is not None else base.name
    extraction = {
        "rank": rank, "split": split, "svd": svd, "modules": list(modules),
        "relative_error": {"mean": statistics.fmean(vals), "median": statistics.median(vals), "max": max(vals),
                           "min": min(vals)},
        "relative_error_per_module": {k[: -len(".weight")]: round(v, 6) for k, v in errors.items()},
        "outside_norm": outside_norm,
        "outside_energy": outside2 / total2 if total2 > 0 else 0.0,
        "architecture": (config.get("architectures") or [None])[0],
    }
    with atomic_dir(out) as tmp:
        copy_non_weight_files(expert if (expert / "tokenizer_config.json").exists() else base, tmp)
        write_adapter(tmp, factors, lora_alpha=float(common), alpha_pattern=alpha_pattern,
                      base_model_name_or_path=base_name)
        with AdapterReader(tmp) as ad:
            summary = ad.summary()
        record = ModelRecord(
            model_id=name or out.name, role="expert", stage="extract", uid=uid,
            domain=domain if domain is not None else (exp_rec.domain if exp_rec else None),
            base=base_name,
            source={"type": "extract", "expert": str(expert), "expert_uid": checkpoint_uid(expert),
                    "expert_fingerprint": checkpoint_fingerprint(expert),
                    "expert_model_id": exp_rec.model_id if exp_rec else None},
            runtime_s=round(time.perf_counter() - t0, 3), peak_rss_mb=peak_rss_mb(),
            extra={"adapter": {**summary, "base_uid": checkpoint_uid(base),
                               "base_fingerprint": checkpoint_fingerprint(base)},
                   "extraction": extraction},
        )
        from mergesweep.record import write_record

        write_record(tmp, record)
    log.info("extracted a rank-%d LoRA of %s (%d modules, relative error mean %.3f, max %.3f; %.1f%% of the "
             "task vector's norm outside them) into %s", rank, expert, len(factors), extraction["relative_error"]["mean"],
             extraction["relative_error"]["max"], 100 * outside_norm, out)
    return record
