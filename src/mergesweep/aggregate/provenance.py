"""The run's provenance JSON (written by the workflow):
``{"config_hash", "config", "checkpoints": {name: {"source", "revision", "sha256"|"fingerprint"}},
"versions": {...}}``. Every key is optional."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from mergesweep.errors import MergesweepError


class ProvenanceError(MergesweepError, ValueError):
    """The provenance file is unreadable or malformed; the message names the file and key."""


def load_provenance(path: str | Path | None) -> dict | None:
    """The parsed provenance, or None when ``path`` is None."""
    if path is None:
        return None
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ProvenanceError(f"{path}: provenance file not found") from e
    except json.JSONDecodeError as e:
        raise ProvenanceError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise ProvenanceError(f"{path}: expected a JSON object")
    for key, typ in (("checkpoints", dict), ("versions", dict), ("config_hash", str)):
        if key in doc and doc[key] is not None and not isinstance(doc[key], typ):
            raise ProvenanceError(f"{path}: key '{key}' must be a {typ.__name__}")
    return doc


def checkpoint_identities(provenance: Mapping | None, references: pd.DataFrame) -> list[dict]:
    """The base and expert checkpoints of a run: ``{name, role, source, revision, sha256,
    fingerprint, hash}`` each, from the provenance's ``checkpoints`` and the model records the
    scores carry (``references``: one row per base/expert model with ``model_id``, ``role``,
    ``domain``, ``source``, ``fingerprint``). The one place the aggregation reads checkpoint
    fingerprints.

    Raises :class:`ProvenanceError` when the provenance and a model's own record disagree on its
    fingerprint, or when two different base/expert models carry the same fingerprint (an expert
    recorded with its base's fingerprint, or not trained at all)."""
    prov = provenance or {}
    out: dict[str, dict] = {}
    for name, c in (prov.get("checkpoints") or {}).items():
        c = c if isinstance(c, Mapping) else {"source": str(c)}
        out[name] = {"name": name, "role": _s(c.get("role")), "source": _s(c.get("source")), "revision": _s(c.get("revision")),
                     "sha256": _s(c.get("sha256")), "fingerprint": _s(c.get("fingerprint"))}
    for _, r in references.iterrows():
        name = r["model_id"]
        entry = out.setdefault(name, {"name": name, "role": "", "source": "", "revision": "", "sha256": "",
                                      "fingerprint": ""})
        entry["role"] = r["role"] + (f" ({r['domain']})" if isinstance(r["domain"], str) else "")
        entry["source"] = entry["source"] or _s(r["source"])
        recorded = _s(r["fingerprint"])
        if recorded and entry["fingerprint"] and recorded != entry["fingerprint"]:
            raise ProvenanceError(
                f"provenance: checkpoint {name!r} has fingerprint {entry['fingerprint']} but the model's "
                f"own record (in its evaluations) has {recorded}")
        entry["fingerprint"] = entry["fingerprint"] or recorded
    by_fp: dict[str, str] = {}
    for name, e in out.items():
        fp = e["fingerprint"]
        if fp and fp in by_fp:
            raise ProvenanceError(
                f"provenance: checkpoints {by_fp[fp]!r} and {name!r} carry the same fingerprint {fp} "
                "(a model recorded with another's fingerprint, or an expert identical to its base)")
        if fp:
            by_fp[fp] = name
    for e in out.values():
        e["hash"] = " / ".join(h for h in (e["sha256"], e["fingerprint"]) if h)
    return list(out.values())


def _s(x) -> str:
    return x if isinstance(x, str) else ""
