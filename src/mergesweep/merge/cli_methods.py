"""``mergesweep methods``: the merge-method registry with parameters, defaults and papers.

``--json`` is the machine-readable form; ``--markdown`` renders the tables of
``docs/merge.md`` from the same data, and ``--update-doc FILE`` rewrites the generated block of
FILE (between :data:`BEGIN_MARKER` and :data:`END_MARKER`). Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

BEGIN_MARKER = "<!-- BEGIN GENERATED: mergesweep methods --markdown -->"
END_MARKER = "<!-- END GENERATED: mergesweep methods --markdown -->"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="show one method in full (formula, paper, deviations)")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="machine-readable output")
    out.add_argument("--markdown", action="store_true", help="the methods tables of docs/merge.md")
    out.add_argument("--update-doc", metavar="FILE",
                     help=f"rewrite the generated tables in FILE (between {BEGIN_MARKER} and {END_MARKER})")


# --------------------------------------------------------------------------------------------
# machine-readable description
# --------------------------------------------------------------------------------------------
def data_text(spec) -> str | None:
    """What data the method reads with its default parameters: per-expert statistics of the
    stats stage, or calibration data for a whole-model merge (None: weights only)."""
    from mergesweep.merge.spec import resolve_params

    n = spec.min_experts if spec.max_experts == spec.min_experts else max(2, spec.min_experts)
    try:
        kp, _ = resolve_params(spec, {}, n, has_base=spec.base != "unused")
    except Exception:  # defaults that need other inputs: say nothing rather than guess
        return None
    if spec.uses_whole_model(kp):
        return "calibration data of each expert (a whole-model merge: forward passes)"
    kinds = spec.stats_kinds(kp)
    if kinds:
        return f"each expert's {', '.join(kinds)} statistics (the stats stage)"
    if spec.merge_model is not None:
        return "weights only with these parameters; calibration data with others (see its parameters)"
    return None


def describe(spec) -> dict:
    """Everything the registry knows about one method, as JSON-ready data."""
    return {
        "name": spec.name,
        "summary": spec.summary,
        "paper": spec.paper,
        "formula": spec.formula,
        "base": spec.base,
        "experts": spec.experts_text(),
        "min_experts": spec.min_experts,
        "max_experts": spec.max_experts,
        "order_invariant": spec.order_invariant,
        "whole_model_statistics": bool(spec.statistics),
        "reads_data": data_text(spec),
        "identities": [
            {"params": dict(i.params), "returns": i.returns, "n_experts": i.n_experts, "atol": i.atol}
            for i in spec.identities
        ],
        "composition": dict(spec.composition) if spec.composition else None,
        "deviations": spec.deviations or None,
        "mergekit": spec.mergekit or None,
        "params": [
            {"name": p.name, "kind": p.kind, "type": p.kind, "default": p.default, "range": p.range_text(),
             "low": p.low, "high": p.high, "low_open": p.low_open, "high_open": p.high_open,
             "choices": list(p.choices) if p.choices else None, "per_expert": p.per_expert, "help": p.help}
            for p in spec.params
        ],
    }


# --------------------------------------------------------------------------------------------
# markdown (docs/merge.md)
# --------------------------------------------------------------------------------------------
def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default_text(p) -> str:
    if p.default is None:
        return "auto"
    return "`" + json.dumps(p.default) + "`"


def markdown(specs) -> str:
    """The generated part of docs/merge.md: methods, parameters, composition, departures from
    the papers, differences from mergekit 0.1.5, identity points."""
    specs = list(specs)
    out = [BEGIN_MARKER,
           "<!-- Do not edit by hand: `mergesweep methods --update-doc docs/merge.md` regenerates this block "
           "from the method specs, and tests/test_methods_registry.py checks it is current. -->",
           "",
           "| method | formula (per tensor unless noted) | base | experts | order-invariant | paper |",
           "|---|---|---|---|---|---|"]
    for s in specs:
        out.append(f"| `{s.name}` | {_cell(s.formula)} | {s.base} | {_cell(s.experts_text())} | "
                   f"{'yes' if s.order_invariant else 'no'} | {_cell(s.paper)} |")
    out += ["", "\"Order-invariant\": permuting the experts together with their per-expert parameters gives the "
            "same merge (up to float rounding). DARE and DELLA draw each expert's mask from its index; slerp "
            "and layer_swap treat the first model differently.", "",
            "### Parameters", "",
            "| method | parameter | kind | default | range | per expert | meaning |",
            "|---|---|---|---|---|---|---|"]
    for s in specs:
        for p in s.params:
            out.append(f"| `{s.name}` | `{p.name}` | {p.kind} | {_cell(_default_text(p))} | {_cell(p.range_text())} | "
                       f"{'yes' if p.per_expert else ''} | {_cell(p.help)} |")
    family = [s for s in specs if s.composition]
    if family:
        keys = []
        for s in family:
            keys += [k for k in s.composition if k not in keys]
        out += ["", "### How the task-vector methods are composed", "",
                "Each is one call of `mergesweep.merge.methods._taskvector.task_vector_method` with these parts "
                "(`tau_i'` is the sparsified, rescaled task vector):", "",
                "| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for s in family:
            out.append(f"| `{s.name}` | " + " | ".join(_cell(s.composition.get(k, "-")) for k in keys) + " |")
    out += ["", "### Where implementations depart from the papers", "", "| method | departure |", "|---|---|"]
    for s in specs:
        if s.deviations:
            out.append(f"| `{s.name}` | {_cell(s.deviations)} |")
    out += ["", "### Differences from mergekit 0.1.5", "",
            "Parameter names follow mergekit, so recipes port, but these differences change the merged model "
            "(methods not listed have no mergekit 0.1.5 counterpart: "
            + ", ".join(f"`{s.name}`" for s in specs if not s.mergekit) + "):", "",
            "| method | difference from mergekit 0.1.5 |", "|---|---|"]
    for s in specs:
        if s.mergekit:
            out.append(f"| `{s.name}` | {_cell(s.mergekit)} |")
    out += ["", "### Identity points", "",
            "Declared in each spec and checked by the registry tests (bit for bit unless a tolerance is given):",
            "", "| method | parameters, inputs: result |", "|---|---|"]
    for s in specs:
        out.append(f"| `{s.name}` | " + "; ".join(_cell(i.describe()) for i in s.identities) + " |")
    out.append(END_MARKER)
    return "\n".join(out) + "\n"


def replace_generated(text: str, generated: str) -> str:
    """``text`` with its block between the markers (markers included) replaced by ``generated``."""
    start, end = text.find(BEGIN_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        raise ValueError(f"no {BEGIN_MARKER} ... {END_MARKER} block")
    end += len(END_MARKER)
    if text[end:end + 1] == "\n":
        end += 1
    return text[:start] + generated + text[end:]


def generated_block(text: str) -> str:
    """The block between the markers (markers included, with its final newline)."""
    start, end = text.find(BEGIN_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        raise ValueError(f"no {BEGIN_MARKER} ... {END_MARKER} block")
    end += len(END_MARKER)
    return text[start:end] + "\n"


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from mergesweep.merge.methods import REGISTRY, get_method

    specs = [get_method(args.name)] if args.name else list(REGISTRY.values())
    if args.json:
        print(json.dumps([describe(s) for s in specs], indent=2))
        return 0
    if args.markdown:
        sys.stdout.write(markdown(specs))
        return 0
    if args.update_doc:
        path = Path(args.update_doc)
        text = path.read_text()
        new = replace_generated(text, markdown(specs))
        if new != text:
            path.write_text(new)
            print(f"updated {path}")
        else:
            print(f"{path} is up to date")
        return 0
    for spec in specs:
        print(f"{spec.name}  -  {spec.summary}")
        print(f"    paper: {spec.paper}")
        print(f"    base: {spec.base}; experts: {spec.experts_text()}"
              + ("; whole-model statistics (extra streaming passes)" if spec.statistics else "")
              + ("; order-invariant" if spec.order_invariant else "; depends on expert order"))
        if data_text(spec):
            print(f"    reads: {data_text(spec)}")
        if spec.deviations:
            print(f"    note: {spec.deviations}")
        if args.name and spec.mergekit:
            print(f"    vs mergekit 0.1.5: {spec.mergekit}")
        for p in spec.params:
            default = "auto" if p.default is None else json.dumps(p.default)
            per = ", per expert" if p.per_expert else ""
            print(f"    {p.name:<16} {p.kind:<5} default {default:<8} {p.range_text()}{per}  {p.help}")
        if args.name:
            if spec.composition:
                print("    parts:")
                for k, v in spec.composition.items():
                    print(f"      {k}: {v}")
            print()
            print(textwrap.indent(textwrap.dedent(spec.doc or "").strip(), "    "))
        print()
    return 0
