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
    """A table as parquet; a text column that is entirely null stays a string column."""
    df = df.reset_index(drop=True)
    schema = pa.Schema.from_pandas(df, preserve_index=False)
    for i, f in enumerate(schema):
        if pa.types.is_null(f.type) or (df[f.name].dtype == object and df[f.name].isna().all()):
            schema = schema.set(i, pa.field(f.name, pa.string()))
    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    with atomic_file(path, "wb") as f:
        pq.write_table(table, f)
    publish(path)
