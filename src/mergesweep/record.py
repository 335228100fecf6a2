"""The model record: ``mergesweep.json`` inside every checkpoint the project writes.

One typed record, written by fetch, pretrain, finetune and merge through :func:`write_record`
and read everywhere through :func:`read_record`, so every model carries *its own* fingerprint
and the same fields whatever stage made it:

========== =====================================================================================
field      meaning
========== =====================================================================================
model_id   the model's id in the plan: a configured name (base, expert) or ``<method>-<hash>``
role       ``base`` | ``expert`` | ``merged`` | ``reverted``
uid        identity of the model's *definition* (``name@hash`` of source or recipe for base and
           experts; the model id for merges). Merge ids hash the inputs' uids, so a merge run by
           hand on the workflow's checkpoints gets the workflow's id.
fingerprint sha256 (16 hex) of this checkpoint's config and weight files
           (:func:`mergesweep.checkpoints.layout.checkpoint_fingerprint`)
stage      what wrote it: ``fetch`` | ``pretrain`` | ``finetune`` | ``extract`` | ``merge`` | ``revert``
domain     the suite an expert is for (``None`` for base and merges)
method     merge method (``None`` unless merged); ``params`` its resolved parameters
base       model id of the base the model derives from (``None`` for a base)
experts    model ids of a merge's experts (``[]`` otherwise)
source     how it was obtained (a fetch source, a training recipe, merge inputs)
versions   library versions (:func:`library_versions`)
runtime_s, peak_rss_mb   cost of the stage
extra      stage-specific details (training summary, merge inputs/alignment/statistics...),
           stored as top-level keys of the JSON
========== =====================================================================================
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path

from mergesweep.errors import MergesweepError

RECORD_FILE = "mergesweep.json"
#: ``reverted``: one task's model reconstructed from a reversible merge (RMM's basis + that task's
#: coefficients); it is evaluated on its task's domain only and compared with the expert
ROLES = ("base", "expert", "merged", "reverted")
#: ``extract``: a LoRA adapter extracted from a dense expert (truncated SVD of its task vector);
#: ``revert``: a task's model reconstructed from a reversible merge
STAGES = ("fetch", "pretrain", "finetune", "extract", "merge", "revert")
#: distributions whose versions every record (and the run's provenance) carries
VERSIONED = ("mergesweep", "torch", "transformers", "safetensors", "lm_eval", "snakemake", "pandas")


class RecordError(MergesweepError, ValueError):
    """A model record is missing or malformed; the message names the file and the field."""


def sha256_file(path: str | os.PathLike, h: "hashlib._Hash | None" = None) -> str:
    """Hex sha256 of a file's bytes, read in 8 MiB blocks. With ``h``, update that hash instead
    (and return its current hex digest): the one file-hashing loop of the project."""
    own = h is None
    h = hashlib.sha256() if own else h
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def library_versions(dists: tuple[str, ...] = VERSIONED) -> dict[str, str | None]:
    """``{"python": ..., dist: version or None}`` from installed metadata (no imports)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


@dataclass
class ModelRecord:
    """What ``mergesweep.json`` holds (see the module docstring)."""

    model_id: str
    role: str
    stage: str
    uid: str | None = None
    fingerprint: str | None = None
    domain: str | None = None
    method: str | None = None
    params: dict | None = None
    base: str | None = None
    experts: list = field(default_factory=list)
    source: dict | None = None
    versions: dict = field(default_factory=library_versions)
    runtime_s: float | None = None
    peak_rss_mb: float | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise RecordError(f"role: {self.role!r} is not one of {', '.join(ROLES)}")
        if self.stage not in STAGES:
            raise RecordError(f"stage: {self.stage!r} is not one of {', '.join(STAGES)}")
        if not isinstance(self.model_id, str) or not self.model_id:
            raise RecordError(f"model_id: expected a non-empty string, got {self.model_id!r}")
        clash = set(self.extra) & {f.name for f in fields(self)}
        if clash:
            raise RecordError(f"extra: keys {sorted(clash)} shadow record fields")

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        return {**d, **extra}

    @classmethod
    def from_dict(cls, doc: dict, where: str = RECORD_FILE) -> "ModelRecord":
        if not isinstance(doc, dict):
            raise RecordError(f"{where}: expected a JSON object")
        names = {f.name for f in fields(cls)} - {"extra"}
        missing = [k for k in ("model_id", "role", "stage") if k not in doc]
        if missing:
            raise RecordError(f"{where}: missing field '{missing[0]}' (written by an older mergesweep?)")
        known = {k: v for k, v in doc.items() if k in names}
        extra = {k: v for k, v in doc.items() if k not in names}
        try:
            return cls(**known, extra=extra)
        except RecordError as e:
            raise RecordError(f"{where}: {e}") from None


def write_record(checkpoint_dir: str | os.PathLike, record: ModelRecord) -> ModelRecord:
    """Write ``record`` as ``checkpoint_dir/mergesweep.json`` (atomically). The fingerprint is
    computed from the directory's files when the record does not carry one."""
    from mergesweep.atomic import write_json
    from mergesweep.checkpoints.layout import checkpoint_fingerprint

    checkpoint_dir = Path(checkpoint_dir)
    if record.fingerprint is None:
        record.fingerprint = checkpoint_fingerprint(checkpoint_dir)
    write_json(checkpoint_dir / RECORD_FILE, record.to_dict())
    return record


def read_record(checkpoint_dir: str | os.PathLike, *, required: bool = True) -> ModelRecord | None:
    """The record of a checkpoint; ``None`` when it has none and ``required`` is false.

    Raises :class:`RecordError` naming the file when it is missing (and required) or malformed."""
    path = Path(checkpoint_dir) / RECORD_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise RecordError(f"{path}: model record not found (not a checkpoint written by mergesweep)") from None
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecordError(f"{path}: not valid JSON ({e})") from None
    return ModelRecord.from_dict(doc, str(path))
