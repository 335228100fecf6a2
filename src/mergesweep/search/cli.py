"""``mergesweep search``: where a config's searches stand, and their jobs run by hand.

    mergesweep search [--configfile FILE]                       each search: label, id, generations, candidates
    mergesweep search --search LABEL --generation N             plan generation N (what the checkpoint job runs)
    mergesweep search --search LABEL --result                   write the finished search's result.json

Run from the directory the workflow runs in (paths are relative to it, as in the workflow).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configfile", metavar="FILE.yaml",
                        help="the workflow config (default: the embedded default config/config.yaml)")
    parser.add_argument("--search", metavar="LABEL|ID", help="one search, by its label (map:task_arithmetic) or id")
    act = parser.add_mutually_exclusive_group()
    act.add_argument("--generation", type=int, metavar="N", help="plan generation N of --search")
    act.add_argument("--result", action="store_true", help="write --search's result.json (the search must be finished)")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")


def _find(plan, name: str) -> str:
    from mergesweep.errors import ConfigError

    for sid, s in plan.searches.items():
        if name in (sid, s.label):
            return sid
    known = ", ".join(f"{s.label} ({sid})" for sid, s in plan.searches.items()) or "none in this config"
    raise ConfigError(f"--search {name}: no such search (searches: {known})")


def status(plan) -> list[dict]:
    """Per search: label, id, strategy, method, budget, generations written, candidates planned
    (distinct merge ids), finished or not."""
    from mergesweep.search.state import generation_files

    out = []
    for sid, s in plan.searches.items():
        n = len(generation_files(s.dir))
        ids = [plan.search_generation_ids(sid, g) for g in range(n)]
        out.append({"label": s.label, "id": sid, "strategy": s.strategy, "method": s.method,
                    "budget": s.config["budget"], "generations": n,
                    "candidates": len({i for gen in ids for i in gen}),
                    "finished": bool(n) and not ids[-1], "dir": s.dir})
    return out


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mergesweep.config import load_config_file
    from mergesweep.errors import ConfigError
    from mergesweep.plan import build_plan

    path = args.configfile or Path(__file__).resolve().parents[3] / "config" / "config.yaml"
    plan = build_plan(load_config_file(path))
    if args.generation is not None or args.result:
        if not args.search:
            raise ConfigError("--generation/--result: name the search with --search LABEL")
        sid = _find(plan, args.search)
        if args.result:
            from mergesweep.search.steps import write_search_result

            write_search_result(plan, sid, plan.layout.search_result(sid))
        else:
            if args.generation < 0:
                raise ConfigError(f"--generation {args.generation}: expected an integer >= 0")
            from mergesweep.search.steps import plan_generation

            plan_generation(plan, sid, args.generation)
        return 0
    rows = status(plan)
    if args.search:
        sid = _find(plan, args.search)
        rows = [r for r in rows if r["id"] == sid]
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    elif not rows:
        sys.stdout.write("no search in this config\n")
    else:
        for r in rows:
            state = "finished" if r["finished"] else f"{r['generations']} generation(s) planned"
            sys.stdout.write(f"{r['label']:<28} {r['id']:<40} {r['candidates']:>5}/{r['budget']} candidates  {state}\n")
    return 0
