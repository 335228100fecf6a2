"""The shard writer of the streaming engine: pre-planned safetensors shards, written in place.

:class:`PlannedShardWriter` knows every output tensor's name, shape and dtype before the first
one is computed, so it writes all shard headers (and the index) first and then ``pwrite``s each
tensor at its final offset as it is produced: no shard buffer is ever held in memory. Inputs are
read with :class:`mergesweep.checkpoints.layout.CheckpointReader`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from mergesweep.checkpoints.layout import INDEX_FILE, SINGLE_FILE, dtype_code, fingerprint_digest, fingerprint_files
from mergesweep.errors import MergeError
from mergesweep.record import sha256_file


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

    Tensors must be written in plan order. After :meth:`start` the bytes go out from a background
    thread (so disk writes overlap the next tensor's computation; at most ``queue_size`` results
    wait; without :meth:`start`, :meth:`write` writes in the caller's thread), which also
    computes the checkpoint's content fingerprint on the fly when :meth:`start` is given
    ``fingerprint=True``: the same digest as
    :func:`mergesweep.checkpoints.layout.checkpoint_fingerprint`, over the files of
    :func:`~mergesweep.checkpoints.layout.fingerprint_files` - so every other ``.json`` file of
    the output must already exist when :meth:`start` is called, and must not change afterwards.
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
                header[name] = {"dtype": dtype_code(dtype), "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
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
            names = [p.name for p in fingerprint_files(self.out_dir)]  # the shards and index exist already
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
                    sha256_file(self.out_dir / fname, h)
            self.digest = fingerprint_digest(h)
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
