"""``mergesweep leaderboard``: scores.parquet -> every table, results/leaderboard.md and the report."""

from __future__ import annotations

import argparse
import logging

from mergesweep.aggregate.outputs import regenerate
from mergesweep.aggregate.provenance import load_provenance
from mergesweep.errors import MergesweepError

log = logging.getLogger(__name__)


def _metric(text: str) -> tuple[str, str]:
    suite, sep, metric = text.partition("=")
    if not sep or not suite or not metric:
        raise argparse.ArgumentTypeError(f"expected SUITE=METRIC, got {text!r}")
    return suite, metric


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scores", required=True, metavar="FILE.parquet", help="results/tables/scores.parquet")
    parser.add_argument("--out-dir", required=True, metavar="DIR",
                        help="results directory: writes tables/{leaderboard,selection,pareto,reversible}.parquet, "
                             "leaderboard.md, report/report.html and report/*.png")
    parser.add_argument("--provenance", metavar="FILE.json",
                        help="run provenance; default: the one embedded in scores.parquet")
    parser.add_argument("--metric", action="append", type=_metric, default=[], metavar="SUITE=METRIC",
                        help="primary metric of a suite (default: acc where reported); repeatable")


def run(args: argparse.Namespace) -> int:
    metrics = dict(args.metric)
    if len(metrics) != len(args.metric):
        raise MergesweepError("--metric: a suite is given twice")
    _, paths = regenerate(args.scores, args.out_dir, load_provenance(args.provenance), metrics)
    for p in paths.values():
        log.debug("wrote %s", p)
    return 0
