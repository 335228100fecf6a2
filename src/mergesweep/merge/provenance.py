"""Who a merge is: its model id from the inputs' recorded uids, and the record it writes.

:func:`identify_merge` names a merge from checkpoint *paths*, through the same calls as the
workflow's plan (:func:`mergesweep.merge.identity.merge_identity` fed with
:func:`~mergesweep.merge.identity.checkpoint_uid` / :func:`~mergesweep.merge.identity.perm_map_uid`),
so ``mergesweep merge`` on the workflow's checkpoints gets the workflow's id.
:func:`merged_record` builds the :class:`mergesweep.record.ModelRecord` of the output. No torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from mergesweep.checkpoints.layout import checkpoint_fingerprint
from mergesweep.merge.identity import checkpoint_uid, merge_identity, perm_map_uid
from mergesweep.record import ModelRecord, read_record, sha256_file


@dataclass
class MergeIdentity:
    model_id: str
    params: dict  # the resolved parameters (as recorded and hashed)
    base_uid: str | None
    expert_uids: list[str]
    align_uids: list[str | None]
    data_uids: list[str | None] | None = None  # per expert: its statistics' or calibration data's uid


def identify_merge(
    method: str,
    params: Mapping[str, Any] | None,
    expert_names: Sequence[str],
    base: str | os.PathLike | None,
    experts: Sequence[str | os.PathLike],
    align: Mapping[int, str | os.PathLike] | None = None,
    *,
    dtype: str | None = None,
    vocab_policy: str = "error",
    data_uids: Sequence[str | None] | None = None,
) -> MergeIdentity:
    """The id and resolved parameters of merging ``experts`` (and ``base``) with ``method``.

    ``align`` maps expert index -> permutation map file; ``dtype`` is the *requested* output
    dtype (``None``: the base's). Raises ConfigError naming ``params.<key>``."""
    align = align or {}
    base_uid = checkpoint_uid(base) if base is not None else None
    expert_uids = [checkpoint_uid(e) for e in experts]
    align_uids = [perm_map_uid(align[i]) if i in align else None for i in range(len(expert_uids))]
    model_id, resolved = merge_identity(
        method, params, list(expert_names), base_uid, expert_uids,
        align_uids=align_uids, dtype=dtype, vocab_policy=vocab_policy, has_base=base is not None,
        data_uids=data_uids,
    )
    return MergeIdentity(model_id, resolved, base_uid, expert_uids, align_uids,
                         list(data_uids) if data_uids else None)


def describe_input(path: Path, name: str, role: str, uid: str | None) -> dict:
    """An input as the merged record lists it: role, name, path, model id, uid, fingerprint and,
    when its record says, source, revision and domain."""
    rec = read_record(path, required=False)
    desc: dict[str, Any] = {
        "role": role,
        "name": name,
        "path": str(path),
        "model_id": rec.model_id if rec else None,
        "uid": uid,
        "fingerprint": checkpoint_fingerprint(path),
    }
    if rec is not None:
        for key in ("source", "domain"):
            if getattr(rec, key) is not None:
                desc[key] = getattr(rec, key)
        if rec.extra.get("revision") is not None:
            desc["revision"] = rec.extra["revision"]
    return desc


def merged_record(
    identity: MergeIdentity,
    method: str,
    *,
    base: Path | None,
    experts: Sequence[Path],
    expert_names: Sequence[str],
    align: Mapping[int, Path] | None,
    fingerprint: str,
    settings: Mapping[str, Any],
    output: Mapping[str, Any],
    runtime_s: float,
    peak_rss_mb: float,
) -> ModelRecord:
    """The record of a merged model. ``settings``: dtype (the output's), requested_dtype, device,
    vocab_policy, tie_policy, shard_size; ``output``: files, num_tensors, num_parameters,
    statistics."""
    inputs = ([describe_input(base, base.name, "base", identity.base_uid)] if base is not None else []) + [
        describe_input(p, expert_names[i], "expert", identity.expert_uids[i]) for i, p in enumerate(experts)
    ]
    align_record = (
        {str(i): {"path": str(p), "uid": identity.align_uids[i], "sha256": sha256_file(p)[:16],
                  "method": _perm_method(p)}
         for i, p in sorted(align.items())}
        if align else None
    )
    expert_desc = [d for d in inputs if d["role"] == "expert"]
    return ModelRecord(
        model_id=identity.model_id,
        role="merged",
        stage="merge",
        uid=identity.model_id,
        fingerprint=fingerprint,
        method=method,
        params=identity.params,
        base=(inputs[0]["model_id"] or inputs[0]["name"]) if base is not None else None,
        experts=[d["model_id"] or d["name"] for d in expert_desc],
        source=None,
        runtime_s=runtime_s,
        peak_rss_mb=peak_rss_mb,
        extra={
            "expert_names": list(expert_names),
            "inputs": inputs,
            "align": align_record,
            **dict(settings),
            **dict(output),
        },
    )


def _perm_method(path: Path) -> str | None:
    """The alignment method a permutation map records (weight_matching, activation_matching...)."""
    from mergesweep.align.permmap import read_meta

    return read_meta(path).get("method")
