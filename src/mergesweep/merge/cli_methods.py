"""``mergesweep methods``: the merge-method registry with parameters, defaults and papers."""

from __future__ import annotations

import argparse
import json
import textwrap


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="show one method in full (formula, paper, deviations)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _describe(spec) -> dict:
    return {
        "name": spec.name,
        "summary": spec.summary,
        "paper": spec.paper,
        "base": spec.base,
        "experts": spec.experts_text(),
        "whole_model_statistics": bool(spec.statistics),
        "deviations": spec.deviations or None,
        "params": [
            {"name": p.name, "type": p.kind, "default": p.default, "range": p.range_text(),
             "per_expert": p.per_expert, "help": p.help}
            for p in spec.params
        ],
    }


def run(args: argparse.Namespace) -> int:
    from mergesweep.merge.methods import REGISTRY, get_method

    specs = [get_method(args.name)] if args.name else list(REGISTRY.values())
    if args.json:
        print(json.dumps([_describe(s) for s in specs], indent=2))
        return 0
    for spec in specs:
        print(f"{spec.name}  -  {spec.summary}")
        print(f"    paper: {spec.paper}")
        print(f"    base: {spec.base}; experts: {spec.experts_text()}"
              + ("; whole-model statistics (extra streaming passes)" if spec.statistics else ""))
        if spec.deviations:
            print(f"    note: {spec.deviations}")
        for p in spec.params:
            default = "auto" if p.default is None else json.dumps(p.default)
            per = ", per expert" if p.per_expert else ""
            print(f"    {p.name:<16} {p.kind:<5} default {default:<8} {p.range_text()}{per}  {p.help}")
        if args.name:
            print()
            print(textwrap.indent(textwrap.dedent(spec.doc or "").strip(), "    "))
        print()
    return 0
