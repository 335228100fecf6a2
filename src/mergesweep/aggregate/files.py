"""Atomic writers for the aggregate outputs, with the usual file mode."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mergesweep.atomic import atomic_file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(path: Path) -> None:
    """Give a finished output the usual ``0666 & ~umask`` mode (the atomic temporary file is
    created private, 0600, and the rename keeps that)."""
    os.chmod(path, 0o666 & ~_umask())


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)
    publish(path)


def write_text(path: Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)
    publish(path)


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    with atomic_file(path, "wb") as f:
        pq.write_table(table, f)
    publish(path)
