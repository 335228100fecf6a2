"""The ``mergesweep`` command: one entry point, one subcommand per stage.

Each subcommand lives in the module of its stage, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so ``mergesweep
methods`` does not pay for importing lm-eval.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# subcommand -> (module, help)
SUBCOMMANDS = {
    "fetch": ("mergesweep.checkpoints.cli", "fetch a checkpoint source into an HF-layout directory"),
    "make-data": ("mergesweep.zoo.cli_data", "generate the embedded skill data and lm-eval task YAMLs"),
    "pretrain": ("mergesweep.zoo.cli_pretrain", "build and pretrain a tiny Llama base (tests, tiny preset)"),
    "finetune": ("mergesweep.zoo.cli_finetune", "fine-tune an expert from a base on one skill"),
    "merge": ("mergesweep.merge.cli", "merge checkpoints once, from a YAML (outside any workflow)"),
    "methods": ("mergesweep.merge.cli_methods", "list merge methods, parameters, defaults and papers"),
    "lora-extract": ("mergesweep.lora.cli_extract", "a LoRA adapter from a dense expert (truncated SVD of its task vector)"),
    "revert": ("mergesweep.lora.revert", "one task's LoRA adapter, reverted from a reversible (RMM) merge"),
    "align": ("mergesweep.align.cli", "permutation-align a model onto a reference"),
    "stats": ("mergesweep.stats.cli", "statistics of a model on calibration data for data-aware merges (Gram, Fisher)"),
    "lmc": ("mergesweep.align.cli_lmc", "linear mode connectivity: loss along the path between two models"),
    "evaluate": ("mergesweep.evaluate.cli", "evaluate one model on its suites with lm-eval (the model loaded once)"),
    "calibration-data": ("mergesweep.evaluate.calibration", "an lm-eval suite's validation examples as calibration data (JSONL)"),
    "prefetch-datasets": ("mergesweep.evaluate.prefetch", "fetch the datasets of the spec's lm-eval tasks into the HF cache"),
    "search": ("mergesweep.search.cli", "a config's searches (MAP, CMA-ES, CycleQD): status; a generation or result by hand"),
    "aggregate": ("mergesweep.aggregate.cli", "collect evaluation JSONs into results/tables/scores.parquet"),
    "lmc-table": ("mergesweep.aggregate.lmc", "collect linear-mode-connectivity results into a parquet table"),
    "leaderboard": ("mergesweep.aggregate.cli_leaderboard", "regenerate tables, leaderboard and report from scores.parquet"),
    "plan": ("mergesweep.cost", "what a config's sweep costs: jobs per stage, GPU hours reserved, disk"),
    "profile": ("mergesweep.profile", "install a repository profile as a named Snakemake profile (snakemake --profile slurm)"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergesweep", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name == wanted:
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name == module:
                    parser.error(f"subcommand '{name}' is not available in this build ({module} missing)")
                raise
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    as_command = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from mergesweep.atomic import SignalExit, signal_cleanup
    from mergesweep.errors import MergesweepError

    try:
        # SIGTERM (SLURM's cancel and time limit), SIGINT and SIGHUP remove half-written outputs
        with signal_cleanup():
            return int(args._run(args) or 0)
    except SignalExit as e:
        # the clean-up has run (finally blocks, atomic outputs); leave at once with 128 + signal:
        # finalising the interpreter while library threads (torch, readers) are mid-call can abort
        if not as_command:  # called in-process (main([...])): let the caller see it
            raise
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(e.code)
    except MergesweepError as e:
        logging.getLogger("mergesweep").error("%s", e)
        print(f"mergesweep {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
