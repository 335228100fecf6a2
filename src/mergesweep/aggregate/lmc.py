"""Linear-mode-connectivity results (``results/lmc/*.json`` from ``mergesweep lmc``) as a table.

One row per (model, reference, alignment method): the loss barrier along the linear path
before and after alignment,

    barrier = max_α [ L(α) − ((1 − α) L(0) + α L(1)) ],

and the reduction ``barrier − barrier_aligned``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from mergesweep.atomic import atomic_file
from mergesweep.errors import MergesweepError

COLUMNS = ["model_id", "reference_id", "perm_method", "barrier", "barrier_aligned", "barrier_reduction",
           "points", "source_file"]


def lmc_rows(paths: list[str | Path]) -> pd.DataFrame:
    rows = []
    for p in map(Path, paths):
        try:
            doc = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MergesweepError(f"{p}: cannot read LMC result ({e})") from e
        if "barrier" not in doc:
            raise MergesweepError(f"{p}: no 'barrier' key (not a `mergesweep lmc` result)")
        b, ba = doc.get("barrier"), doc.get("barrier_aligned")
        rows.append({"model_id": doc.get("model_b_id"), "reference_id": doc.get("model_a_id"),
                     "perm_method": doc.get("perm_method"), "barrier": b, "barrier_aligned": ba,
                     "barrier_reduction": (b - ba) if (b is not None and ba is not None) else None,
                     "points": len(doc.get("alphas") or []), "source_file": str(p)})
    return pd.DataFrame(rows, columns=COLUMNS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lmc", nargs="*", default=[], help="results/lmc/*.json")
    p.add_argument("--out", required=True, type=Path)


def run(args: argparse.Namespace) -> int:
    df = lmc_rows(args.lmc)
    with atomic_file(args.out, "wb") as f:
        df.to_parquet(f, index=False)
    return 0
