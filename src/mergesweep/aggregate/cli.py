"""``mergesweep aggregate``: evaluation JSONs -> results/tables/scores.parquet.

Every input is checked before anything is written: a bad file, an impossible value, a duplicated
row, or a table without any successful evaluation exits 1 naming the file and leaves an existing
scores.parquet as it was."""

from __future__ import annotations

import argparse
import logging

from mergesweep.aggregate.checks import check_scores
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
    # refuse before writing: an existing scores.parquet is never replaced by an unusable table
    check_scores(df, f"--evals {' '.join(args.evals)}", inputs=[str(f) for f in files][:5])
    write_scores(df, args.out, provenance)
    n_err = int((df["status"] == "error").sum())
    log.info("wrote %s (%d rows from %d files%s)", args.out, len(df), len(files),
             f", {n_err} failed evaluations" if n_err else "")
    return 0
