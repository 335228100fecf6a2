"""Content-derived ids: the same merge gets the same id wherever it is computed.

:func:`merge_model_id` is the one function that names a merged model. The workflow's plan
(:mod:`mergesweep.plan`) and ``mergesweep merge`` (the engine, through
:func:`mergesweep.merge.provenance.identify_merge`, and the command's check of an existing
``--out``, :func:`mergesweep.merge.config.planned_model_id`) both call it through
:func:`mergesweep.merge.identity.merge_identity`, with

- the *resolved* parameters (defaults filled in, per-expert values in expert order, numbers
  canonical: ``1`` and ``1.0`` hash alike, a scalar like the same value listed per expert), so
  ``linear {}`` and ``linear {weight: 1.0, normalize: true}`` are one merge;
- the inputs' *uids*: a base's or expert's uid is recorded in its ``mergesweep.json`` by the stage
  that wrote it (see :mod:`mergesweep.record`), so a merge run by hand on the workflow's
  checkpoints gets the workflow's id; a checkpoint without a record is identified by its
  content fingerprint;
- every setting that changes the weights: output dtype, vocabulary policy, alignment, and the
  method's kernel revision (bumped when a kernel's output changes).

For a method whose result does not depend (mathematically) on expert order
(``MethodSpec.order_invariant``), the experts' rows (uid, alignment uid and per-expert parameter
values, each row kept together) are sorted, so listing the experts in another order gives the
same id. A method that does not use the base (``base: unused``) does not hash it; settings that
do not change the weights (device, shard size, expert names, ``tie_policy``) are not hashed.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Collection, Mapping, Sequence


#: what every merged model id looks like (``<method slug>-<10 hex digits>``); base and expert names
#: may not look like this, so a path under results/ names a merge or a reference unambiguously
MERGE_ID_PATTERN = r"[a-z0-9]+(?:-[a-z0-9]+)*-[0-9a-f]{10}"


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys, no whitespace, floats normalised (1.0 and 1 hash alike)."""

    def norm(x):
        if isinstance(x, bool) or x is None or isinstance(x, str):
            return x
        if isinstance(x, (int, float)):
            f = float(x)
            return int(f) if f.is_integer() else round(f, 12)
        if isinstance(x, Mapping):
            return {str(k): norm(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [norm(v) for v in x]
        return str(x)

    return json.dumps(norm(obj), sort_keys=True, separators=(",", ":"))


def short_hash(obj: Any, n: int = 10) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower() or "x"


def definition_uid(name: str, definition: Any) -> str:
    """``name@hash`` of a base's or expert's definition (source or recipe, and its base's uid)."""
    return f"{name}@{short_hash(definition, 8)}"


def merge_model_id(
    method: str,
    params: Mapping[str, Any],
    base: str | None,
    experts: Sequence[str],
    *,
    per_expert: Collection[str] = (),
    order_invariant: bool = False,
    align: Sequence[str | None] | None = None,
    dtype: str | None = None,
    vocab_policy: str = "error",
    revision: int = 1,
    data: Sequence[str | None] | None = None,
) -> str:
    """``<method>-<hash>`` of everything that defines a merged model's weights.

    ``params`` are the resolved parameters; ``per_expert`` names those whose value may be a list
    in expert order; ``experts`` the inputs' uids; ``align`` one alignment uid (or ``None``) per
    expert; ``dtype`` the output dtype name (``None``: the base's); ``vocab_policy`` as given;
    ``revision`` the method's kernel revision (``MethodSpec.revision``); ``data`` one uid per
    expert of the data a data-aware method reads for it (its statistics' stats id, or its
    calibration data's uid), ``None`` for weight-only methods (their ids are unchanged).
    """
    params = dict(params)
    rows = [
        {
            "uid": uid,
            "align": (align[i] if align else None),
            **({"data": data[i]} if data else {}),
            # a scalar applies to every expert: [1, 1] and 1 hash alike
            "params": {k: (params[k][i] if isinstance(params[k], (list, tuple)) else params[k])
                       for k in sorted(per_expert) if k in params},
        }
        for i, uid in enumerate(experts)
    ]
    if order_invariant:
        rows.sort(key=canonical_json)
    shared = {k: v for k, v in params.items() if k not in per_expert}
    payload = {
        "method": method,
        "revision": revision,
        "params": shared,
        "base": base,
        "experts": rows,
        "dtype": dtype,
        "vocab_policy": vocab_policy,
    }
    return f"{slug(method)}-{short_hash(payload)}"


def reverted_model_id(merge_id: str, expert: str) -> str:
    """The id of expert ``expert``'s model reverted from the reversible merge ``merge_id`` (RMM):
    ``<merge id>--<expert name>`` (its evaluations live under that name like any model's)."""
    return f"{merge_id}--{expert}"


def search_id(strategy: str, method: str, definition: Any) -> str:
    """``<strategy>-<method>-<hash>`` of everything that defines a search (its config entry, the
    inputs' uids, the merge and evaluation settings): its directory under ``results/search/``.
    A changed search is a new search; its old generations stay where they were."""
    return f"{slug(strategy)}-{slug(method)}-{short_hash(definition)}"
