"""Content-derived ids: the same merge (method, parameters, inputs, alignment) gets the same id,
so Snakemake never computes it twice."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Mapping, Sequence


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


def merge_model_id(
    method: str,
    params: Mapping[str, Any],
    base: str | None,
    experts: Sequence[str],
    align: Mapping[str, Any] | None = None,
) -> str:
    """``<method>-<hash>`` where the hash covers method, params, base id, expert ids and alignment.

    Expert order matters only where the method is order-sensitive, which the params encode
    (per-expert lists), so the ids are kept in the given order.
    """
    payload = {
        "method": method,
        "params": dict(params),
        "base": base,
        "experts": list(experts),
        "align": dict(align) if align else None,
    }
    return f"{slug(method)}-{short_hash(payload)}"
