"""The run's provenance JSON (written by the workflow):
``{"config_hash", "config", "checkpoints": {name: {"source", "revision", "sha256"|"fingerprint"}},
"versions": {...}}``. Every key is optional."""

from __future__ import annotations

import json
from pathlib import Path

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
