"""LoRA-native merges (``lora_lego``, ``knots``, ``rmm``): factors in, an adapter or an RMM basis out.

:func:`mergesweep.merge.engine.merge_checkpoints` hands a merge to :func:`merge_adapters` when the
method's spec has ``merge_adapters`` (after validating the options). Every expert must be a PEFT
LoRA adapter (:mod:`mergesweep.lora.adapter`) trained on the base; a dense expert is a MergeError
naming it. For each module (base weight) adapted by at least one expert - the union of the
experts' modules, in natural order - the method's module kernel
(``spec.merge_adapters(factors, params, name)``, :mod:`mergesweep.merge.methods._lora`) gets each
expert's ``(B, A, scaling)`` (``None`` for an expert that does not adapt the module: its ΔW is 0).
Only factor-sized matrices are ever held (the merged factors of every module: one adapter's
size; for RMM the basis, about the experts' size); nothing ``[out, in]`` is formed except, with
``dense: true``, one tensor at a time while writing the dense model.

Outputs, written atomically (nothing is left on failure):

* ``lora_lego``, ``knots``: a PEFT adapter (:func:`mergesweep.lora.write.write_adapter`; each
  module's scale folded into its factors, so ``W' = W + B @ A``), the base's tokenizer files, the
  record ``mergesweep.json`` (role ``merged``; ``adapter`` extra like an expert adapter's, with the
  base's uid and fingerprint) and a model card ``README.md``; with ``dense: true`` (lora_lego) also
  the dense model ``base + ΔW`` under ``dense/`` (config, shards, tokenizer files, a record);
* ``rmm``: ``rmm.safetensors`` (per module ``<name>.basis_B``, ``.basis_A``, ``.cores``,
  ``.coefficients``), ``rmm.json`` (tasks, components, modules, per-task relative reconstruction
  error), the record and the card; :mod:`mergesweep.lora.revert` turns it back into each task's
  adapter.

The computation runs on the CPU whatever ``device`` says (it is recorded as ``cpu``): the
matrices are factor-sized and the k-means/QR/SVD steps are latency-bound on small tensors.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from mergesweep.errors import ConfigError, MergeError

log = logging.getLogger(__name__)

__all__ = ["merge_adapters", "RMM_WEIGHTS", "RMM_META", "RMM_FORMAT", "write_lora_factors", "open_adapter_experts"]

RMM_WEIGHTS = "rmm.safetensors"
RMM_META = "rmm.json"
RMM_FORMAT = "mergesweep-rmm"
DENSE_DIR = "dense"


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def open_adapter_experts(method: str, base_in, experts, names, stack: ExitStack) -> list:
    """Each expert as an :class:`~mergesweep.lora.adapter.AdapterReader`, checked against the
    base (modules and shapes; the record's base fingerprint when it has one). A dense expert is a
    MergeError naming it."""
    from mergesweep.checkpoints.layout import checkpoint_fingerprint
    from mergesweep.lora.adapter import AdapterError, AdapterReader, adapter_record_fingerprint, is_adapter

    readers = []
    base_fp = None
    for i, path in enumerate(experts):
        label = f"expert {i} ({names[i]})"
        if not is_adapter(path):
            raise MergeError(f"{label}: {path} is a dense checkpoint, not a LoRA adapter (no adapter_config.json); "
                             f"method '{method}' merges LoRA adapters' factors (fine-tune the expert with "
                             "finetune.method: lora, fetch an adapter, or extract one: mergesweep lora-extract)")
        reader = stack.enter_context(AdapterReader(path, label))
        want = adapter_record_fingerprint(path)
        if want:
            base_fp = base_fp or checkpoint_fingerprint(base_in.path)
            if want != base_fp:
                raise AdapterError(f"{label}: the record of adapter {path} says it was made on a base with "
                                   f"fingerprint {want}, but the base given, {base_in.path}, has fingerprint "
                                   f"{base_fp} (another base, or a changed one)")
        reader.check_base(base_in)
        readers.append(reader)
    return readers


def _module_factors(reader, name: str):
    """``(B, A, scaling)`` of one module of one adapter (``fan_in_fan_out`` transposed away)."""
    b, a = reader.factors(name)
    if reader.lora_config.fan_in_fan_out:  # ΔW = (s B A)^T
        b, a = a.T.contiguous(), b.T.contiguous()
    return b, a, reader.scaling(name)


def _union_modules(readers) -> list[str]:
    from mergesweep.lora.adapter import _natural_key

    names = {n for r in readers for n in r.modules()}
    return sorted(names, key=_natural_key)


# --------------------------------------------------------------------------------------------
# writing factors as an adapter
# --------------------------------------------------------------------------------------------
def write_lora_factors(out_dir: Path, merged: dict, *, dtype: torch.dtype, base_model_name_or_path: str | None,
                       record=None) -> list[str]:
    """Write ``merged`` (base weight name -> ``(B, A)`` with ``ΔW = B @ A``, scale folded in) as a
    PEFT adapter: ``lora_alpha`` = the most common rank ``r0``, so a module of rank ``r`` has
    scaling ``r0 / r`` and its ``B`` is stored multiplied by ``r / r0`` (the update is unchanged).
    Modules of rank 0 (a zero update) are left out."""
    from mergesweep.lora.write import write_adapter

    merged = {n: (b, a) for n, (b, a) in merged.items() if a.shape[0] > 0}
    if not merged:
        raise MergeError("the merged update is zero in every module: no adapter to write")
    counts = Counter(int(a.shape[0]) for _, a in merged.values())
    r0 = max(counts, key=lambda k: (counts[k], k))
    factors = {n: ((b * (a.shape[0] / r0)).to(dtype), a.to(dtype)) for n, (b, a) in merged.items()}
    return write_adapter(out_dir, factors, lora_alpha=float(r0), base_model_name_or_path=base_model_name_or_path,
                         record=record)


def _base_name(readers, base: Path) -> str:
    """The ``base_model_name_or_path`` the experts agree on, else the base's directory."""
    names = {r.lora_config.base_model_name_or_path for r in readers}
    return next(iter(names)) if len(names) == 1 and next(iter(names)) else str(base)


def adapter_extra(out_dir: Path, base_uid: str | None, base_fingerprint: str) -> dict:
    """The ``adapter`` extra of a written adapter's record (as the LoRA experts carry it)."""
    from mergesweep.lora.adapter import AdapterReader

    with AdapterReader(out_dir) as r:
        return {**r.summary(), "base_uid": base_uid, "base_fingerprint": base_fingerprint}


# --------------------------------------------------------------------------------------------
# the merge
# --------------------------------------------------------------------------------------------
def merge_adapters(opts, out_dir, *, expect_model_id: str | None = None, t0: float | None = None) -> dict:
    """Merge the LoRA experts of ``opts`` (the engine's validated options) with a LoRA-native
    method into ``out_dir``; returns the record (as a dict). See the module docstring."""
    from mergesweep.atomic import atomic_dir
    from mergesweep.checkpoints.layout import (CheckpointReader, checkpoint_fingerprint, copy_non_weight_files,
                                               dtype_name, parse_dtype)
    from mergesweep.merge.provenance import identify_merge

    t0 = time.perf_counter() if t0 is None else t0
    spec = opts.spec
    if opts.base is None:
        raise ConfigError(f"base: method '{spec.name}' needs the base the adapters were trained on")
    if opts.align:
        raise ConfigError(f"align: method '{spec.name}' merges LoRA adapters; alignment permutes dense checkpoints")
    # no parameter of these methods is per-expert, so the resolved kernel parameters are the
    # recorded ones (the id is the one the plan computes from the raw parameters)
    identity = identify_merge(spec.name, opts.kparams, opts.names, opts.base, opts.experts, None,
                              dtype=opts.dtype, vocab_policy=opts.vocab_policy)
    if expect_model_id is not None and expect_model_id != identity.model_id:
        raise MergeError(f"model id mismatch: expected {expect_model_id} (the plan's) but these inputs and "
                         f"settings give {identity.model_id}; the plan and the merge engine disagree")
    out_dtype = parse_dtype(opts.dtype) or torch.float32
    reversible = spec.reversible
    with ExitStack() as stack:
        base_in = stack.enter_context(CheckpointReader(opts.base, "base"))
        readers = open_adapter_experts(spec.name, base_in, opts.experts, opts.names, stack)
        modules = _union_modules(readers)
        results: dict[str, Any] = {}
        with torch.inference_mode():
            for name in modules:
                factors = [_module_factors(r, name) if name in r else None for r in readers]
                results[name] = spec.merge_adapters(factors, opts.kparams, name)
        base_fp = checkpoint_fingerprint(opts.base)
        with atomic_dir(out_dir) as tmp:
            if reversible:
                files, info, n_tensors, n_params = _write_rmm(tmp, results, opts, out_dtype)
                adapter = None
            else:
                merged = {n: (r.b, r.a) for n, r in results.items()}
                files = write_lora_factors(tmp, merged, dtype=out_dtype,
                                           base_model_name_or_path=_base_name(readers, opts.base))
                files += copy_non_weight_files(opts.base, tmp)
                ranks = Counter(int(r.a.shape[0]) for r in results.values() if r.a.shape[0] > 0)
                info = {"ranks": {str(k): v for k, v in sorted(ranks.items())}, "modules": len(results)}
                if spec.name == "lora_lego":
                    info["units"] = sum(r.units for r in results.values())
                    info["output_scale"] = sorted({round(r.output_scale, 6) for r in results.values()})
                n_tensors = 2 * sum(1 for r in results.values() if r.a.shape[0] > 0)
                n_params = sum(r.b.numel() + r.a.numel() for r in results.values() if r.a.shape[0] > 0)
                adapter = adapter_extra(tmp, identity.base_uid, base_fp)
                if opts.kparams.get("dense"):
                    files += [f"{DENSE_DIR}/{f}" for f in
                              _write_dense(tmp / DENSE_DIR, base_in, merged, opts, identity, t0)]
            record = _record(tmp, opts, identity, files, out_dtype, n_tensors, n_params, info, adapter, t0)
    log.info("merged %s with %s into %s in %.1f s (peak RSS %.0f MB)", ", ".join(opts.names), spec.name, out_dir,
             record.runtime_s, record.peak_rss_mb)
    return record.to_dict()


def _settings(opts, out_dtype: torch.dtype) -> dict:
    from mergesweep.checkpoints.layout import dtype_name
    from mergesweep.devices import device_summary

    return {"dtype": dtype_name(out_dtype), "requested_dtype": opts.dtype, "device": "cpu",
            "hardware": device_summary("cpu"), "vocab_policy": opts.vocab_policy, "tie_policy": opts.tie_policy,
            "shard_size": opts.shard_size}


def _record(tmp: Path, opts, identity, files: list[str], out_dtype, n_tensors: int, n_params: int, info: dict,
            adapter: dict | None, t0: float):
    from mergesweep.checkpoints.layout import checkpoint_fingerprint
    from mergesweep.merge.card import render_model_card
    from mergesweep.merge.provenance import merged_record
    from mergesweep.record import RECORD_FILE, peak_rss_mb, write_record

    files = [*files, "README.md", RECORD_FILE]
    record = merged_record(
        identity, opts.spec.name, base=opts.base, experts=opts.experts, expert_names=opts.names, align=None,
        fingerprint=checkpoint_fingerprint(tmp), settings=_settings(opts, out_dtype),
        output={"files": sorted(set(files)), "num_tensors": n_tensors, "num_parameters": n_params,
                "statistics": None, "method_info": info, **({"adapter": adapter} if adapter else {})},
        runtime_s=round(time.perf_counter() - t0, 3), peak_rss_mb=peak_rss_mb(),
    )
    (tmp / "README.md").write_text(render_model_card(record))
    write_record(tmp, record)
    return record


# --------------------------------------------------------------------------------------------
# RMM's artefact
# --------------------------------------------------------------------------------------------
def _write_rmm(tmp: Path, results: dict, opts, out_dtype: torch.dtype):
    """``rmm.safetensors`` + ``rmm.json``; returns (files, method info, tensors, parameters)."""
    from safetensors.torch import save_file

    from mergesweep.checkpoints.layout import dtype_name
    from mergesweep.merge.methods.rmm import components

    n = len(opts.names)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    sq_norm = torch.zeros(n, dtype=torch.float64)
    sq_err = torch.zeros(n, dtype=torch.float64)
    for name, mod in results.items():
        if mod is None:
            continue
        tensors[f"{name}.basis_B"] = mod.b.to(out_dtype).contiguous()
        tensors[f"{name}.basis_A"] = mod.a.to(out_dtype).contiguous()
        tensors[f"{name}.cores"] = mod.cores.to(out_dtype).contiguous()
        tensors[f"{name}.coefficients"] = mod.coefficients.float().contiguous()  # always float32
        modules[name] = {"shape": [int(mod.b.shape[0]), int(mod.a.shape[1])], "core": list(mod.cores.shape[1:]),
                         "components": int(mod.cores.shape[0])}
        sq_norm += mod.sq_norms
        sq_err += mod.sq_errors
    rel = [float(math.sqrt(e / s)) if s > 0 else 0.0 for e, s in zip(sq_err.tolist(), sq_norm.tolist())]
    meta = {
        "format": RMM_FORMAT, "version": 1, "method": "rmm",
        "tasks": list(opts.names),
        "components": components(opts.kparams, n),
        "dtype": dtype_name(out_dtype),
        "modules": modules,
        "reconstruction": {"relative_error": dict(zip(opts.names, rel)),
                           "definition": "sqrt(sum_modules ||ΔW_k - ΔW^_k||_F^2 / sum_modules ||ΔW_k||_F^2)"},
    }
    save_file(tensors, str(tmp / RMM_WEIGHTS), metadata={"format": RMM_FORMAT})
    (tmp / RMM_META).write_text(json.dumps(meta, indent=2) + "\n")
    info = {"components": meta["components"], "modules": len(modules),
            "relative_error": {k: round(v, 6) for k, v in zip(opts.names, rel)}}
    return [RMM_WEIGHTS, RMM_META], info, len(tensors), sum(t.numel() for t in tensors.values())


# --------------------------------------------------------------------------------------------
# the dense model base + ΔW (lora_lego, dense: true)
# --------------------------------------------------------------------------------------------
def _write_dense(dense: Path, base_in, merged: dict, opts, identity, t0: float) -> list[str]:
    """Stream the base's tensors, adding each module's ``B @ A``, into ``dense`` (config,
    shards, tokenizer files, a record); one tensor's ΔW at a time. Returns the files written."""
    from mergesweep.checkpoints.layout import cache_fingerprint, copy_non_weight_files, dtype_name, parse_dtype
    from mergesweep.merge.io import PlannedShardWriter
    from mergesweep.merge.provenance import merged_record
    from mergesweep.record import RECORD_FILE, peak_rss_mb, write_record

    dense.mkdir()
    want = parse_dtype(opts.dtype)
    out_dtype = want or base_in.default_dtype
    config = dict(base_in.config)
    for key in ("dtype", "torch_dtype"):
        if key in config or (key == "torch_dtype" and "dtype" not in config):
            config[key] = dtype_name(out_dtype)
    (dense / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copied = copy_non_weight_files(base_in.path, dense)
    keys = list(base_in.keys())
    plan = [(k, tuple(base_in.shape(k)), (out_dtype if base_in.is_floating_point(k) else base_in.dtype(k)))
            for k in keys]
    writer = PlannedShardWriter(dense, plan, opts.shard_size)
    writer.start(fingerprint=True)
    try:
        for name, _, dt in plan:
            t = base_in.get(name)
            if name in merged:
                b, a = merged[name]
                t = (t.float() + b.float() @ a.float()).to(dt)
            elif t.is_floating_point():
                t = t.to(dt)
            writer.write(name, t.contiguous())
            del t
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    cache_fingerprint(dense, writer.digest)
    files = [*files, "config.json", *copied]
    record = merged_record(
        identity, opts.spec.name, base=opts.base, experts=opts.experts, expert_names=opts.names, align=None,
        fingerprint=writer.digest, settings=_settings(opts, out_dtype),
        output={"files": sorted([*files, RECORD_FILE]), "num_tensors": len(plan),
                "num_parameters": sum(math.prod(s) for _, s, d in plan if d.is_floating_point),
                "statistics": None, "method_info": {"form": "dense", "adapter": ".."}},
        runtime_s=round(time.perf_counter() - t0, 3), peak_rss_mb=peak_rss_mb(),
    )
    write_record(dense, record)
    return [*files, RECORD_FILE]
