"""Tensor I/O for the streaming engine: positional reads and pre-planned shard writes.

Why not ``safe_open``: it memory-maps whole files, and every page a merge touches stays
resident (and counted in the process RSS) until the handle closes, so reading four 540 MB
checkpoints through it costs ~2 GB of RSS even though only one parameter name is live at a
time. :class:`SafetensorsInput` parses the safetensors headers itself (validating every offset
against the file size up front, so a truncated file fails before anything is written) and reads
each tensor with ``os.pread`` into a fresh buffer that is freed as soon as the tensor is.

:class:`PlannedShardWriter` knows every output tensor's name, shape and dtype before the first
one is computed, so it writes all shard headers first and then ``pwrite``s each tensor at its
final offset as it is produced: no shard buffer is ever held in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import queue
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from mergesweep.checkpoints.layout import INDEX_FILE, SINGLE_FILE, CheckpointError
from mergesweep.errors import ConfigError, MergeError

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_CODES = {v: k for k, v in DTYPES.items()}

_MAX_HEADER = 100 << 20  # the safetensors library refuses headers above 100 MB as well


@dataclass(frozen=True)
class TensorEntry:
    file: str
    offset: int  # absolute byte offset of the data in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate one safetensors file's header (no tensor data is read)."""
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
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor '{name}' has a malformed header entry ({e})") from e
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != math.prod(shape) * itemsize or begin < 0:
            raise CheckpointError(
                f"{path}: tensor '{name}' header is inconsistent (shape {list(shape)}, {end - begin} bytes)"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor '{name}' ends at byte {data_start + end} "
                f"but the file has {size} bytes"
            )
        entries[name] = TensorEntry(str(path), data_start + begin, end - begin, dtype, shape)
    return entries


class SafetensorsInput:
    """One input checkpoint (HF directory): config, tensor index, positional tensor reads.

    ``label`` (e.g. ``"expert 2 (math)"``) prefixes every error message together with the path.
    """

    def __init__(self, path: str | os.PathLike, label: str):
        self.path = Path(path)
        self.label = label
        if not self.path.is_dir():
            raise CheckpointError(f"{label}: checkpoint directory {self.path} not found")
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
                f"{label}: {self.path} has no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)"
            )
        self._fds: dict[str, int] = {}

    use_mmap = True

    # -- metadata ---------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name].dtype

    @property
    def declared_dtype(self) -> torch.dtype | None:
        """``dtype`` / ``torch_dtype`` from config.json, if it names a floating dtype."""
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        if not name:
            return None
        dt = getattr(torch, str(name).replace("torch.", ""), None)
        return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else None

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", True))

    # -- reads -------------------------------------------------------------------------------
    def read(self, name: str) -> torch.Tensor:
        """Read one tensor (CPU, stored dtype).

        The tensor's bytes are mapped on their own (a private mapping of just that range, released
        when the tensor is freed), which costs a third of the CPU of copying them out of the page
        cache; with ``use_mmap = False``, or when the data is not aligned for its dtype, they are
        copied with ``pread`` into a fresh buffer instead. Either way nothing outlives the tensor.
        The input files must not be truncated while a merge reads them.
        """
        e = self.entries.get(name)
        if e is None:
            raise MergeError(f"{self.label}: tensor '{name}' is missing in {self.path}")
        fd = self._fds.get(e.file)
        if fd is None:
            fd = self._fds[e.file] = os.open(e.file, os.O_RDONLY)
        if e.nbytes == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        itemsize = torch.empty((), dtype=e.dtype).element_size()
        delta = e.offset % mmap.ALLOCATIONGRANULARITY
        if self.use_mmap and delta % itemsize == 0:
            try:
                mm = mmap.mmap(fd, e.nbytes + delta, offset=e.offset - delta, access=mmap.ACCESS_COPY)
            except (OSError, ValueError):
                pass
            else:
                return torch.frombuffer(mm, dtype=e.dtype, count=e.nbytes // itemsize, offset=delta).reshape(e.shape)
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
        return raw.view(e.dtype).reshape(e.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6,
          "G": 10**9, "T": 10**12}


def parse_size(value: int | str, key: str = "shard_size") -> int:
    """``2GB`` -> 2_000_000_000 (decimal units as in transformers; ``GiB`` for binary)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size such as '2GB', got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE_RE.match(str(value))
        unit = m.group(2).upper() if m else None
        if not m or unit not in _UNITS:
            raise ConfigError(f"{key}: expected a size such as '2GB' or '500MB', got {value!r}")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ConfigError(f"{key}: must be positive, got {value!r}")
    return n


@dataclass
class _Slot:
    shard: int
    offset: int  # absolute offset in the shard file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class PlannedShardWriter:
    """Write a Hugging Face safetensors checkpoint whose tensors are known in advance.

    ``plan`` is the ordered list of ``(name, shape, dtype)``. Tensors are packed greedily into
    shards of at most ``shard_size`` bytes (a tensor larger than that gets a shard of its own);
    one shard is written as ``model.safetensors``, several as ``model-0000i-of-0000N.safetensors``
    plus ``model.safetensors.index.json`` (written at once: its content is known from the plan).

    Tensors must be written in plan order. The bytes go out from a background thread (so disk
    writes overlap the next tensor's computation; at most ``queue_size`` results wait), which also
    computes the checkpoint's content fingerprint on the fly when :meth:`start` is given
    ``fingerprint=True``: the same sha256 as
    :func:`mergesweep.checkpoints.layout.checkpoint_fingerprint`, over every ``.json`` and
    ``.safetensors`` file in name order - so every other ``.json`` file of the output must
    already exist when :meth:`start` is called, and must not change afterwards.
    """

    def __init__(self, out_dir: str | os.PathLike, plan: list[tuple[str, tuple, torch.dtype]], shard_size: int,
                 queue_size: int = 2):
        self.out_dir = Path(out_dir)
        groups: list[list[tuple[str, tuple, torch.dtype, int]]] = [[]]
        used = 0
        for name, shape, dtype in plan:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if groups[-1] and used + nbytes > shard_size:
                groups.append([])
                used = 0
            groups[-1].append((name, tuple(shape), dtype, nbytes))
            used += nbytes
        n = len(groups)
        self.filenames = (
            [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.slots: dict[str, _Slot] = {}
        self.order: list[str] = []
        self.headers: list[bytes] = []
        self.total_size = 0
        self._fds: list[int] = []
        for i, group in enumerate(groups):
            header: dict = {"__metadata__": {"format": "pt"}}
            pos = 0
            for name, shape, dtype, nbytes in group:
                header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
                pos += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            head = struct.pack("<Q", len(raw)) + raw
            self.headers.append(head)
            path = self.out_dir / self.filenames[i]
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, head, 0)
            os.ftruncate(fd, len(head) + pos)
            off = len(head)
            for name, shape, dtype, nbytes in group:
                self.slots[name] = _Slot(i, off, nbytes, dtype, shape)
                self.order.append(name)
                off += nbytes
            self.total_size += pos
        self.files = list(self.filenames)
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {name: self.filenames[s.shard] for name, s in self.slots.items()},
            }
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            self.files.append(INDEX_FILE)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._next = 0
        self.digest: str | None = None

    # -- background thread --------------------------------------------------------------------
    def start(self, fingerprint: bool = False) -> "PlannedShardWriter":
        self._thread = threading.Thread(target=self._run, args=(fingerprint,), name="mergesweep-writer", daemon=True)
        self._thread.start()
        return self

    def _take(self):
        item = self._queue.get()
        if item is None:
            raise _Stop()
        return item

    def _write_item(self, item, h) -> None:
        name, data = item
        slot = self.slots[name]
        view = memoryview(data)
        fd = self._fds[slot.shard]
        done = 0
        while done < slot.nbytes:
            done += os.pwrite(fd, view[done:], slot.offset + done)
        if h is not None:
            h.update(view)

    def _run(self, fingerprint: bool) -> None:
        try:
            if not fingerprint:
                while True:
                    self._write_item(self._take(), None)
            h = hashlib.sha256()
            shard_index = {f: i for i, f in enumerate(self.filenames)}
            names = sorted(
                {p.name for p in self.out_dir.iterdir() if p.suffix in (".json", ".safetensors")
                 and p.name != "mergesweep.json"} | set(self.files)
            )
            by_shard: dict[int, list[str]] = {}
            for name in self.order:
                by_shard.setdefault(self.slots[name].shard, []).append(name)
            for fname in names:
                h.update(fname.encode())
                if fname in shard_index:
                    i = shard_index[fname]
                    h.update(self.headers[i])
                    for _ in by_shard.get(i, []):
                        self._write_item(self._take(), h)
                else:
                    with open(self.out_dir / fname, "rb") as f:
                        for block in iter(lambda: f.read(8 << 20), b""):
                            h.update(block)
            self.digest = h.hexdigest()[:16]
            while self._take() is not None:  # nothing more may come; drain until the sentinel
                pass
        except _Stop:
            return
        except BaseException as e:  # surfaced in the main thread by write()/close()
            self._error = e
            while True:  # keep draining so the producer never blocks
                if self._queue.get() is None:
                    return

    def _check(self) -> None:
        if self._error is not None:
            raise MergeError(f"writing the output failed: {self._error}") from self._error

    # -- API -------------------------------------------------------------------------------------
    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._check()
        slot = self.slots.get(name)
        if slot is None:
            raise MergeError(f"output tensor '{name}' was not planned (internal error)")
        if self._next >= len(self.order) or self.order[self._next] != name:
            raise MergeError(f"output tensor '{name}' written out of order (internal error)")
        if tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            raise MergeError(
                f"tensor '{name}': merged result has shape {list(tensor.shape)} / {tensor.dtype}, "
                f"expected {list(slot.shape)} / {slot.dtype}"
            )
        self._next += 1
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        if self._thread is None:
            self._write_item((name, data), None)
        else:
            self._queue.put((name, data))

    def close(self) -> list[str]:
        """Wait for the writes, check completeness, close files; return the file names written."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self._check()
        if self._next != len(self.order):
            raise MergeError(
                f"output tensor '{self.order[self._next]}' was never written "
                f"({len(self.order) - self._next} missing; internal error)"
            )
        return list(self.files)

    def abort(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []


class _Stop(Exception):
    pass
