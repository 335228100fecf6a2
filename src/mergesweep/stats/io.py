"""The statistics file: ``<dir>/stats.safetensors`` + ``<dir>/stats.json``. No torch at import.

Tensors in ``stats.safetensors`` are keyed ``<kind>/<tensor name>``, where the tensor name is
the model's parameter name the statistic belongs to:

* ``gram/<linear weight>``: float32 ``[in, in]``, the *sum* over calibration tokens of
  ``x x^T`` for the input ``x`` of that linear layer (``model.layers.0.mlp.down_proj.weight``);
  ``gram_count/<linear weight>``: float32 ``[1]``, the number of tokens summed;
* ``fisher/<parameter>``: float32, the parameter's shape: the diagonal Fisher information.

``stats.json`` records (:data:`RECORD_KEYS`): the format, the stats id (the plan's uid of the
job), the model's uid and path, the kinds, the calibration data (file, sha256, split, examples,
tokens), the settings, device, runtime, peak RSS and library versions. A merge checks the
``model_uid`` against the expert it merges (statistics of another model are an error naming the
file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mergesweep.errors import MergeError

STATS_FILE = "stats.safetensors"
RECORD_FILE = "stats.json"
FORMAT = "mergesweep-stats/1"
#: the kinds the stats stage computes: Gram matrices of linear inputs; diagonal Fisher with the
#: data's labels (empirical Fisher); diagonal Fisher with labels sampled from the model's outputs
KINDS = ("gram", "fisher", "fisher_model")
RECORD_KEYS = ("format", "stats_id", "model_uid", "model", "kinds", "data", "settings", "device", "runtime_s",
               "peak_rss_mb", "versions")


def tensor_key(kind: str, name: str) -> str:
    """The key of ``kind``'s statistic of parameter ``name`` in ``stats.safetensors``."""
    return f"{kind}/{name}"


def count_key(name: str) -> str:
    return f"gram_count/{name}"


def read_stats_record(stats_dir: str | os.PathLike) -> dict:
    """The ``stats.json`` of a statistics directory; MergeError naming the file when it is missing
    or not a statistics record."""
    path = Path(stats_dir) / RECORD_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise MergeError(f"{path}: statistics record not found (run the stats stage first: mergesweep stats)") from None
    except (OSError, ValueError) as e:
        raise MergeError(f"{path}: not a readable statistics record ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise MergeError(f"{path}: not a mergesweep statistics record (format {doc.get('format') if isinstance(doc, dict) else None!r}, "
                         f"expected {FORMAT!r})")
    return doc


def stats_uid(stats_dir: str | os.PathLike) -> str:
    """The stats id its record carries (what a merge's id hashes)."""
    return str(read_stats_record(stats_dir)["stats_id"])


class StatsReader:
    """Reads one statistics directory tensor by tensor (``safe_open``: nothing loaded up front).

    ``label`` names the reader in errors (``statistics of expert 1 (math)``)."""

    def __init__(self, stats_dir: str | os.PathLike, label: str = "statistics"):
        self.dir = Path(stats_dir)
        self.label = label
        self.record = read_stats_record(self.dir)
        self.path = self.dir / STATS_FILE
        if not self.path.is_file():
            raise MergeError(f"{label}: {self.path} not found")
        from safetensors import safe_open

        try:
            self._f = safe_open(str(self.path), framework="pt")
        except Exception as e:  # truncated or not safetensors
            raise MergeError(f"{label}: {self.path} is not a readable safetensors file ({e})") from None
        self._keys = set(self._f.keys())

    @property
    def kinds(self) -> list[str]:
        return list(self.record.get("kinds") or [])

    @property
    def model_uid(self) -> str | None:
        return self.record.get("model_uid")

    @property
    def stats_id(self) -> str:
        return str(self.record["stats_id"])

    def require(self, kinds, model_uid: str | None = None) -> "StatsReader":
        """Check that the file has ``kinds`` and, when given, was computed on ``model_uid``."""
        missing = [k for k in kinds if k not in self.kinds]
        if missing:
            raise MergeError(f"{self.label}: {self.dir} has no '{missing[0]}' statistics "
                             f"(it has: {', '.join(self.kinds) or 'none'})")
        if model_uid is not None and self.model_uid != model_uid:
            raise MergeError(f"{self.label}: {self.dir / RECORD_FILE} was computed on model {self.model_uid!r}, "
                             f"not on {model_uid!r} (statistics of another model)")
        return self

    def names(self, kind: str) -> list[str]:
        """The parameter names ``kind`` has a statistic for, sorted."""
        return sorted(k.split("/", 1)[1] for k in self._keys if k.startswith(kind + "/"))

    def has(self, kind: str, name: str) -> bool:
        return tensor_key(kind, name) in self._keys

    def get(self, kind: str, name: str, device: Any = "cpu"):
        """The float32 statistic of ``kind`` for parameter ``name`` on ``device``, or None."""
        key = tensor_key(kind, name)
        if key not in self._keys:
            return None
        import torch

        t = self._f.get_tensor(key)
        return t.to(device=device, dtype=torch.float32)

    def count(self, name: str) -> float | None:
        key = count_key(name)
        return float(self._f.get_tensor(key).reshape(-1)[0]) if key in self._keys else None

    def close(self) -> None:
        self._f = None

    def __enter__(self) -> "StatsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
