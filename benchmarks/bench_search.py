"""Benchmark: what a search costs besides its merges and evaluations, and what MAP buys.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_search.py planning --tiny-run DIR [--candidates 1000]
    .venv/bin/python benchmarks/bench_search.py tiny-config --out hv.yaml    # grid + MAP on the tiny preset
    snakemake --cores 2 --configfile hv.yaml                                  # (in a tiny run's directory)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_search.py hypervolume --run DIR --configfile hv.yaml

``planning``: the overhead of planning one generation with ``--candidates`` evaluated candidates on
disk. A CMA-ES search (population 50) over ties' density and per-expert weights of the tiny
preset is run in-process on a synthetic objective until that many candidates are in its generation
files (under a scratch results directory); then, each timed in a fresh process:

* ``build_plan``: what every snakemake invocation (and every job's process) pays: the config
  checked and every candidate of every generation file registered as a plan merge (its content id);
* ``generation job``: ``mergesweep.search.steps.plan_generation``, what the checkpoint job runs:
  the previous generation's 50 candidates' evaluation JSONs read (copies of a real tiny-run
  evaluation, ids rewritten) with the aggregate's reader, validation rows kept, the strategy's
  state loaded, the next generation proposed and written.

``hypervolume``: on a finished run whose config has a grid of ``task_arithmetic`` weights over two
experts and a MAP search over the same experts: the hypervolume (reference point 0, 0) of the grid's
front and of MAP's measured candidates (each split; scores normalised by each domain's expert as
the leaderboard normalises them), and the evaluations MAP spent until its candidates' front was at
least as good as the grid's.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def _tiny_config(search: dict) -> dict:
    import yaml

    cfg = yaml.safe_load((REPO / "config/presets/tiny.yaml").read_text())
    cfg["search"] = [search]
    return cfg


PLANNING_SEARCH = {"strategy": "cmaes", "method": "ties", "budget": 100_000, "population": 50, "seed": 0,
                   "params": {"density": {"low": 0.1, "high": 1.0},
                              "weight": {"per_expert": True, "low": 0.0, "high": 1.0}}}


def _child(code: str, cwd: Path) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=cwd, check=True)
    return time.perf_counter() - t


def planning(args) -> None:
    import numpy as np
    import yaml

    from mergesweep.plan import build_plan
    from mergesweep.search.driver import plan_next
    from mergesweep.search.observations import Observation
    from mergesweep.search.state import generation_files, load_generation

    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    cfg = _tiny_config(PLANNING_SEARCH)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    import os

    os.chdir(work)
    plan = build_plan(cfg)
    (sid, s), = plan.searches.items()
    suites = list(s.config["objective"]["suites"])
    template_dir = Path(args.tiny_run) / "results/evals"
    for q, e in s.reference.items():  # the experts' evaluations: the objective's normalisation
        out = work / plan.layout.eval_json(e, q)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(template_dir / e / f"{q}.json", out)
    from mergesweep.search.steps import reference_of

    strategy = plan.search_strategy(sid, reference_of(plan, sid))

    def score(params, q):  # a smooth synthetic validation score per suite
        w = np.asarray(params["weight"], dtype=float)
        return float(np.exp(-((w - 0.3 - 0.1 * suites.index(q)) ** 2).sum()) * params["density"])

    gen = plan_next(strategy, s.dir)
    planned = len(gen.proposals)
    while planned < args.candidates:
        obs = [Observation(p.params, {q: score(p.params, q) for q in suites}) for p in gen.proposals]
        gen = plan_next(strategy, s.dir, obs)
        planned += len(gen.proposals)
    n_files = len(generation_files(s.dir))
    size = sum(p.stat().st_size for p in generation_files(s.dir))
    # the last generation's candidates get evaluation JSONs: copies of a real one, ids rewritten
    plan = build_plan(cfg)
    last = n_files - 1
    ids = plan.search_generation_ids(sid, last)
    merged_template = next(p for p in template_dir.iterdir() if p.name.startswith("task-arithmetic-"))
    for mid in dict.fromkeys(ids):
        for q in plan.suites:
            doc = json.loads((merged_template / f"{q}.json").read_text())
            doc["model_id"] = mid
            doc["model"]["model_id"] = mid
            out = work / plan.layout.eval_json(mid, q)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc))
    n_cand = len({i for g in range(n_files) for i in plan.search_generation_ids(sid, g)})
    setup = ("import yaml; from mergesweep.plan import build_plan; "
             "cfg = yaml.safe_load(open('config.yaml').read()); ")
    t_plan = min(_child(setup + "build_plan(cfg)", work) for _ in range(args.repeats))
    t_empty = min(_child("import yaml; from mergesweep.plan import build_plan", work) for _ in range(args.repeats))
    step = (setup + "import time; from mergesweep.search.steps import plan_generation; p = build_plan(cfg); "
            f"t = time.perf_counter(); plan_generation(p, {sid!r}, {last + 1}); "
            "print('STEP', time.perf_counter() - t)")
    best = None
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, "-c", step], cwd=work, capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        v = float(out.stdout.split("STEP")[1])
        best = v if best is None else min(best, v)
    nxt = load_generation(Path(s.dir) / f"generation-{last + 1:04d}.json")
    print(f"search: {n_cand} distinct candidates in {n_files} generation files ({size / 1e6:.1f} MB), "
          f"population {PLANNING_SEARCH['population']}, tiny preset")
    print(f"build_plan: {t_plan:.2f} s per snakemake invocation (imports alone {t_empty:.2f} s; "
          f"registering the candidates {t_plan - t_empty:.2f} s)")
    print(f"generation job (read {len(set(ids)) * len(suites)} evaluation JSONs, propose, write): {best:.2f} s; "
          f"proposed {len(nxt.proposals)}")
    shutil.rmtree(work, ignore_errors=True)


def hypervolume_2d(points, ref=(0.0, 0.0)) -> float:
    """The area dominated by ``points`` (maximising both) above ``ref``."""
    pts = sorted({(float(x), float(y)) for x, y in points if x > ref[0] and y > ref[1]}, key=lambda p: (-p[0], -p[1]))
    area, best_y = 0.0, ref[1]
    for x, y in pts:  # x descending: each point adds the strip above the best y so far
        if y > best_y:
            area += (x - ref[0]) * (y - best_y)
            best_y = y
    return area


def hypervolume(args) -> None:
    import pandas as pd
    import yaml

    from mergesweep.plan import build_plan

    run = Path(args.run)
    cfg = yaml.safe_load(Path(args.configfile).read_text())
    plan = build_plan(cfg)
    import os

    os.chdir(run)
    plan.load_searches()
    s = pd.read_parquet(run / "results/tables/scores.parquet")
    s = s[(s.metric == "acc") & (s.status == "ok")]
    for sid, search in plan.searches.items():
        if search.strategy != "map":
            continue
        res = json.loads((run / plan.layout.search_result(sid)).read_text())
        a, b = res["objective"]["suites"][:2]
        grid = [m for m in plan.grid_merges if plan.merges[m].method == search.method
                and plan.merges[m].experts == search.experts]
        order = [c["model_id"] for c in res["candidates"]]
        for split in ("validation", "test"):
            v = s[s.split == split].groupby(["model_id", "suite"])["value"].mean()
            ref = {q: v[(search.reference[q], q)] for q in (a, b)}

            def point(m):
                return (v[(m, a)] / ref[a], v[(m, b)] / ref[b])

            hv_grid = hypervolume_2d([point(m) for m in grid])
            reached = None
            for n in range(1, len(order) + 1):
                if reached is None and hypervolume_2d([point(m) for m in order[:n]]) >= hv_grid:
                    reached = n
            hv_map = hypervolume_2d([point(m) for m in order])
            print(f"{search.label} {split}: grid {len(grid)} merges HV {hv_grid:.4f}; MAP {len(order)} candidates "
                  f"HV {hv_map:.4f} (ratio {hv_map / hv_grid if hv_grid else float('nan'):.3f}); "
                  f"MAP reached the grid's HV after {reached if reached else 'never (not within its budget)'} evaluations")


def tiny_config(args) -> None:
    """The tiny preset with a full grid of task arithmetic's two per-expert weights (``--steps``
    values in [0, 1] each) and a MAP search over the same experts and weights."""
    import numpy as np
    import yaml

    experts = ["tiny-arithmetic", "tiny-dateformat"]
    values = [round(float(v), 4) for v in np.linspace(0.0, 1.0, args.steps)]
    grid = [{"per_expert": [a, b]} for a in values for b in values]
    cfg = yaml.safe_load((REPO / "config/presets/tiny.yaml").read_text())
    cfg["merges"] = [{"method": "task_arithmetic", "experts": experts, "params": {"weight": grid}}]
    cfg["search"] = [{"strategy": "map", "method": "task_arithmetic", "experts": experts,
                      "params": {"weight": {"per_expert": True, "low": 0.0, "high": 1.0}},
                      "budget": args.budget, "n_front": args.n_front, "seed": 0}]
    Path(args.out).write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(f"{args.out}: a grid of {len(grid)} task arithmetic merges and a MAP search of {args.budget} evaluations")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("planning")
    a.add_argument("--tiny-run", required=True, help="a finished tiny run (its evaluation JSONs are the templates)")
    a.add_argument("--candidates", type=int, default=1000)
    a.add_argument("--repeats", type=int, default=3)
    b = sub.add_parser("hypervolume")
    b.add_argument("--run", required=True)
    b.add_argument("--configfile", required=True)
    c = sub.add_parser("tiny-config")
    c.add_argument("--out", required=True)
    c.add_argument("--steps", type=int, default=5)
    c.add_argument("--budget", type=int, default=12)
    c.add_argument("--n-front", type=int, default=4)
    args = p.parse_args()
    {"planning": planning, "hypervolume": hypervolume, "tiny-config": tiny_config}[args.what](args)


if __name__ == "__main__":
    main()
