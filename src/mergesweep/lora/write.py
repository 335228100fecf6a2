"""Writing a PEFT LoRA adapter from its factors.

:func:`write_adapter` writes what ``peft``'s ``save_pretrained`` writes for a LoRA adapter, so
``peft.PeftModel.from_pretrained(base_model, out_dir)`` loads it (tested):

* ``adapter_config.json``: a :class:`peft.LoraConfig` (``peft_type`` LORA, peft's defaults for
  every field not given) with ``r`` the most common rank, ``rank_pattern`` naming each module of
  another rank by its full module name, ``target_modules`` the modules' short names
  (``q_proj``, ...), ``lora_alpha`` / ``alpha_pattern`` / ``use_rslora`` as given;
* ``adapter_model.safetensors``: per module ``base_model.model.<module>.lora_A.weight`` (``A``,
  ``[r, in]``) and ``...lora_B.weight`` (``B``, ``[out, r]``), so that the adapted weight is
  ``W + s · B @ A`` with ``s = α / r`` (``use_rslora``: ``α / √r``);
* ``mergesweep.json`` when a record is given.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from mergesweep.lora.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, AdapterError, pattern_key

if TYPE_CHECKING:
    import torch

    from mergesweep.record import ModelRecord

__all__ = ["write_adapter", "adapter_config"]


def _module_name(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def adapter_config(ranks: Mapping[str, int], *, lora_alpha: float, base_model_name_or_path: str | None,
                   rank_pattern: Mapping[str, int] | None = None, alpha_pattern: Mapping[str, float] | None = None,
                   use_rslora: bool = False, task_type: str | None = "CAUSAL_LM",
                   target_modules: list[str] | str | None = None) -> dict:
    """The ``adapter_config.json`` document (``peft.LoraConfig(...).to_dict()``, sets as sorted
    lists) of an adapter whose modules (full module names) have ``ranks``. ``r`` is the most common
    rank (the largest among equally common ones); every module of another rank gets a
    ``rank_pattern`` entry under its full name unless a given ``rank_pattern`` key already
    resolves it to its rank. Raises :class:`AdapterError` when a given pattern resolves a module
    to a rank its factors do not have. ``target_modules`` (default: the modules' short names)
    is what peft wraps when loading; a wrapped module without factors in the file keeps peft's
    initialisation (B = 0, ΔW = 0) and peft warns about the missing keys."""
    from peft import LoraConfig

    if not ranks:
        raise AdapterError("write_adapter: no modules (factors is empty)")
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))
    pattern = dict(rank_pattern or {})
    for module, rank in ranks.items():
        key = pattern_key(pattern.keys(), module)
        if key is None and rank != r:
            pattern[module] = rank
    for module, rank in ranks.items():  # the config resolves every module to its factors' rank
        key = pattern_key(pattern.keys(), module)
        got = pattern[key] if key is not None else r
        if got != rank:
            raise AdapterError(f"write_adapter: module '{module}' has rank {rank} but rank_pattern['{key}'] = {got}")
    config = LoraConfig(
        r=r, lora_alpha=lora_alpha,
        target_modules=target_modules if target_modules is not None else sorted({m.rsplit(".", 1)[-1] for m in ranks}),
        rank_pattern=pattern, alpha_pattern=dict(alpha_pattern or {}), use_rslora=bool(use_rslora),
        base_model_name_or_path=base_model_name_or_path, bias="none", lora_dropout=0.0,
        task_type=task_type, inference_mode=True)
    doc = config.to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in doc.items()}


def write_adapter(
    out_dir: str | os.PathLike,
    factors: Mapping[str, tuple["torch.Tensor", "torch.Tensor"]],
    *,
    lora_alpha: float,
    base_model_name_or_path: str | None,
    record: "ModelRecord | None" = None,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    use_rslora: bool = False,
    task_type: str | None = "CAUSAL_LM",
    target_modules: list[str] | str | None = None,
) -> list[str]:
    """Write the PEFT adapter of ``factors`` (base weight name ``...q_proj.weight`` or module
    name ``...q_proj`` -> ``(B [out, r], A [r, in])``) into ``out_dir``; returns the files written.

    The adapted weight of each module is ``W + s · B @ A`` with ``s = α / r`` (``use_rslora``:
    ``α / √r``), ``α`` from ``alpha_pattern`` or ``lora_alpha``. Factors are stored in their own
    dtype. When ``out_dir`` does not exist it is written atomically
    (:func:`mergesweep.atomic.atomic_dir`); an existing directory (e.g. the caller's temporary
    inside its own ``atomic_dir``) is written into. ``record`` (a
    :class:`~mergesweep.record.ModelRecord`) is written last, its fingerprint computed from the
    files.
    """
    tensors: dict = {}
    ranks: dict[str, int] = {}
    for name, pair in factors.items():
        module = _module_name(str(name))
        try:
            b, a = pair
        except (TypeError, ValueError):
            raise AdapterError(f"write_adapter: factors['{name}'] must be a pair (B, A)") from None
        if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
            raise AdapterError(f"write_adapter: module '{module}': B {list(b.shape)} and A {list(a.shape)} "
                               "are not [out, r] and [r, in]")
        if module in ranks:
            raise AdapterError(f"write_adapter: module '{module}' given twice")
        ranks[module] = int(a.shape[0])
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.detach().cpu().contiguous()
    doc = adapter_config(ranks, lora_alpha=lora_alpha, base_model_name_or_path=base_model_name_or_path,
                         rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, use_rslora=use_rslora,
                         task_type=task_type, target_modules=target_modules)
    out = Path(out_dir)
    if out.is_dir():
        return _write(out, tensors, doc, record)
    from mergesweep.atomic import atomic_dir

    with atomic_dir(out) as tmp:
        files = _write(tmp, tensors, doc, record)
    return files


def _write(d: Path, tensors: dict, doc: dict, record) -> list[str]:
    from safetensors.torch import save_file

    (d / ADAPTER_CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True))
    save_file(tensors, str(d / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    files = [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    if record is not None:
        from mergesweep.record import RECORD_FILE, write_record

        write_record(d, record)
        files.append(RECORD_FILE)
    return files
