"""Hugging Face checkpoint layout: lazy tensor reading from safetensors (single file or sharded).

A :class:`CheckpointReader` opens a directory holding ``config.json`` and either
``model.safetensors`` or ``model.safetensors.index.json`` plus its shards, and hands out one
tensor at a time (memory-mapped), so callers can stream over parameter names without ever
holding a whole model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from mergesweep.errors import MergesweepError

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


class CheckpointError(MergesweepError, ValueError):
    """A checkpoint is missing, incomplete or corrupt. The message names the file or tensor."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: file not found") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


class CheckpointReader:
    """Lazy, per-tensor access to a Hugging Face safetensors checkpoint.

    Use as a context manager::

        with CheckpointReader("resources/checkpoints/base") as ckpt:
            for name in ckpt.keys():
                t = ckpt.get(name)        # torch.Tensor, in the stored dtype
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: checkpoint directory not found")
        self.config = _read_json(self.path / "config.json")
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        index = self.path / INDEX_FILE
        single = self.path / SINGLE_FILE
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: has no 'weight_map'")
            self._where = dict(weight_map)
        elif single.exists():
            self._where = {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}
        else:
            raise CheckpointError(
                f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)"
            )

    # -- file handles -------------------------------------------------------------------------
    def _open(self, filename: str):
        h = self._handles.get(filename)
        if h is None:
            fpath = self.path / filename
            if not fpath.exists():
                raise CheckpointError(f"{fpath}: shard listed in the index is missing")
            try:
                h = self._stack.enter_context(safe_open(str(fpath), framework="pt", device="cpu"))
            except Exception as e:  # safetensors raises SafetensorError (not exported stably)
                raise CheckpointError(f"{fpath}: cannot be read as safetensors ({e})") from e
            self._handles[filename] = h
        return h

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- tensors --------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Parameter names in a stable order (the order of the index / file)."""
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self.path / self._where[name]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor. Raises :class:`CheckpointError` naming the tensor and file."""
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor '{name}' is missing")
        fname = self._where[name]
        try:
            return self._open(fname).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.path / fname}: tensor '{name}' cannot be read ({e})") from e

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor '{name}' is missing")
        return tuple(self._open(self._where[name]).get_slice(name).get_shape())

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.keys():
            yield name, self.get(name)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype declared in config.json (``torch_dtype`` or ``dtype``), default float32."""
        name = self.config.get("torch_dtype") or self.config.get("dtype") or "float32"
        return getattr(torch, str(name).replace("torch.", ""))


def copy_non_weight_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy tokenizer and generation files from ``src`` to ``dst``; return the names copied."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """A short content id of a checkpoint: sha256 over config.json and the weight files' bytes.

    Large files are hashed in 8 MiB blocks; the result is cached in ``.mergesweep-sha256`` next to
    the weights (keyed by file sizes and mtimes) so repeated calls are cheap.
    """
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".json"} and p.name != "mergesweep.json")
    stamp = ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    cache = path / ".mergesweep-sha256"
    if cache.exists():
        cached_stamp, _, digest = cache.read_text().partition("\n")
        if cached_stamp == stamp and digest:
            return digest.strip()
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(8 << 20), b""):
                h.update(block)
    digest = h.hexdigest()[:16]
    try:
        cache.write_text(f"{stamp}\n{digest}")
    except OSError:
        pass
    return digest
