"""Revert one task from a reversible merge (RMM): its LoRA adapter, rebuilt from the basis and
that task's coefficients.

An RMM merge (:mod:`mergesweep.merge.methods.rmm`) stores per module an orthonormal basis in
factor form, ``Φ_j = basis_B @ cores[j] @ basis_A``, and per task ``k`` its coefficients
``C_k``. Task ``k``'s update is ``ΔW^_k = sum_j C_kj Φ_j = basis_B (sum_j C_kj cores[j]) basis_A``,
written here as a PEFT adapter whose factors are that core compressed to its numerical rank
(:func:`mergesweep.merge.methods._lora.rmm_reconstruct`; with as many components as experts
this is the expert's own update, at its own rank). The output is an adapter directory like any
LoRA expert's (loadable by ``peft.PeftModel.from_pretrained`` over the base): the adapter files,
the base's tokenizer files and a record with role ``reverted``, stage ``revert``, model id
:func:`mergesweep.ids.reverted_model_id` ``(merge id, task)``, the task's expert as its only
expert, the expert's domain, and ``reverted_from`` / ``task`` / ``relative_error`` extras.

``mergesweep revert --merged DIR --task NAME --out DIR [--base DIR] [--model-id ID]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from mergesweep.errors import ConfigError, MergeError

log = logging.getLogger(__name__)

__all__ = ["revert", "read_rmm", "add_arguments", "run"]


def read_rmm(rmm_dir: str | os.PathLike) -> tuple[dict, "object"]:
    """``(rmm.json, record)`` of an RMM merge directory; MergeError naming the file otherwise."""
    from mergesweep.merge.lora_merge import RMM_FORMAT, RMM_META, RMM_WEIGHTS
    from mergesweep.record import read_record

    d = Path(rmm_dir)
    meta_file = d / RMM_META
    if not meta_file.is_file() or not (d / RMM_WEIGHTS).is_file():
        raise MergeError(f"{d}: not a reversible (RMM) merge: it needs {RMM_META} and {RMM_WEIGHTS} "
                         "(written by `mergesweep merge` with method rmm)")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MergeError(f"{meta_file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != RMM_FORMAT:
        raise MergeError(f"{meta_file}: 'format' is not {RMM_FORMAT!r}")
    for key in ("tasks", "modules"):
        if key not in meta:
            raise MergeError(f"{meta_file}: missing '{key}'")
    return meta, read_record(d)


def _base_path(record, base) -> Path:
    """The base to revert over: ``base`` (checked against the merge's base uid), else the base
    the merge's record lists."""
    from mergesweep.merge.identity import checkpoint_uid

    listed = next((d for d in record.extra.get("inputs") or [] if d.get("role") == "base"), None)
    if base is None:
        if listed is None or not Path(listed["path"]).is_dir():
            where = f" ({listed['path']} is gone)" if listed else ""
            raise ConfigError(f"base: give the base model the RMM merge was made on{where}")
        return Path(listed["path"])
    base = Path(base)
    if listed is not None and listed.get("uid") and checkpoint_uid(base) != listed["uid"]:
        raise MergeError(f"base: {base} is {checkpoint_uid(base)}, but the RMM merge was made on {listed['uid']} "
                         f"({listed['path']})")
    return base


def revert(rmm_dir: str | os.PathLike, task: str, out_dir: str | os.PathLike, base: str | os.PathLike | None = None,
           model_id: str | None = None) -> dict:
    """Write task ``task``'s adapter, reverted from the RMM merge ``rmm_dir``, to ``out_dir``
    (atomically); returns its record as a dict. An unknown task is a ConfigError listing the
    tasks; ``model_id`` (the plan's) must be :func:`~mergesweep.ids.reverted_model_id` of the
    merge's id and the task."""
    import torch
    from safetensors import safe_open

    from mergesweep.atomic import atomic_dir
    from mergesweep.checkpoints.layout import checkpoint_fingerprint, copy_non_weight_files, parse_dtype
    from mergesweep.ids import reverted_model_id
    from mergesweep.merge.identity import checkpoint_uid
    from mergesweep.merge.lora_merge import RMM_WEIGHTS, adapter_extra, write_lora_factors
    from mergesweep.merge.methods._lora import rmm_reconstruct
    from mergesweep.record import RECORD_FILE, ModelRecord, peak_rss_mb, write_record

    t0 = time.perf_counter()
    rmm_dir = Path(rmm_dir)
    meta, rec = read_rmm(rmm_dir)
    tasks = list(meta["tasks"])
    if task not in tasks:
        raise ConfigError(f"task: {task!r} is not a task of the RMM merge {rmm_dir} (tasks: {', '.join(tasks)})")
    k = tasks.index(task)
    want_id = reverted_model_id(rec.model_id, task)
    if model_id is not None and model_id != want_id:
        raise MergeError(f"model id mismatch: expected {model_id} (the plan's) but task {task!r} of merge "
                         f"{rec.model_id} is {want_id}")
    base_path = _base_path(rec, base)
    dtype = parse_dtype(meta.get("dtype")) or torch.float32
    merged = {}
    with safe_open(str(rmm_dir / RMM_WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
        for name in meta["modules"]:
            need = [f"{name}.{part}" for part in ("basis_B", "basis_A", "cores", "coefficients")]
            missing = [x for x in need if x not in keys]
            if missing:
                raise MergeError(f"{rmm_dir / RMM_WEIGHTS}: module '{name}' has no tensor '{missing[0]}'")
            b, a, cores, coeff = (f.get_tensor(x) for x in need)
            if coeff.shape[0] != len(tasks):
                raise MergeError(f"{rmm_dir / RMM_WEIGHTS}: '{name}.coefficients' has {coeff.shape[0]} rows for "
                                 f"{len(tasks)} tasks")
            merged[name] = rmm_reconstruct(b.float(), a.float(), cores.float(), coeff[k].float())
    expert = next((d for d in rec.extra.get("inputs") or [] if d.get("role") == "expert" and d.get("name") == task),
                  {})
    rel = ((meta.get("reconstruction") or {}).get("relative_error") or {}).get(task)
    with atomic_dir(out_dir) as tmp:
        files = write_lora_factors(tmp, merged, dtype=dtype, base_model_name_or_path=str(base_path))
        files += copy_non_weight_files(base_path, tmp)
        (tmp / "README.md").write_text(_card(want_id, rec.model_id, task, rel, meta, rmm_dir))
        files += ["README.md", RECORD_FILE]
        base_uid = checkpoint_uid(base_path)
        record = ModelRecord(
            model_id=want_id, role="reverted", stage="revert", uid=want_id,
            fingerprint=checkpoint_fingerprint(tmp), domain=expert.get("domain"), method=rec.method,
            params=rec.params, base=rec.base, experts=list(rec.experts),
            source={"type": "revert", "merge": rec.model_id, "task": task},
            runtime_s=round(time.perf_counter() - t0, 3), peak_rss_mb=peak_rss_mb(),
            extra={"reverted_from": rec.model_id, "task": task, "relative_error": rel,
                   "components": meta.get("components"), "expert": expert or None, "files": sorted(files),
                   "adapter": adapter_extra(tmp, base_uid, checkpoint_fingerprint(base_path))},
        )
        write_record(tmp, record)
    log.info("reverted task %s of %s into %s (relative error %s)", task, rec.model_id, out_dir, rel)
    return record.to_dict()


def _card(model_id: str, merge_id: str, task: str, rel, meta: dict, rmm_dir: Path) -> str:
    err = f"{rel:.3g}" if isinstance(rel, (int, float)) else "unknown"
    return "\n".join([
        "---", "library_name: peft", "tags: [mergesweep, rmm, reverted]", "---", "",
        f"# {model_id}", "",
        f"Task **{task}** reverted from the reversible merge (RMM) `{merge_id}` ({rmm_dir}): the basis of "
        f"{meta.get('components')} components per module and this task's coefficients, as a LoRA adapter.", "",
        f"Relative reconstruction error against the expert's update: {err} "
        "(sqrt of the summed squared Frobenius errors over the summed squared norms, all modules).", "",
        "```bash", f"mergesweep revert --merged {rmm_dir} --task {task} --out OUT_DIR", "```", ""])


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--merged", required=True, help="an RMM merge directory (rmm.json + rmm.safetensors)")
    parser.add_argument("--task", required=True, help="the task (expert name) to revert")
    parser.add_argument("--out", required=True, help="output adapter directory (written atomically)")
    parser.add_argument("--base", default=None,
                        help="the base model (default: the one the merge's record lists; checked against it)")
    parser.add_argument("--model-id", default=None,
                        help="the id the reverted model must get (the workflow passes its plan's: <merge id>--<task>)")
    parser.add_argument("--force", action="store_true", help="replace --out even if it holds another model")


def run(args: argparse.Namespace) -> int:
    from mergesweep.atomic import SignalExit, signal_cleanup
    from mergesweep.merge.cli import existing_output

    out = Path(args.out)
    try:
        with signal_cleanup():
            if existing_output(out, args.model_id, args.force) == "up-to-date":
                print(f"mergesweep revert: {out} already holds {args.model_id}; nothing to do", file=sys.stderr)
                return 0
            rec = revert(args.merged, args.task, out, base=args.base, model_id=args.model_id)
    except SignalExit as e:
        print(f"mergesweep revert: interrupted by {e.signame}; no partial output left at {out}", file=sys.stderr)
        raise
    err = rec.get("relative_error")
    print(f"{rec['model_id']}: task {args.task} reverted to {out}"
          + (f" (relative error {err:.3g})" if isinstance(err, (int, float)) else ""))
    return 0
