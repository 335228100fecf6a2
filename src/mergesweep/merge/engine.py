"""The streaming merge engine.

For each parameter name of the reference checkpoint (the base, or the first expert when there
is no base) the engine reads that one tensor from the base and every expert, converts it to
float32 on the compute device, runs the method's kernel and writes the result, in the output
dtype, at its pre-planned offset in the output shard. Nothing else is held: peak memory is about
(inputs + 1) x the largest tensor plus the kernel's temporaries, whatever the model size.

:func:`merge_checkpoints` orchestrates the parts:

* options and identity: :mod:`mergesweep.merge.settings`, :mod:`mergesweep.merge.provenance`
  (the model id, computed before anything is read, as the workflow's plan computes it);
* inputs: :class:`mergesweep.checkpoints.layout.CheckpointReader`, or for a LoRA expert (a PEFT
  adapter directory) :class:`mergesweep.lora.adapter.LoraCheckpoint`: base + ΔW, ΔW computed per
  tensor on the fly (:func:`mergesweep.lora.adapter.open_checkpoint`);
* tensor planning (tied heads, vocabulary policy): :mod:`mergesweep.merge.tensor_plan`;
* whole-model statistics, for methods that declare them: :mod:`mergesweep.merge.statistics`;
* per-expert statistics of the ``stats`` stage (Gram matrices, Fisher), for data-aware methods
  (``MethodSpec.data_stats``): read tensor by tensor with :class:`mergesweep.stats.io.StatsReader`
  and handed to the kernel as ``ctx.expert_stats``;
* whole-model methods (``MethodSpec.merge_model``: forward passes on calibration data) are run
  once with :class:`mergesweep.merge.whole.WholeModelInputs`; their state goes through the same
  writer, record and card;
* the streaming loop (:mod:`mergesweep.merge.streaming`) into the shard writer
  (:class:`mergesweep.merge.io.PlannedShardWriter`);
* the record (:mod:`mergesweep.record`) and the model card (:mod:`mergesweep.merge.card`).

The engine changes no process-wide setting (torch threads, allocator): commands do, through
:mod:`mergesweep.merge.tuning`.

Output (written atomically): ``config.json`` (the reference's, with the output dtype),
``model.safetensors`` or shards + ``model.safetensors.index.json``, tokenizer files, a model
card ``README.md`` and the record ``mergesweep.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from mergesweep.atomic import atomic_dir
from mergesweep.checkpoints.layout import (CheckpointReader, cache_fingerprint, copy_non_weight_files,
                                           dtype_name, parse_dtype)
from mergesweep.errors import ConfigError, MergeError
from mergesweep.lora.adapter import open_checkpoint, require_dense_experts
from mergesweep.merge.config import align_by_index
from mergesweep.merge.io import PlannedShardWriter
from mergesweep.merge.methods import get_method
from mergesweep.merge.provenance import MergeIdentity, identify_merge, merged_record
from mergesweep.merge.settings import DEFAULT_SHARD_SIZE, canonical_dtype, parse_size
from mergesweep.merge.spec import MethodSpec, resolve_params
from mergesweep.merge.statistics import whole_model_statistics
from mergesweep.merge.streaming import Streaming, TensorLoader, nonfinite, prefetched
from mergesweep.merge.tensor_plan import MergePlan, check_policies, plan_tensors
from mergesweep.record import peak_rss_mb, write_record

log = logging.getLogger(__name__)

__all__ = ["merge_checkpoints", "parse_device", "parse_dtype"]


def parse_device(value: Any, key: str = "device") -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` -> torch device, resolved by
    :func:`mergesweep.devices.resolve_device` (``auto``: CUDA when this process was given a GPU,
    else CPU); a device this machine lacks is a DeviceError (a ConfigError) naming ``key``."""
    from mergesweep.devices import resolve_device

    return torch.device(resolve_device(value, key))


@dataclass
class _Options:
    """The validated arguments of one merge."""

    spec: MethodSpec
    kparams: dict  # the kernel's parameters
    names: list[str]
    base: Path | None
    experts: list[Path]
    align: dict[int, Path]
    dtype: str | None  # requested output dtype (canonical name), None: the reference's
    device: torch.device
    shard_size: int
    vocab_policy: str
    tie_policy: str
    stats: dict[int, Path]  # expert index -> statistics directory (data-aware methods)
    calibration: dict[int, dict]  # expert index -> {"path": Path, "uid": str | None} (whole-model methods)
    calibration_settings: dict


def merge_checkpoints(
    method: str,
    base: str | os.PathLike | None,
    experts: Sequence[str | os.PathLike],
    params: Mapping[str, Any] | None,
    out_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    align: Mapping | None = None,
    vocab_policy: str = "error",
    tie_policy: str = "error",
    expert_names: Sequence[str] | None = None,
    expect_model_id: str | None = None,
    stats: Mapping | None = None,
    calibration: Mapping | None = None,
    calibration_settings: Mapping | None = None,
) -> dict:
    """Merge ``experts`` (and ``base``) with ``method`` into the HF checkpoint ``out_dir``.

    ``params`` are the method's parameters (see ``mergesweep methods``); per-expert values are
    lists in expert order, ``{per_expert: [...]}`` or a mapping by expert name
    (``expert_names``, default: the directory names). ``dtype`` is the output dtype (default:
    the reference's, see :class:`~mergesweep.checkpoints.layout.CheckpointReader`); computation
    is float32 on ``device``. ``align`` maps expert index (or name) -> permutation map file,
    applied to that expert while streaming. ``vocab_policy``: ``error`` (default), ``base`` (keep
    the base's embedding rows; an expert's extra rows are dropped, missing ones taken from the
    base; needs a base) or ``truncate`` (keep the rows every input has). ``tie_policy``:
    ``error`` (default) refuses inputs that disagree with the reference on tied embeddings,
    ``allow`` merges them anyway (see :mod:`mergesweep.merge.tensor_plan`); both are logged.
    ``expect_model_id``: the id the caller planned; a different computed id is a MergeError
    (the plan and the engine disagree on what this merge is). ``stats`` maps expert index (or
    name) -> statistics directory of the ``stats`` stage, for methods that read them;
    ``calibration`` maps expert -> calibration JSONL (or ``{path, uid}``) and
    ``calibration_settings`` gives ``examples``, ``max_length``, ``batch_size``, for whole-model
    methods (:data:`mergesweep.merge.settings.CALIBRATION_DEFAULTS` fill what is not given).

    Returns the record written to ``out_dir/mergesweep.json`` (as a dict). Raises
    :class:`ConfigError` for invalid parameters/options and :class:`MergeError` /
    ``CheckpointError`` for unusable inputs; ``out_dir`` is then left untouched.
    """
    t0 = time.perf_counter()
    opts = _validate(method, base, experts, params, dtype, device, shard_size, align, vocab_policy, tie_policy,
                     expert_names, stats, calibration, calibration_settings)
    if opts.spec.merge_adapters is not None:  # LoRA-native: factors in, an adapter (or RMM basis) out
        from mergesweep.merge.lora_merge import merge_adapters

        return merge_adapters(opts, out_dir, expect_model_id=expect_model_id, t0=t0)
    with ExitStack() as stack:
        base_in = stack.enter_context(open_checkpoint(opts.base, "base")) if opts.base is not None else None
        # a LoRA expert (PEFT adapter directory) is read as base + ΔW, one tensor at a time
        expert_ins = [stack.enter_context(open_checkpoint(p, f"expert {i} ({opts.names[i]})", base=opts.base))
                      for i, p in enumerate(opts.experts)]
        require_dense_experts(opts.spec.name, opts.spec.uses_whole_model(opts.kparams), expert_ins)
        stats_in = _open_stats(opts, stack)
        identity = identify_merge(opts.spec.name, params, opts.names, opts.base, opts.experts, opts.align,
                                  dtype=opts.dtype, vocab_policy=opts.vocab_policy,
                                  data_uids=_data_uids(opts, stats_in))
        if expect_model_id is not None and expect_model_id != identity.model_id:
            raise MergeError(f"model id mismatch: expected {expect_model_id} (the plan's) but these inputs and "
                             f"settings give {identity.model_id}; the plan and the merge engine disagree")
        reference = base_in or expert_ins[0]
        out_dtype = parse_dtype(opts.dtype) or reference.default_dtype
        if opts.spec.uses_whole_model(opts.kparams):
            record = _merge_whole_model(opts, identity, reference, out_dtype, out_dir, t0)
            log.info("merged %s with %s into %s in %.1f s (peak RSS %.0f MB)", ", ".join(opts.names),
                     opts.spec.name, out_dir, record.runtime_s, record.peak_rss_mb)
            return record.to_dict()
        plan = plan_tensors(reference, base_in, expert_ins, out_dtype, opts.vocab_policy, opts.tie_policy)
        stream = _streaming(opts, reference, base_in, expert_ins, stats_in)
        with torch.inference_mode():
            requests = opts.spec.requests(opts.kparams, len(expert_ins))
            stats = whole_model_statistics(stream, requests, plan.tensors) if requests else {}
            with atomic_dir(out_dir) as tmp:
                copied = _write_config_files(tmp, reference, out_dtype, plan.vocab_size)
                files, fingerprint = _write_weights(tmp, plan, stream, stats, identity.params, opts.shard_size)
                record = _write_record_and_card(tmp, opts, identity, plan, stats, out_dtype,
                                                files + ["config.json"] + copied, fingerprint, t0)
    log.info("merged %s with %s into %s in %.1f s (peak RSS %.0f MB)", ", ".join(opts.names), opts.spec.name,
             out_dir, record.runtime_s, record.peak_rss_mb)
    return record.to_dict()


def _validate(method, base, experts, params, dtype, device, shard_size, align, vocab_policy, tie_policy,
              expert_names, stats=None, calibration=None, calibration_settings=None) -> _Options:
    """Check every argument before any input is opened (ConfigError naming the key)."""
    spec = get_method(method)
    if isinstance(experts, (str, os.PathLike)) or not experts:
        raise ConfigError("experts: expected a non-empty list of checkpoint directories")
    expert_paths = [Path(e) for e in experts]
    base_path = Path(base) if base is not None else None
    n = len(expert_paths)
    names = [str(x) for x in expert_names] if expert_names is not None else _default_names(expert_paths)
    if len(names) != n:
        raise ConfigError(f"expert_names: {len(names)} names for {n} experts")
    spec.check_inputs(n, base_path is not None)
    kparams, _ = resolve_params(spec, params, n, names, has_base=base_path is not None)
    if isinstance(dtype, torch.dtype):
        dtype = dtype_name(dtype)
    check_policies(vocab_policy, tie_policy, has_base=base_path is not None)
    from mergesweep.merge.config import by_expert_index
    from mergesweep.merge.settings import check_calibration_settings

    align_idx = align_by_index(align, names) or {}
    stats_idx = by_expert_index(stats, names, "stats", kind="dir") or {}
    calib_idx = {i: (v if isinstance(v, Mapping) else {"path": v, "uid": None})
                 for i, v in (by_expert_index(calibration, names, "calibration", kind="calibration") or {}).items()}
    kinds = () if spec.uses_whole_model(kparams) else spec.stats_kinds(kparams)
    if kinds:
        missing = [names[i] for i in range(n) if i not in stats_idx]
        if missing:
            raise ConfigError(f"stats.{missing[0]}: method '{spec.name}' reads the {', '.join(kinds)} statistics of "
                              "every expert (the stats stage: mergesweep stats); none given for this expert")
        if align_idx:
            raise ConfigError(f"align: method '{spec.name}' reads statistics computed on the unaligned experts; "
                              "alignment cannot be combined with it")
    elif stats_idx:
        raise ConfigError(f"stats: method '{spec.name}' reads no statistics with these parameters")
    if spec.uses_whole_model(kparams):
        missing = [names[i] for i in range(n) if i not in calib_idx]
        if missing:
            raise ConfigError(f"calibration.{missing[0]}: method '{spec.name}' runs its experts on calibration data "
                              "(a JSONL file per expert, from its own domain); none given for this expert")
        if align_idx:
            raise ConfigError(f"align: method '{spec.name}' does its own matching; drop align")
    elif calib_idx:
        raise ConfigError(f"calibration: method '{spec.name}' reads no calibration data with these parameters")
    csettings = check_calibration_settings(calibration_settings)
    return _Options(spec, kparams, names, base_path, expert_paths, align_idx,
                    canonical_dtype(dtype), parse_device(device), parse_size(shard_size), vocab_policy, tie_policy,
                    stats_idx, calib_idx, csettings)


def _open_stats(opts: _Options, stack: ExitStack) -> list:
    """Per expert, its statistics reader (checked: the kinds the method reads, computed on this
    very expert), or None for methods that read no statistics."""
    kinds = () if opts.spec.uses_whole_model(opts.kparams) else opts.spec.stats_kinds(opts.kparams)
    if not kinds:
        return [None] * len(opts.experts)
    from mergesweep.merge.identity import checkpoint_uid
    from mergesweep.stats.io import StatsReader

    readers = []
    for i, path in enumerate(opts.experts):
        label = f"statistics of expert {i} ({opts.names[i]})"
        r = stack.enter_context(StatsReader(opts.stats[i], label))
        readers.append(r.require(kinds, model_uid=checkpoint_uid(path)))
    return readers


def _data_uids(opts: _Options, stats_in: list) -> list[str | None] | None:
    """Per expert, the uid of the data the method reads for it (hashed into the model id)."""
    from mergesweep.merge.identity import expert_data_uids

    stats = {i: r.dir for i, r in enumerate(stats_in) if r is not None}
    return expert_data_uids(len(opts.experts), stats, opts.calibration, opts.calibration_settings)


def _default_names(experts: Sequence[Path]) -> list[str]:
    names = [p.name or str(p) for p in experts]
    if len(set(names)) != len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    return names


def _streaming(opts: _Options, reference: CheckpointReader, base_in: CheckpointReader | None,
               expert_ins: Sequence[CheckpointReader], stats_in: Sequence | None = None) -> Streaming:
    """The loader and kernel context of this merge (alignment maps loaded, layout checked)."""
    config = dict(reference.config)
    num_layers = config.get("num_hidden_layers") or config.get("n_layer")
    if opts.spec.check_layout:
        opts.spec.check_layout(opts.kparams, num_layers)
    align_maps = {}
    if opts.align:
        from mergesweep.align.apply import load_perm_map

        align_maps = {i: load_perm_map(p) for i, p in opts.align.items()}
    loader = TensorLoader(reference, [base_in, *expert_ins], opts.device, align_maps, config)
    return Streaming(opts.spec, opts.kparams, len(expert_ins), num_layers, int(opts.kparams.get("seed", 0) or 0),
                     opts.device, loader, uses_base=opts.spec.base != "unused" and base_in is not None,
                     stats_readers=list(stats_in) if stats_in and any(r is not None for r in stats_in) else None,
                     stats_kinds=tuple(opts.spec.stats_kinds(opts.kparams)))


def _write_config_files(tmp: Path, reference: CheckpointReader, out_dtype: torch.dtype,
                        vocab_size: int | None, updates: Mapping | None = None) -> list[str]:
    """``config.json`` (the reference's, with the output dtype under the keys it uses, and the
    new ``vocab_size`` if the policy changed it) and the tokenizer files; returns the latter."""
    config = dict(reference.config)
    for key in ("dtype", "torch_dtype"):
        if key in config or (key == "torch_dtype" and "dtype" not in config):
            config[key] = dtype_name(out_dtype)
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    config.update(updates or {})
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return copy_non_weight_files(reference.path, tmp)


def _write_weights(tmp: Path, plan: MergePlan, stream: Streaming, stats: dict, rparams: dict,
                   shard_size: int) -> tuple[list[str], str]:
    """Stream every planned tensor through the kernel into the shards; returns (files written,
    the output's fingerprint, computed while writing and cached for later readers)."""
    spec, n = stream.spec, stream.n_experts
    writer = PlannedShardWriter(tmp, [(tp.name, tp.shape, tp.dtype) for tp in plan], shard_size)
    writer.start(fingerprint=True)

    def load(tp):
        if not tp.merge:  # non-floating tensor copied from the reference
            return stream.loader.reference.get(tp.name), None
        return stream.load(tp, spec.inputs_for(tp.name, stream.kparams, n) if spec.inputs_for else None)

    try:
        bar = tqdm(plan.tensors, desc=f"merge {spec.name}", leave=False, disable=None)
        with closing(prefetched(bar, load)) as items:
            for tp, (base_t, exps) in items:
                if not tp.merge:
                    writer.write(tp.name, base_t)
                    continue
                out = spec.merge(base_t, exps, stream.kparams, stream.context(tp.name, stats, tp))
                del base_t, exps
                writer.write(tp.name, _checked(out, tp, spec, rparams).cpu())
                del out
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    cache_fingerprint(tmp, writer.digest)
    return files, writer.digest


def _checked(out: torch.Tensor, tp, spec: MethodSpec, rparams: dict) -> torch.Tensor:
    """The kernel's result in the output dtype, checked for shape and finiteness."""
    if tuple(out.shape) != tuple(tp.shape):
        raise MergeError(f"tensor '{tp.name}': method '{spec.name}' returned shape {list(out.shape)}, "
                         f"expected {list(tp.shape)}")
    out = out.to(tp.dtype)
    if nonfinite(out):
        raise MergeError(f"tensor '{tp.name}': method '{spec.name}' produced NaN/inf values (or values beyond "
                         f"the range of {dtype_name(tp.dtype)}) with params {rparams}; inputs are finite")
    return out


def _merge_whole_model(opts: _Options, identity: MergeIdentity, reference: CheckpointReader,
                       out_dtype: torch.dtype, out_dir, t0: float):
    """Run a whole-model method once and write its state like a streamed merge's output."""
    from mergesweep.merge.whole import WholeModelInputs

    inputs = WholeModelInputs(
        base=opts.base, experts=list(opts.experts), names=list(opts.names), params=opts.kparams,
        calibration=[Path(opts.calibration[i]["path"]) for i in range(len(opts.experts))],
        calibration_settings=dict(opts.calibration_settings), device=opts.device,
        seed=int(opts.kparams.get("seed", 0) or 0))
    result = opts.spec.merge_model(inputs)
    ref_keys = list(reference.keys())
    got = set(result.state)
    missing = [k for k in ref_keys if k not in got]
    extra = sorted(got - set(ref_keys))
    if missing or extra:
        what = f"lacks '{missing[0]}'" if missing else f"has '{extra[0]}'"
        raise MergeError(f"method '{opts.spec.name}' returned a state that {what}, unlike {reference.label} "
                         f"({reference.path}): a whole-model method must return the reference's tensors")
    entries = []
    for name in ref_keys:
        t = result.state[name]
        if not result.config_updates and tuple(t.shape) != tuple(reference.shape(name)):
            raise MergeError(f"tensor '{name}': method '{opts.spec.name}' returned shape {list(t.shape)}, "
                             f"expected {list(reference.shape(name))}")
        floating = t.is_floating_point()
        entries.append((name, tuple(t.shape), out_dtype if floating else t.dtype, floating))
    with atomic_dir(out_dir) as tmp:
        copied = _write_config_files(tmp, reference, out_dtype, None, result.config_updates)
        writer = PlannedShardWriter(tmp, [(n, s, d) for n, s, d, _ in entries], opts.shard_size)
        writer.start(fingerprint=True)
        try:
            for name, shape, dtype, floating in tqdm(entries, desc=f"write {opts.spec.name}", leave=False,
                                                      disable=None):
                t = result.state[name].detach()
                if floating:
                    t = t.to(dtype)
                    if nonfinite(t):
                        raise MergeError(f"tensor '{name}': method '{opts.spec.name}' produced NaN/inf values "
                                         f"with params {identity.params}")
                writer.write(name, t.cpu().contiguous())
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        cache_fingerprint(tmp, writer.digest)
        num_parameters = sum(math.prod(s) for _, s, _, f in entries if f)
        record = _write_whole_record(tmp, opts, identity, out_dtype, files + ["config.json"] + copied,
                                     writer.digest, len(entries), num_parameters, result, t0)
    return record


def _write_whole_record(tmp: Path, opts: _Options, identity: MergeIdentity, out_dtype, files, fingerprint,
                        num_tensors: int, num_parameters: int, result, t0: float):
    from mergesweep.merge.card import render_model_card

    calibration = {opts.names[i]: {"path": str(c["path"]), "uid": u}
                   for (i, c), u in zip(sorted(opts.calibration.items()), identity.data_uids or [])}
    record = merged_record(
        identity, opts.spec.name, base=opts.base, experts=opts.experts, expert_names=opts.names,
        align=None, fingerprint=fingerprint,
        settings={"dtype": dtype_name(out_dtype), "requested_dtype": opts.dtype, "device": str(opts.device),
                  "hardware": _hardware(opts.device), "vocab_policy": opts.vocab_policy,
                  "tie_policy": opts.tie_policy, "shard_size": opts.shard_size,
                  "calibration": calibration, "calibration_settings": dict(opts.calibration_settings)},
        output={"files": files, "num_tensors": num_tensors, "num_parameters": num_parameters, "statistics": None,
                "config_updates": dict(result.config_updates) or None, "method_info": dict(result.info) or None},
        runtime_s=round(time.perf_counter() - t0, 3), peak_rss_mb=peak_rss_mb(),
    )
    (tmp / "README.md").write_text(render_model_card(record))
    write_record(tmp, record)
    return record


def _hardware(device: torch.device) -> str:
    from mergesweep.devices import device_summary

    return device_summary(str(device))


def _write_record_and_card(tmp: Path, opts: _Options, identity: MergeIdentity, plan: MergePlan, stats: dict,
                           out_dtype: torch.dtype, files: list[str], fingerprint: str, t0: float):
    from mergesweep.merge.card import render_model_card

    data_stats = ({opts.names[i]: {"path": str(p), "uid": u}
                   for (i, p), u in zip(sorted(opts.stats.items()), identity.data_uids or [])} if opts.stats else None)
    record = merged_record(
        identity, opts.spec.name, base=opts.base, experts=opts.experts, expert_names=opts.names,
        align=opts.align, fingerprint=fingerprint,
        settings={"dtype": dtype_name(out_dtype), "requested_dtype": opts.dtype, "device": str(opts.device),
                  "hardware": _hardware(opts.device),
                  "vocab_policy": opts.vocab_policy, "tie_policy": opts.tie_policy, "shard_size": opts.shard_size,
                  **({"data_statistics": data_stats} if data_stats else {})},
        output={"files": files, "num_tensors": len(plan), "num_parameters": plan.num_parameters,
                "statistics": stats or None},
        runtime_s=round(time.perf_counter() - t0, 3), peak_rss_mb=peak_rss_mb(),
    )
    (tmp / "README.md").write_text(render_model_card(record))
    write_record(tmp, record)
    return record
