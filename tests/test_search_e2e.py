"""Searches through the real pipeline: the shared tiny run, extended with a MAP search and a CMA-ES
search over task arithmetic's per-expert weights (config ``search:``), run with ``snakemake``,
cut by Ctrl-C mid-search and run again with the same command.

Each generation is a Snakemake checkpoint; its candidates are ordinary merges evaluated by the
ordinary jobs. What the tests assert, each on values:

* the run cut mid-search and re-run finishes both searches, and no candidate whose evaluation had
  finished is evaluated again (its evaluation files are untouched; the second run's evaluation
  jobs are exactly the candidates that had none);
* the generation files are exactly what an uninterrupted search proposes: the strategy replayed
  in-process, from its seed, on the candidates' validation scores read from scores.parquet,
  writes the same proposals, observations and state (same seed, same candidates, same ids);
* every score a strategy received is the candidate's *validation* accuracy (and the test
  accuracies differ, so a strategy fed test scores would be caught);
* MAP's measured front points lie within twice the surrogates' leave-one-out RMSE of their
  predictions; CMA-ES's second generation beats its first on the validation objective;
* the leaderboard lists each search as a method (``map:task_arithmetic``), its selected candidate
  the best one on validation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mergesweep.layout import Layout
from mergesweep.plan import build_plan
from mergesweep.search.base import params_key
from mergesweep.search.driver import run_loop
from mergesweep.search.observations import Observation
from mergesweep.search.state import load_all
from test_pipeline_e2e import SNAKEMAKE, copy_of, planned_jobs, run, snakemake, value  # noqa: F401  (run: the fixture)

pytestmark = pytest.mark.slow

EXPERTS = ["tiny-arithmetic", "tiny-dateformat"]
WEIGHTS = {"weight": {"per_expert": True, "low": 0.0, "high": 1.0}}
SEARCHES = [
    # 8 design points for a quadratic in 2 weights (6 coefficients: the leave-one-out error is
    # defined), then 2 points of the surrogates' Pareto front
    {"strategy": "map", "method": "task_arithmetic", "experts": EXPERTS, "params": WEIGHTS,
     "budget": 10, "n_samples": 8, "n_front": 2, "seed": 0},
    # two generations of 3, from small weights (near the base, which scores ~0 on both skills)
    {"strategy": "cmaes", "method": "task_arithmetic", "experts": EXPERTS, "params": WEIGHTS,
     "budget": 6, "population": 3, "x0": {"weight": [0.2, 0.2]}, "sigma0": 0.3, "seed": 0},
]
LABELS = ["map:task_arithmetic", "cmaes:task_arithmetic"]


def _jobs(log: str, rule: str = "evaluate_merged") -> dict[str, str]:
    """jobid -> merge id of the ``rule`` jobs a snakemake log started (each job's block: its
    ``[local]rule NAME:`` line and the indented lines under it)."""
    import re

    out = {}
    for m in re.finditer(r"^(?:local)?rule (\w+):\n((?:[ \t]+.*\n?)*)", log, re.M):
        if m.group(1) == rule:
            jid, mid = re.search(r"jobid: (\d+)", m.group(2)), re.search(r"wildcards: merge_id=([\w-]+)", m.group(2))
            if jid and mid:
                out[jid.group(1)] = mid.group(1)
    return out


def _evaluated(log: str) -> list[str]:
    """The merge ids of the evaluation jobs a snakemake log started."""
    return list(_jobs(log).values())


def _finished(log: str) -> set[str]:
    """The merge ids of the evaluation jobs a snakemake log says finished."""
    import re

    done = set(re.findall(r"Finished jobid: (\d+)", log))
    return {m for j, m in _jobs(log).items() if j in done}


def extend_and_run(tiny_workdir: Path, dst: Path) -> dict:
    """A copy of the finished tiny run with the two searches added: the dry run's job counts, a
    run cut by Ctrl-C once MAP's first generation is evaluated, then the same command again.
    tests/conftest.py starts it in the background after the shared tiny run; the tests below
    assert on it."""
    work = copy_of({"workdir": tiny_workdir}, dst)
    cfg_path = work / "config/presets/tiny.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["search"] = SEARCHES
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    # the plan as the workflow sees it from its directory (paths under work/)
    plan = build_plan(cfg, Layout(resources=str(work / "resources"), results=str(work / "results")))
    map_dir = work / next(s.dir for s in plan.searches.values() if s.strategy == "map")
    jobs = planned_jobs(snakemake(work, cfg_path, "-n").stdout)

    cmd = [*SNAKEMAKE, "--snakefile", str(work / "Snakefile"), "--directory", str(work), "--cores", "2",
           "--configfile", str(cfg_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    first_log = dst / "first.log"
    with open(first_log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=work,
                                start_new_session=True)
        deadline = time.time() + 900
        while not (map_dir / "generation-0001.json").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        cut = proc.poll() is None
        if cut:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
        proc.wait(300)
    after_cut = {str(p.relative_to(work)): p.stat().st_mtime_ns for p in (work / "results/evals").glob("*/*.json")}
    results_after_cut = [s.dir for s in plan.searches.values() if (work / s.dir / "result.json").exists()]
    again = snakemake(work, cfg_path, check=False)
    noop = snakemake(work, cfg_path, "-n", check=False)  # the finished run: nothing left to do
    return {"noop": noop.stdout + noop.stderr, "work": work, "cfg": cfg, "plan": plan, "jobs": jobs, "cut": cut, "first_log": first_log.read_text(),
            "after_cut": after_cut, "results_after_cut": results_after_cut, "rc": again.returncode,
            "log": again.stderr}


@pytest.fixture(scope="module")
def search_run(run, tmp_path_factory):
    from conftest import early_search_run

    got = early_search_run()
    return got if got is not None else extend_and_run(run["workdir"], tmp_path_factory.mktemp("search-run"))


def _scores(work: Path) -> pd.DataFrame:
    return pd.read_parquet(work / "results/tables/scores.parquet")


def _results(search_run) -> dict:
    work, plan = search_run["work"], search_run["plan"]
    return {s.label: json.loads((work / plan.layout.search_result(sid)).read_text()) for sid, s in plan.searches.items()}


def test_a_search_cut_by_ctrl_c_finishes_on_the_same_command_without_evaluating_twice(search_run):
    work, jobs = search_run["work"], search_run["jobs"]
    # the dry run: generation 0 of each search and the searches' results; the rest comes with the checkpoints
    assert jobs.get("search_generation") == 2 and jobs.get("search_result") == 2, jobs
    assert "finetune" not in jobs and "pretrain_base" not in jobs, jobs
    assert search_run["cut"], "the first run finished before it could be cut mid-search"
    assert search_run["results_after_cut"] == [], "a search had finished before the cut"
    assert search_run["rc"] == 0, search_run["log"][-5000:]

    results = _results(search_run)
    candidates = {c["model_id"] for r in results.values() for c in r["candidates"]}
    assert results["map:task_arithmetic"]["generations"] == 3  # design, front, finished
    assert results["cmaes:task_arithmetic"]["generations"] == 3  # two generations of 3, finished
    # every candidate was evaluated on every suite; evaluations finished before the cut are untouched
    plan = search_run["plan"]
    for mid in candidates:
        for suite in plan.suites:
            assert (work / plan.layout.eval_json(mid, suite)).is_file(), (mid, suite)
    # (a job cut mid-way may have written some of its suites' files: it is redone, as it should be)
    done_before = _finished(search_run["first_log"]) & candidates
    for path, mtime in search_run["after_cut"].items():
        if Path(path).parent.name in done_before:
            assert (work / path).stat().st_mtime_ns == mtime, f"{path} was written again after the cut"
    second = _evaluated(search_run["log"])
    assert done_before, "no candidate's evaluation had finished before the cut"
    assert not set(second) & done_before, set(second) & done_before
    assert len(second) == len(set(second)), second
    assert set(second) | done_before == candidates  # each candidate evaluated exactly once
    # the grid's merges and the experts were not evaluated again either
    first = _evaluated(search_run["first_log"])
    assert set(first) <= candidates and "rule evaluate:" not in search_run["log"]
    # and the same command once more has nothing to do (no generation, merge or evaluation again)
    assert "Nothing to be done" in search_run["noop"], search_run["noop"][-3000:]

    # the scores table has every candidate, as a merged model with its parameters
    s = _scores(work)
    rows = s[s.model_id.isin(candidates)].drop_duplicates("model_id")
    assert len(rows) == len(candidates) and set(rows.role) == {"merged"} and set(rows.method) == {"task_arithmetic"}


def _comparable(gen) -> dict:
    """A generation file's content but the pickled CMA-ES object's bytes (they hold its
    per-process hash keys; tests/test_search_cmaes.py checks what follows from them)."""
    d = gen.to_dict()
    d["state"] = {k: v for k, v in d["state"].items() if k != "es"}
    return d


def _validation(s: pd.DataFrame, mid: str, suites) -> dict:
    return {q: value(s, mid, q, "validation") for q in suites}


def test_the_generations_are_what_an_uninterrupted_search_proposes_from_validation_scores_only(search_run):
    work, plan = search_run["work"], search_run["plan"]
    s = _scores(work)
    results = _results(search_run)
    some_test_differs = False
    for sid, search in plan.searches.items():
        gens = load_all(work / search.dir)
        ids = {params_key(c["params"]): c["model_id"] for c in results[search.label]["candidates"]}
        suites = results[search.label]["objective"]["suites"]
        # what the strategy saw is each candidate's validation accuracy, read independently here
        for g in gens:
            for o in g.observations:
                mid = ids[params_key(o.params)]
                assert o.model_id == mid
                assert o.scores == pytest.approx(_validation(s, mid, suites), abs=1e-12), (search.label, mid)
                some_test_differs |= any(value(s, mid, q, "test") != o.scores[q] for q in suites)
        # the same strategy and seed, replayed in-process on those validation scores, writes the same files
        reference = {q: value(s, e, q, "validation") for q, e in search.reference.items()}
        strategy = plan.search_strategy(sid, reference)

        def evaluate(proposals):
            return [Observation(p.params, _validation(s, ids[params_key(p.params)], suites), ids[params_key(p.params)])
                    for p in proposals]

        replay_dir = work / "replay" / sid
        run_loop(strategy, evaluate, replay_dir)
        replayed = load_all(replay_dir)
        assert len(replayed) == len(gens)
        for a, b in zip(gens, replayed):
            assert _comparable(a) == _comparable(b), f"{search.label}: generation {a.generation} differs from the replay"
        # and the plan gives every proposal the id the run merged and evaluated
        for g in gens:
            assert plan.search_generation_ids(sid, g.generation) == [ids[params_key(p.params)] for p in g.proposals]
    assert some_test_differs, "validation and test scores coincide: this test could not tell them apart"


def test_map_front_points_lie_within_the_surrogates_error_and_cmaes_improves(search_run):
    work = search_run["work"]
    s = _scores(work)
    results = _results(search_run)
    m = results["map:task_arithmetic"]
    front = [c for c in m["candidates"] if c["info"].get("role") == "front"]
    fronts = [p for g in load_all(work / search_run["plan"].searches[m["id"]].dir) for p in g.proposals
              if p.info.get("role") == "front"]
    assert len(fronts) == 2 and front, fronts
    fits = m["result"]["fits"]
    for p in fronts:
        mid = next(c["model_id"] for c in m["candidates"] if params_key(c["params"]) == params_key(p.params))
        for q, predicted in p.info["predicted"].items():
            loo = fits[q]["loo_rmse"]
            assert loo is not None and loo > 0, (q, fits[q])
            measured = value(s, mid, q, "validation")
            assert abs(measured - predicted) <= 2 * loo, (q, measured, predicted, loo)
    c = results["cmaes:task_arithmetic"]["convergence"]
    assert [g["n"] for g in c] == [3, 3]
    assert c[1]["best"] > c[0]["best"], c


def test_the_leaderboard_lists_each_search_as_a_method_selected_on_validation(search_run):
    work = search_run["work"]
    sel = pd.read_parquet(work / "results/tables/selection.parquet")
    lb = pd.read_parquet(work / "results/tables/leaderboard.parquet")
    results = _results(search_run)
    for label in LABELS:
        row = sel[sel.sweep_label == label]
        assert len(row) == 1, (label, sel.sweep_label.tolist())
        ids = [c["model_id"] for c in results[label]["candidates"]]
        val = lb.set_index("model_id")["norm_val_mean"].reindex(ids).dropna()
        # the highest mean normalised validation score; ties to the smallest model id
        best = sorted(val.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        assert row.selected_model_id.iloc[0] == best, (label, row.selected_model_id.iloc[0], best)
    md = (work / "results/leaderboard.md").read_text()
    assert all(label in md for label in LABELS)
