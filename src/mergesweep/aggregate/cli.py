"""``mergesweep aggregate``: evaluation JSONs -> results/tables/scores.parquet."""

from __future__ import annotations

import argparse
import logging

from mergesweep.aggregate.provenance import load_provenance
from mergesweep.aggregate.scores import EvalFileError, build_scores, find_eval_files, write_scores

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--evals", nargs="+", required=True, metavar="PATH",
                        help="evaluation JSONs (results/evals/<model_id>/<suite>.json) or directories "
                             "searched for **/*.json")
    parser.add_argument("--provenance", metavar="FILE.json",
                        help="run provenance (config hash, checkpoints, versions), embedded in the parquet")
    parser.add_argument("--out", required=True, metavar="FILE.parquet", help="output scores table")


def run(args: argparse.Namespace) -> int:
    provenance = load_provenance(args.provenance)
    files = find_eval_files(args.evals)
    if not files:
        raise EvalFileError(f"--evals {' '.join(args.evals)}: no evaluation JSON found")
    df = build_scores(files)
    write_scores(df, args.out, provenance)
    n_err = int((df["status"] == "error").sum())
    log.info("wrote %s (%d rows from %d files%s)", args.out, len(df), len(files),
             f", {n_err} failed evaluations" if n_err else "")
    return 0
