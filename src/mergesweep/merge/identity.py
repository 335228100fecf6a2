"""The identity of a merge, computed without merging and without torch.

:func:`merge_identity` is shared by the workflow's plan and ``mergesweep merge``: both resolve
the parameters with the method's spec and name the result with
:func:`mergesweep.ids.merge_model_id`. See :mod:`mergesweep.ids` for what the id covers.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from mergesweep.ids import merge_model_id
from mergesweep.merge.settings import canonical_dtype, check_vocab_policy


def merge_identity(
    method: str,
    params: Mapping[str, Any] | None,
    expert_names: Sequence[str],
    base_uid: str | None,
    expert_uids: Sequence[str],
    *,
    align_uids: Sequence[str | None] | None = None,
    dtype: str | None = None,
    vocab_policy: str = "error",
    has_base: bool | None = None,
    data_uids: Sequence[str | None] | None = None,
) -> tuple[str, dict]:
    """``(model_id, resolved params)`` of one merge. Raises ConfigError naming ``params.<key>``.

    ``data_uids``: per expert, the uid of the data a data-aware method reads for it (see
    :func:`data_uids_needed`): its statistics' stats id or its calibration data's uid."""
    from mergesweep.merge.methods import get_method
    from mergesweep.merge.spec import resolve_params

    spec = get_method(method)
    n = len(expert_names)
    has_base = base_uid is not None if has_base is None else has_base
    spec.check_inputs(n, has_base)
    _, record = resolve_params(spec, params, n, list(expert_names), has_base=has_base)
    model_id = merge_model_id(
        spec.name,
        record,
        None if spec.base == "unused" else base_uid,
        list(expert_uids),
        per_expert={p.name for p in spec.params if p.per_expert},
        order_invariant=bool(getattr(spec, "order_invariant", False)),
        align=list(align_uids) if align_uids and any(align_uids) else None,
        dtype=canonical_dtype(dtype),
        vocab_policy=check_vocab_policy(vocab_policy),
        revision=spec.revision,
        data=list(data_uids) if data_uids and any(data_uids) else None,
    )
    return model_id, record


def data_needs(method: str, params: Mapping[str, Any] | None, n_experts: int,
               expert_names: Sequence[str] | None = None, has_base: bool = True) -> tuple[tuple[str, ...], bool]:
    """What data a merge reads per expert: ``(stats kinds, needs calibration data)`` for these
    parameters (``((), False)`` for a weight-only method). No torch."""
    from mergesweep.merge.methods import get_method
    from mergesweep.merge.spec import resolve_params

    spec = get_method(method)
    kparams, _ = resolve_params(spec, params, n_experts, expert_names, has_base=has_base)
    whole = spec.uses_whole_model(kparams)
    return (() if whole else spec.stats_kinds(kparams)), whole


def calibration_uid(identity: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """The uid of one expert's calibration data for a whole-model method: ``data@<hash>`` of what
    defines the data (a file's sha256, or the plan's definition of generated data) and the
    calibration settings (examples, max_length, batch_size)."""
    from mergesweep.ids import short_hash

    return "data@" + short_hash({"data": dict(identity), "settings": dict(settings)})


def checkpoint_uid(path: str | os.PathLike) -> str:
    """The uid a checkpoint's record carries (base/expert: ``name@hash``; merged: its model id);
    ``sha256:<fingerprint>`` for a checkpoint mergesweep did not write."""
    from mergesweep.record import read_record

    rec = read_record(path, required=False)
    if rec is not None and rec.uid:
        return rec.uid
    if rec is not None and rec.role == "merged":
        return rec.model_id
    from mergesweep.checkpoints.layout import checkpoint_fingerprint

    return f"sha256:{checkpoint_fingerprint(path)}"


def perm_map_uid(path: str | os.PathLike) -> str:
    """The uid an align job recorded in a permutation map's metadata, else the file's sha256."""
    from mergesweep.align.permmap import read_meta

    uid = read_meta(path).get("uid")
    if uid:
        return str(uid)
    from mergesweep.record import sha256_file

    return f"sha256:{sha256_file(path)[:16]}"


def expert_data_uids(n_experts: int, stats: Mapping[int, Any] | None = None,
                     calibration: Mapping[int, Mapping] | None = None,
                     calibration_settings: Mapping[str, Any] | None = None) -> list[str | None] | None:
    """Per expert, the uid of the data a merge reads for it: the stats id recorded in its
    statistics directory (``stats``: index -> directory), else its calibration data's uid
    (``calibration``: index -> ``{path, uid}``; without a uid, :func:`calibration_uid` of the file's
    sha256 and the settings). None when the merge reads no data."""
    if stats:
        from mergesweep.stats.io import stats_uid

        return [stats_uid(stats[i]) if i in stats else None for i in range(n_experts)]
    if calibration:
        from mergesweep.record import sha256_file

        return [None if i not in calibration else
                (calibration[i].get("uid") or calibration_uid({"sha256": sha256_file(calibration[i]["path"])},
                                                              calibration_settings or {}))
                for i in range(n_experts)]
    return None
