"""``mergesweep aggregate``: evaluation JSONs -> results/tables/scores.parquet.

The workflow reads the plan's evaluation directory: ``--evals-dir results/evals --models
results/evaluation_models.json`` (the models, and suites, of the plan, and the models evaluated on
some suites only: a task reverted from a reversible merge, on its domain; nothing else under the
directory is read, and the command line does not grow with the sweep). ``--evals`` takes files and
directories instead (directories are searched for ``**/*.json``).

Every input is checked before anything is written: a bad file, an impossible value, a duplicated
row, a listed model without evaluations, or a table without any successful evaluation exits 1
naming the file and leaves an existing scores.parquet as it was.

A run with searches lists them in the models file (keys ``searches`` and ``search_only``,
:mod:`mergesweep.aggregate.searches`): each search's result.json is read, checked against the
listed models and the scores, and a summary of it embedded in scores.parquet, so that
``mergesweep leaderboard`` needs nothing else."""

from __future__ import annotations

import argparse
import logging

from mergesweep.aggregate.checks import check_scores
from mergesweep.aggregate.provenance import load_provenance
from mergesweep.aggregate.searches import check_candidates, read_searches_list
from mergesweep.aggregate.scores import (
    EvalFileError,
    build_scores,
    eval_files_of,
    find_eval_files,
    read_models_list,
    write_scores,
)

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--evals", nargs="+", metavar="PATH",
                        help="evaluation JSONs (results/evals/<model_id>/<suite>.json) or directories "
                             "searched for **/*.json")
    parser.add_argument("--evals-dir", metavar="DIR",
                        help="the evaluation directory (results/evals): reads DIR/<model>/<suite>.json of the "
                             "models (and suites) listed in --models")
    parser.add_argument("--models", metavar="FILE",
                        help='with --evals-dir: {"models": [...], "suites": [...], "model_suites": {model: [...]}} '
                             "(suites optional: then every DIR/<model>/*.json; model_suites optional: the models "
                             "evaluated on those suites only; searches and search_only optional: the run's "
                             "searches, [{label, id, result}], and the merges only a search planned) or a text "
                             "file of model ids, one per line")
    parser.add_argument("--provenance", metavar="FILE.json",
                        help="run provenance (config hash, checkpoints, versions), embedded in the parquet")
    parser.add_argument("--out", required=True, metavar="FILE.parquet", help="output scores table")


def input_files(args: argparse.Namespace) -> tuple[list, str]:
    """The evaluation files the arguments name, and how to name them in a message."""
    if args.evals_dir or args.models:
        if args.evals:
            raise EvalFileError("give either --evals or --evals-dir with --models, not both")
        if not (args.evals_dir and args.models):
            raise EvalFileError("--evals-dir and --models go together")
        listed = read_models_list(args.models)
        return (eval_files_of(args.evals_dir, listed.models, listed.suites, listed.model_suites),
                f"--evals-dir {args.evals_dir} --models {args.models}")
    if not args.evals:
        raise EvalFileError("no input: give --evals PATH... or --evals-dir DIR --models FILE")
    files = find_eval_files(args.evals)
    source = f"--evals {' '.join(args.evals)}"
    if not files:
        raise EvalFileError(f"{source}: no evaluation JSON found")
    return files, source


def searches_of(args: argparse.Namespace) -> dict | None:
    """The searches the ``--models`` file lists (None without that file or without searches),
    checked (:func:`mergesweep.aggregate.searches.read_searches_list`)."""
    if not args.models:
        return None
    return read_searches_list(args.models, read_models_list(args.models).models)


def run(args: argparse.Namespace) -> int:
    provenance = load_provenance(args.provenance)
    files, source = input_files(args)
    searches = searches_of(args)
    df = build_scores(files)
    # refuse before writing: an existing scores.parquet is never replaced by an unusable table
    check_scores(df, source, inputs=[str(f) for f in files][:5])
    check_candidates(searches, df, str(args.models))
    write_scores(df, args.out, provenance, checked=True, searches=searches)
    n_err = int((df["status"] == "error").sum())
    log.info("wrote %s (%d rows from %d files%s)", args.out, len(df), len(files),
             f", {n_err} failed evaluations" if n_err else "")
    return 0
