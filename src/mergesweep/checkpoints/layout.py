"""Hugging Face checkpoint layout: the one safetensors reader, fingerprints, non-weight files.

:class:`CheckpointReader` opens a directory holding ``config.json`` and either
``model.safetensors`` or ``model.safetensors.index.json`` plus its shards, and hands out one
tensor at a time, so callers (the merge engine, alignment, fetch verification) can stream over
parameter names without ever holding a whole model.

It parses the safetensors headers itself rather than using ``safe_open``, which maps whole
files: every page a merge touches then stays resident (and counted in the process RSS) until
the handle closes, so reading four 540 MB checkpoints through it costs ~2 GB of RSS although
one parameter name is live at a time. Every header is validated against its file's size when
the checkpoint is opened, so a truncated file fails before anything is computed or written.

**Declared dtype** (:attr:`CheckpointReader.default_dtype`, the dtype a merge writes unless told
otherwise) - one rule, first match wins:

1. ``config.json``'s ``dtype`` (the key transformers writes since 4.56), if it names float32,
   float16 or bfloat16 (any spelling :mod:`mergesweep.merge.settings` accepts);
2. else ``config.json``'s legacy ``torch_dtype``, on the same condition;
3. else the stored dtype of the floating-point tensors (the one holding most parameters) - what
   ``from_pretrained(dtype="auto")`` falls back to as well;
4. else float32.

torch is imported only when a tensor or a torch dtype is asked for: fingerprints, keys, shapes
and the declared dtype's *name* need none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergesweep.errors import ConfigError, MergesweepError
from mergesweep.merge.settings import canonical_dtype
from mergesweep.record import RECORD_FILE, sha256_file

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
#: where :func:`checkpoint_fingerprint` caches its result
FINGERPRINT_CACHE = ".mergesweep-sha256"
#: safetensors dtype code -> (torch attribute, bytes per element, floating point)
_CODES: dict[str, tuple[str, int, bool]] = {
    "F64": ("float64", 8, True),
    "F32": ("float32", 4, True),
    "F16": ("float16", 2, True),
    "BF16": ("bfloat16", 2, True),
    "F8_E4M3": ("float8_e4m3fn", 1, True),
    "F8_E5M2": ("float8_e5m2", 1, True),
    "I64": ("int64", 8, False),
    "I32": ("int32", 4, False),
    "I16": ("int16", 2, False),
    "I8": ("int8", 1, False),
    "U8": ("uint8", 1, False),
    "BOOL": ("bool", 1, False),
}
_NAME_TO_CODE = {attr: code for code, (attr, _, _) in _CODES.items()}
_MAX_HEADER = 100 << 20  # the safetensors library refuses headers above 100 MB as well


class CheckpointError(MergesweepError, ValueError):
    """A checkpoint is missing, incomplete or corrupt. The message names the file or tensor."""


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------
def torch_dtype(code_or_name: str) -> "torch.dtype":
    """The torch dtype of a safetensors code (``BF16``) or a torch attribute name (``bfloat16``)."""
    import torch

    attr = _CODES[code_or_name][0] if code_or_name in _CODES else code_or_name
    dt = getattr(torch, attr, None)
    if not isinstance(dt, torch.dtype):
        raise CheckpointError(f"dtype {code_or_name!r} is not available in this torch")
    return dt


def dtype_code(dtype: "torch.dtype") -> str:
    """The safetensors code of a torch dtype (``torch.bfloat16`` -> ``BF16``)."""
    name = str(dtype).replace("torch.", "")
    if name not in _NAME_TO_CODE:
        raise CheckpointError(f"dtype {name} cannot be stored in safetensors by mergesweep")
    return _NAME_TO_CODE[name]


def dtype_name(dtype: "torch.dtype") -> str:
    """``torch.bfloat16`` -> ``bfloat16``."""
    return str(dtype).replace("torch.", "")


def parse_dtype(value: Any, key: str = "dtype") -> "torch.dtype | None":
    """An output dtype option -> torch dtype (``None`` stays ``None``). The accepted names are
    :data:`mergesweep.merge.settings.DTYPES`; errors name ``key``."""
    if value is None:
        return None
    import torch

    if isinstance(value, torch.dtype):
        value = dtype_name(value)
    return torch_dtype(canonical_dtype(value, key))


# --------------------------------------------------------------------------------------------
# safetensors headers
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorEntry:
    file: str
    offset: int  # absolute byte offset of the data in the file
    nbytes: int
    code: str  # safetensors dtype code (F32, BF16, ...)
    shape: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return _CODES[self.code][1]

    @property
    def is_floating_point(self) -> bool:
        return _CODES[self.code][2]


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return doc


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """Parse and validate one safetensors file's header (no tensor data is read)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: file not found") from e
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file of {size} bytes)"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    data_size = size - data_start
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code = str(info["dtype"])
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor '{name}' has a malformed header entry ({e})") from e
        if code not in _CODES:
            raise CheckpointError(f"{path}: tensor '{name}' has dtype {code}, which mergesweep does not read")
        if end - begin != math.prod(shape) * _CODES[code][1] or begin < 0:
            raise CheckpointError(
                f"{path}: tensor '{name}' header is inconsistent (shape {list(shape)}, {end - begin} bytes)"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor '{name}' ends at byte {data_start + end} "
                f"but the file has {size} bytes"
            )
        entries[name] = TensorEntry(str(path), data_start + begin, end - begin, code, shape)
    return entries


# --------------------------------------------------------------------------------------------
# the reader
# --------------------------------------------------------------------------------------------
class CheckpointReader:
    """Lazy, per-tensor access to a Hugging Face safetensors checkpoint (single file or sharded).

    ``label`` (e.g. ``"expert 2 (math)"``) prefixes error messages, together with the path. Use
    as a context manager::

        with CheckpointReader("resources/checkpoints/base") as ckpt:
            for name in ckpt.keys():
                t = ckpt.get(name)        # torch.Tensor, CPU, in the stored dtype

    Each :meth:`get` maps just that tensor's byte range (a private copy-on-write mapping that is
    released when the tensor is freed: a third of the CPU cost of copying the bytes out of the
    page cache); with ``use_mmap = False``, or when the data is not aligned for its dtype, the
    bytes are copied with ``os.preadv`` into a fresh buffer instead. Either way nothing outlives
    the tensor. The files must not be modified or truncated while tensors are read.
    """

    use_mmap = True

    def __init__(self, path: str | os.PathLike, label: str | None = None):
        self.path = Path(path)
        self.label = label or str(self.path)
        if not self.path.is_dir():
            where = f"{label}: checkpoint directory {self.path}" if label else f"{self.path}: checkpoint directory"
            raise CheckpointError(f"{where} not found")
        self.config: dict = _read_json(self.path / "config.json")
        index = self.path / INDEX_FILE
        single = self.path / SINGLE_FILE
        self.entries: dict[str, TensorEntry] = {}
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: has no 'weight_map'")
            headers: dict[str, dict[str, TensorEntry]] = {}
            for name, fname in weight_map.items():
                if fname not in headers:
                    fpath = self.path / fname
                    if not fpath.exists():
                        raise CheckpointError(f"{fpath}: shard listed in the index is missing")
                    headers[fname] = read_safetensors_header(fpath)
                if name not in headers[fname]:
                    raise CheckpointError(
                        f"{self.path / fname}: tensor '{name}' is listed in the index but not in the shard"
                    )
                self.entries[name] = headers[fname][name]
        elif single.exists():
            self.entries = read_safetensors_header(single)
        else:
            raise CheckpointError(
                f"{self.label}: {self.path} has no {SINGLE_FILE} or {INDEX_FILE} "
                "(only safetensors checkpoints are read)"
            )
        self._fds: dict[str, int] = {}

    # -- metadata ---------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Parameter names in a stable order (the order of the index / file header)."""
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def _entry(self, name: str) -> TensorEntry:
        e = self.entries.get(name)
        if e is None:
            where = f"{self.label}: tensor '{name}' is missing in {self.path}" if self.label != str(self.path) \
                else f"{self.path}: tensor '{name}' is missing"
            raise CheckpointError(where)
        return e

    def file_of(self, name: str) -> Path:
        return Path(self._entry(name).file)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> "torch.dtype":
        return torch_dtype(self._entry(name).code)

    def is_floating_point(self, name: str) -> bool:
        return self._entry(name).is_floating_point

    @property
    def declared_dtype_name(self) -> str | None:
        """Rules 1-2 of the module docstring: config ``dtype``, else ``torch_dtype``, if it names
        float32, float16 or bfloat16 (canonical name), else ``None``."""
        for key in ("dtype", "torch_dtype"):
            value = self.config.get(key)
            if value is None:
                continue
            try:
                return canonical_dtype(value, key)
            except ConfigError:
                log.debug("%s: config %s=%r is not an output dtype; ignored", self.path, key, value)
        return None

    @property
    def default_dtype_name(self) -> str:
        """The whole precedence rule of the module docstring (never ``None``)."""
        declared = self.declared_dtype_name
        if declared is not None:
            return declared
        count: dict[str, int] = {}
        for e in self.entries.values():
            if e.is_floating_point:
                count[e.code] = count.get(e.code, 0) + math.prod(e.shape)
        if not count:
            return "float32"
        return _CODES[max(count, key=lambda c: (count[c], c))][0]

    @property
    def default_dtype(self) -> "torch.dtype":
        return torch_dtype(self.default_dtype_name)

    #: the name this property had before there was one precedence rule
    torch_dtype = default_dtype

    @property
    def tied_embeddings(self) -> bool:
        """``tie_word_embeddings`` from config.json (transformers' default, true, when absent)."""
        return bool(self.config.get("tie_word_embeddings", True))

    # -- reads -------------------------------------------------------------------------------
    def get(self, name: str) -> "torch.Tensor":
        """Read one tensor (CPU, stored dtype). Raises :class:`CheckpointError` naming it."""
        import torch

        e = self._entry(name)
        dtype = torch_dtype(e.code)
        fd = self._fds.get(e.file)
        if fd is None:
            fd = self._fds[e.file] = os.open(e.file, os.O_RDONLY)
        if e.nbytes == 0:
            return torch.empty(e.shape, dtype=dtype)
        delta = e.offset % mmap.ALLOCATIONGRANULARITY
        if self.use_mmap and delta % e.itemsize == 0:
            try:
                mm = mmap.mmap(fd, e.nbytes + delta, offset=e.offset - delta, access=mmap.ACCESS_COPY)
            except (OSError, ValueError):
                pass
            else:
                return torch.frombuffer(mm, dtype=dtype, count=e.nbytes // e.itemsize, offset=delta).reshape(e.shape)
        raw = torch.empty(e.nbytes, dtype=torch.uint8)  # uninitialised: no zero-fill pass
        view = memoryview(raw.numpy())
        done = 0
        while done < e.nbytes:
            got = os.preadv(fd, [view[done:]], e.offset + done)
            if got <= 0:
                raise CheckpointError(
                    f"{e.file}: truncated safetensors file: tensor '{name}' could not be read "
                    f"({done} of {e.nbytes} bytes)"
                )
            done += got
        return raw.view(dtype).reshape(e.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# other files
# --------------------------------------------------------------------------------------------
def copy_non_weight_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy tokenizer and generation files from ``src`` to ``dst``; return the names copied."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


# --------------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------------
def fingerprint_files(path: str | os.PathLike) -> list[Path]:
    """The files a checkpoint's fingerprint covers, in hashing order: every ``.json`` and
    ``.safetensors`` file of the directory except the model record, sorted by name."""
    return sorted(p for p in Path(path).iterdir()
                  if p.suffix in {".safetensors", ".json"} and p.name != RECORD_FILE)


def fingerprint_digest(h: "hashlib._Hash") -> str:
    """The fingerprint of a sha256 that was fed, per file of :func:`fingerprint_files` in
    order, the file's name (UTF-8) and then its bytes."""
    return h.hexdigest()[:16]


def _stamp(files: list[Path]) -> str:
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def cache_fingerprint(path: str | os.PathLike, digest: str) -> None:
    """Record ``digest`` (computed by the caller the way :func:`checkpoint_fingerprint` does,
    e.g. while writing the files) in the cache that :func:`checkpoint_fingerprint` reads, keyed
    by the files' names, sizes and mtimes now."""
    path = Path(path)
    _write_cache(path, _stamp(fingerprint_files(path)), digest)


def _write_cache(path: Path, stamp: str, digest: str) -> None:
    try:
        (path / FINGERPRINT_CACHE).write_text(f"{stamp}\n{digest}")
    except OSError:
        pass


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """A short content id of a checkpoint: sha256 (16 hex digits) over the name and bytes of
    each file of :func:`fingerprint_files` (config, index, tokenizer JSON, weights).

    The result is cached in ``.mergesweep-sha256`` next to the weights (keyed by the files'
    names, sizes and mtimes) so repeated calls are cheap.
    """
    path = Path(path)
    files = fingerprint_files(path)
    stamp = _stamp(files)  # taken before hashing: a file changed meanwhile invalidates the cache
    cache = path / FINGERPRINT_CACHE
    if cache.exists():
        cached_stamp, _, digest = cache.read_text().partition("\n")
        if cached_stamp == stamp and digest:
            return digest.strip()
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        sha256_file(p, h)
    digest = fingerprint_digest(h)
    _write_cache(path, stamp, digest)
    return digest
