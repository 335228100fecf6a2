"""Searches in the aggregation: a MAP, a CMA-ES and a CycleQD search over task arithmetic's
per-expert weights, run by the real search code (``make_search`` + ``run_loop`` on a synthetic validation
objective, ``result_doc`` + ``write_result``), their candidates evaluated as evaluation JSONs in the
format of the hand-made aggregate fixture (tests/data/aggregate/make_fixture.py), then the real
``mergesweep aggregate`` and ``mergesweep leaderboard`` commands.

Each search is one more method group of the leaderboard: selected on validation like every sweep,
ranked on test with the others; a merge only a search planned is no point of the grid's sweep, a
grid merge a search also proposed counts in both. Every expected number below is recomputed here
from the values written into the evaluation JSONs (``VALUES``) and the result.json files.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mergesweep.aggregate.leaderboard import compute_tables, convergence_table, map_fronts
from mergesweep.aggregate.markdown import render_markdown
from mergesweep.aggregate.outputs import output_paths
from mergesweep.aggregate.scores import read_scores
from mergesweep.aggregate.searches import no_searches, read_searches
from mergesweep.aggregate.views import fmt
from mergesweep.cli import main
from mergesweep.ids import merge_model_id
from mergesweep.record import ModelRecord
from mergesweep.search import make_search
from mergesweep.search.driver import run_loop
from mergesweep.search.observations import Observation
from mergesweep.search.results import read_result, result_doc, write_result
from mergesweep.search.state import load_all

# the evaluation-JSON format of the aggregate tests' fixture (results per split, stderr, n)
_FIXTURE = Path(__file__).parent / "data" / "aggregate" / "make_fixture.py"
_spec = importlib.util.spec_from_file_location("aggregate_fixture", _FIXTURE)
FX = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(FX)

BASE = "base-tiny"
EXPERTS = {"expert-arithmetic": "arithmetic", "expert-reverse": "reverse"}
EXPERT_IDS = list(EXPERTS)
SKILLS = ["arithmetic", "reverse"]
HELDOUT = "capitals"
SUITES = [*SKILLS, HELDOUT]
#: each expert on its own domain (validation, test): the normalisation references
REF = {"arithmetic": (0.80, 0.75), "reverse": (0.60, 0.55)}
SPACE = {"weight": {"per_expert": True, "low": 0.0, "high": 1.0}}
MAP_LABEL, CMA_LABEL, CQD_LABEL = "map:task_arithmetic", "cmaes:task_arithmetic", "cycleqd:task_arithmetic"
SEARCHES = {
    MAP_LABEL: ("map-0001", {"strategy": "map", "method": "task_arithmetic", "budget": 10, "seed": 3, "n_front": 2,
                             "pop_size": 20, "n_gen": 25, "params": SPACE, "objective": {"suites": SKILLS}}),
    CMA_LABEL: ("cmaes-0002", {"strategy": "cmaes", "method": "task_arithmetic", "budget": 12, "seed": 1,
                               "population": 4, "params": SPACE, "objective": {"suites": SKILLS}}),
    # starts from the corners (each expert alone): MAP's first design points, one of them a grid point
    CQD_LABEL: ("cycleqd-0003", {"strategy": "cycleqd", "method": "task_arithmetic", "budget": 8, "seed": 2,
                                 "population": 4, "bins": 3, "params": SPACE, "objective": {"suites": SKILLS}}),
}
#: the config's task arithmetic grid; its first point is also MAP's first design point (expert 1 alone)
GRID = [{"weight": [1.0, 0.0]}, {"weight": [0.5, 0.5]}, {"weight": [1.0, 1.0]}]
TIES_PARAMS = {"density": 0.5, "lambda": 1.0}
TIES = merge_model_id("ties", TIES_PARAMS, BASE, EXPERT_IDS)

#: (model, suite) -> (validation, test) as written into the evaluation JSONs
VALUES: dict[tuple[str, str], tuple[float, float]] = {}


def ta_id(params: dict) -> str:
    """A task-arithmetic merge's model id, as the plan derives it from its parameters."""
    return merge_model_id("task_arithmetic", params, BASE, EXPERT_IDS, per_expert={"weight"})


def pct(v: float) -> float:
    """A score on a grid of 1/100, within [0, 1] (exact in JSON and in the fixture's rounding)."""
    return round(min(max(v, 0.0), 1.0) * 100) / 100


def val_scores(w) -> dict[str, float]:
    """The synthetic validation scores of task arithmetic with weights ``w`` (two skills)."""
    w1, w2 = (float(v) for v in w)
    return {"arithmetic": pct(0.15 + 0.75 * w1 - 0.35 * w1**2 - 0.2 * w2 + 0.1 * w1 * w2),
            "reverse": pct(0.05 + 0.6 * w2 - 0.25 * w2**2 - 0.15 * w1 + 0.05 * w1 * w2)}


def scores_on_test(model: str, val: dict[str, float]) -> dict[str, float]:
    """Test scores: the validation scores shifted by a model-dependent amount (so the test ranking
    is not the validation one)."""
    h = int(hashlib.sha256(model.encode()).hexdigest()[:8], 16)
    return {q: pct(v + ((h >> (5 * i)) % 21 - 10) / 100) for i, (q, v) in enumerate(val.items())}


def eval_doc(rec: ModelRecord, suite: str, vt: tuple[float, float]) -> dict:
    """One evaluation JSON exactly as the aggregate fixture writes it (make_fixture.write)."""
    VALUES[(rec.model_id, suite)] = vt
    return {"model_id": rec.model_id, "suite": suite, "status": "ok", "error": None, "model": rec.to_dict(),
            "results": FX.results(suite, vt), "task_versions": {f"ms_{suite}_{s}": 1.0 for s in FX.N},
            "num_fewshot": {f"ms_{suite}_{s}": 0 for s in FX.N}, "chat_template": False,
            "model_path": f"results/models/{rec.model_id}", "log_samples": False, "versions": FX.VERSIONS,
            "runtime_s": 3.0, "peak_rss_mb": 500.0, "device": "cpu"}


def write_evals(evals: Path, rec: ModelRecord, vals: dict[str, tuple[float, float]]) -> None:
    for suite, vt in vals.items():
        p = evals / rec.model_id / f"{suite}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(eval_doc(rec, suite, vt), indent=2, sort_keys=True) + "\n")


PROPOSED: dict[str, list[list[str]]] = {}  # search label -> the model id of each proposal, per generation


def run_search(label: str, root: Path) -> dict:
    """Run one search to its end on the synthetic objective and write its result.json."""
    sid, entry = SEARCHES[label]
    s = make_search(entry, experts=EXPERT_IDS, suites=SUITES, reference={q: REF[q][0] for q in SKILLS})
    directory = root / "search" / sid

    def evaluate(proposals):
        return [Observation(p.params, val_scores(p.params["weight"]), ta_id(p.params)) for p in proposals]

    run_loop(s, evaluate, directory)
    gens = load_all(directory)
    ids = [[ta_id(p.params) for p in g.proposals] for g in gens]
    PROPOSED[label] = ids
    doc = result_doc(s, gens, ids, label=label, search_id=sid, method="task_arithmetic", experts=EXPERT_IDS)
    write_result(directory / "result.json", doc)
    return read_result(directory / "result.json")


def merged_record(mid: str, method: str, params: dict) -> ModelRecord:
    return ModelRecord(model_id=mid, role="merged", stage="merge", uid=mid, method=method, params=params, base=BASE,
                       experts=EXPERT_IDS, fingerprint="m" + mid[-10:], runtime_s=5.0, peak_rss_mb=900.0,
                       extra={"align": None})


def write_tree(root: Path) -> dict:
    """``root/evals``, ``root/search/<id>/result.json`` and ``root/evaluation_models.json`` (with
    the searches, result paths relative to ``root``)."""
    evals = root / "evals"
    write_evals(evals, ModelRecord(model_id=BASE, role="base", stage="pretrain", uid=f"{BASE}@1", fingerprint="b" * 12),
                {"arithmetic": (0.10, 0.10), "reverse": (0.05, 0.05), HELDOUT: (0.55, 0.50)})
    for name, d in EXPERTS.items():
        other = next(q for q in SKILLS if q != d)
        write_evals(evals, ModelRecord(model_id=name, role="expert", stage="finetune", uid=f"{name}@1", domain=d,
                                       base=BASE, fingerprint=name[-6:] * 2),
                    {d: REF[d], other: (0.05, 0.05), HELDOUT: (0.50, 0.45)})
    grid = [ta_id(p) for p in GRID]
    merges = {m: ("task_arithmetic", p) for m, p in zip(grid, GRID)}
    docs = {label: run_search(label, root) for label in SEARCHES}
    for doc in docs.values():
        for c in doc["candidates"]:
            merges.setdefault(c["model_id"], ("task_arithmetic", c["params"]))
    for mid, (method, params) in merges.items():
        val = val_scores(params["weight"])
        test = scores_on_test(mid, val)
        write_evals(evals, merged_record(mid, method, params),
                    {**{q: (val[q], test[q]) for q in SKILLS}, HELDOUT: (0.50, 0.45)})
    write_evals(evals, merged_record(TIES, "ties", TIES_PARAMS),
                {"arithmetic": (0.50, 0.50), "reverse": (0.30, 0.35), HELDOUT: (0.50, 0.45)})
    models = [BASE, *EXPERT_IDS, *grid, TIES, *[m for m in merges if m not in grid]]
    only = [m for m in merges if m not in grid]
    listed = {"models": models, "suites": SUITES,
              "searches": [{"label": label, "id": SEARCHES[label][0],
                            "result": f"search/{SEARCHES[label][0]}/result.json"} for label in SEARCHES],
              "search_only": only}
    (root / "evaluation_models.json").write_text(json.dumps(listed, indent=2))
    return {"root": root, "docs": docs, "grid": grid, "only": only, "listed": listed}


def aggregate(root: Path, out: Path, models: Path | None = None) -> int:
    """``mergesweep aggregate --evals-dir evals --models evaluation_models.json`` run in ``root``
    (result paths are relative to the working directory)."""
    with contextlib.chdir(root):
        return main(["aggregate", "--evals-dir", "evals", "--models", str(models or "evaluation_models.json"),
                     "--out", str(out)])


def leaderboard(scores: Path, out_dir: Path) -> int:
    """``mergesweep leaderboard`` from a directory holding nothing else (no search results)."""
    with contextlib.chdir(out_dir):
        return main(["leaderboard", "--scores", str(scores), "--out-dir", str(out_dir)])


def tables_only(scores: Path):
    """What ``mergesweep leaderboard`` computes from ``scores`` (its tables and leaderboard.md),
    without rendering the figures (the slow part; the tests that read only selections and ranks)."""
    df, provenance = read_scores(scores)
    tables = compute_tables(df, None, read_searches(scores))
    return tables, render_markdown(tables, provenance)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("searches"))


@pytest.fixture(scope="module")
def run(tree, tmp_path_factory):
    """aggregate into the tree; leaderboard in a fresh directory holding only a copy of
    scores.parquet (no evaluation JSONs, no results/search/)."""
    first = tree["root"] / "tables" / "scores.parquet"
    assert aggregate(tree["root"], first) == 0
    out = tmp_path_factory.mktemp("results")
    scores = out / "tables" / "scores.parquet"
    scores.parent.mkdir()
    shutil.copy(first, scores)
    assert leaderboard(scores, out) == 0
    return out


def norm_mean(model: str, split: int) -> float:
    """Mean normalised score over the two skills from the JSON values (split 0: validation, 1: test)."""
    return sum(VALUES[(model, q)][split] / REF[q][split] for q in SKILLS) / len(SKILLS)


def best_on_validation(models) -> str:
    """Highest mean normalised validation score, ties to the smallest model id."""
    return sorted(models, key=lambda m: (-norm_mean(m, 0), m))[0]


def group_rows(out: Path) -> dict[str, dict]:
    sel = pd.read_parquet(out / "tables" / "selection.parquet")
    return {r["sweep_label"]: r for r in sel.to_dict("records")}


def candidates(doc: dict) -> list[str]:
    return [c["model_id"] for c in doc["candidates"]]


# ------------------------------------------------------------------------------------------------


def first_search(model: str, tree) -> str:
    """The label of the first search (in the models list's order) that proposed ``model``."""
    return next(label for label in SEARCHES if model in candidates(tree["docs"][label]))


def test_the_fixture_has_a_shared_and_search_only_candidates(tree):
    shared = ta_id(GRID[0])
    # MAP's design and CycleQD's first generation start with each expert alone
    assert shared in candidates(tree["docs"][MAP_LABEL]) and shared in candidates(tree["docs"][CQD_LABEL])
    assert shared not in tree["only"] and len(tree["only"]) >= 20
    other_corner = ta_id({"weight": [0.0, 1.0]})  # only searches proposed it: two of them
    assert other_corner in tree["only"] and first_search(other_corner, tree) == MAP_LABEL
    assert other_corner in candidates(tree["docs"][CQD_LABEL])


def test_each_search_selects_its_best_validation_candidate(tree, run):
    groups = group_rows(run)
    assert set(groups) == {"task_arithmetic", "ties", *SEARCHES}
    for label, doc in tree["docs"].items():
        g = groups[label]
        ids = candidates(doc)
        assert g["search"] == label and g["method"] == "task_arithmetic" and g["method_label"] == label
        assert g["n_points"] == len(ids) == g["n_eligible"]
        assert g["selected_model_id"] == best_on_validation(ids)
        assert g["val_norm_mean"] == pytest.approx(norm_mean(g["selected_model_id"], 0), abs=1e-12)
        assert g["test_norm_mean"] == pytest.approx(norm_mean(g["selected_model_id"], 1), abs=1e-12)
        # the search's own objective (normalised by the experts' validation scores) is that mean too
        by_id = {c["model_id"]: c["objective"] for c in doc["candidates"]}
        assert by_id[g["selected_model_id"]] == pytest.approx(g["val_norm_mean"], abs=1e-12)
    # every group's selected point ranked on test together ("1224" ranks)
    chosen = {label: g["selected_model_id"] for label, g in groups.items()}
    assert chosen["task_arithmetic"] == best_on_validation(tree["grid"]) and chosen["ties"] == TIES
    tests = {label: norm_mean(m, 1) for label, m in chosen.items()}
    for label, g in groups.items():
        assert g["rank"] == 1 + sum(v > tests[label] + 1e-12 for v in tests.values()), label


def test_search_only_candidates_are_not_grid_points(tree, run):
    groups = group_rows(run)
    assert groups["task_arithmetic"]["n_points"] == len(GRID) and pd.isna(groups["task_arithmetic"]["search"])
    lb = pd.read_parquet(run / "tables" / "leaderboard.parquet")
    assert lb["model_id"].is_unique
    assert set(lb["model_id"]) == {*tree["grid"], TIES, *tree["only"]}
    rows = lb.set_index("model_id")
    for m in tree["grid"]:
        assert rows.at[m, "method_label"] == "task_arithmetic" and rows.at[m, "n_points"] == len(GRID)
    for m in tree["only"]:  # labelled by the first search that proposed it, with its points
        label = first_search(m, tree)
        assert rows.at[m, "method_label"] == rows.at[m, "sweep_label"] == label
        assert rows.at[m, "n_points"] == len(candidates(tree["docs"][label]))
        assert json.loads(rows.at[m, "searches"]) == [x for x in SEARCHES if m in candidates(tree["docs"][x])]
    # a grid merge two searches proposed too stays its grid row, and knows it is their candidate
    shared = ta_id(GRID[0])
    assert json.loads(rows.at[shared, "searches"]) == [MAP_LABEL, CQD_LABEL]
    assert rows.at[shared, "sweep_label"] == "task_arithmetic"
    # selected = selected by any group
    chosen = {g["selected_model_id"] for g in group_rows(run).values()}
    assert set(lb.loc[lb["selected"], "model_id"]) == chosen


def test_a_shared_candidate_counts_in_both_groups(tree, tmp_path):
    # the grid merge MAP and CycleQD also proposed becomes the best on validation: all three select it
    root = tmp_path / "run"
    shutil.copytree(tree["root"], root)
    shared = ta_id(GRID[0])
    for q in SKILLS:
        p = root / "evals" / shared / f"{q}.json"
        doc = json.loads(p.read_text())
        for r in doc["results"]:
            if r["split"] == "validation":
                r["value"], r["stderr"] = 1.0, 0.0
        p.write_text(json.dumps(doc))
    scores = root / "tables" / "scores.parquet"
    assert aggregate(root, scores) == 0
    tables, md = tables_only(scores)
    groups = {r["sweep_label"]: r for r in tables.selection.to_dict("records")}
    owners = ["task_arithmetic", MAP_LABEL, CQD_LABEL]
    assert [groups[k]["selected_model_id"] for k in owners] == [shared] * 3
    assert groups[CMA_LABEL]["selected_model_id"] != shared
    assert len({groups[k]["rank"] for k in owners}) == 1  # one model, one test score, one rank
    assert groups[MAP_LABEL]["n_points"] == len(candidates(tree["docs"][MAP_LABEL]))
    assert groups["task_arithmetic"]["n_points"] == len(GRID)
    lb = tables.leaderboard
    assert (lb["model_id"] == shared).sum() == 1 and bool(lb.loc[lb["model_id"] == shared, "selected"].iloc[0])
    # the ranked table shows it once per group
    ranked = md.split("## Leaderboard", 1)[1].split("\n## ", 1)[0]
    labels = sorted(line.split(" | ")[1] for line in ranked.splitlines() if f"| {shared} |" in line)
    assert labels == sorted(owners)


def test_test_scores_change_no_selection(tree, run, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(tree["root"], root)
    before = group_rows(run)
    # reverse every search candidate's and grid merge's test ranking
    for m in {*tree["only"], *tree["grid"]}:
        for q in SKILLS:
            p = root / "evals" / m / f"{q}.json"
            doc = json.loads(p.read_text())
            for r in doc["results"]:
                if r["split"] == "test":
                    r["value"] = pct(1.0 - r["value"])
            p.write_text(json.dumps(doc))
    scores = root / "tables" / "scores.parquet"
    assert aggregate(root, scores) == 0
    after = {r["sweep_label"]: r for r in tables_only(scores)[0].selection.to_dict("records")}
    chosen = {k: g["selected_model_id"] for k, g in before.items()}
    assert {k: g["selected_model_id"] for k, g in after.items()} == chosen
    assert any(after[k]["test_norm_mean"] != before[k]["test_norm_mean"] for k in before)


def test_the_searches_travel_inside_scores_parquet(tree, run):
    embedded = read_searches(run / "tables" / "scores.parquet")
    assert embedded["search_only"] == tree["listed"]["search_only"]
    assert [s["label"] for s in embedded["searches"]] == list(SEARCHES)
    for s in embedded["searches"]:
        doc = tree["docs"][s["label"]]
        assert (s["id"], s["strategy"], s["method"], s["experts"], s["budget"]) == (
            doc["id"], doc["strategy"], "task_arithmetic", EXPERT_IDS, doc["budget"])
        assert [c["model_id"] for c in s["candidates"]] == candidates(doc)
        assert [c["objective"] for c in s["candidates"]] == [c["objective"] for c in doc["candidates"]]
        assert all("scores" not in c and "params" not in c for c in s["candidates"])  # small, validation only
        assert s["convergence"] == doc["convergence"]
    map_s = embedded["searches"][0]
    assert map_s["front"]["summary"] == doc_summary(tree["docs"][MAP_LABEL])
    assert len(map_s["front"]["predicted"]) == len(tree["docs"][MAP_LABEL]["result"]["predicted_front"])
    assert embedded["searches"][1]["front"] is None and embedded["searches"][2]["front"] is None


def doc_summary(doc: dict) -> dict:
    return {q: {k: v[k] for k in ("n", "rmse", "max_abs_error", "loo_rmse", "within_2_loo")}
            for q, v in doc["result"]["report"]["summary"].items()}


def test_convergence_equals_the_result_files(tree, run):
    scores = run / "tables" / "scores.parquet"
    t = compute_tables(read_scores(scores)[0], None, read_searches(scores))
    conv = convergence_table(t)
    for label, doc in tree["docs"].items():
        mine = conv[conv["search"] == label]
        assert list(mine["generation"]) == [g["generation"] for g in doc["convergence"]]
        assert list(mine["best"]) == [g["best"] for g in doc["convergence"]]
        assert list(mine["best_so_far"]) == [g["best_so_far"] for g in doc["convergence"]]
        # and the result file's values are the proposals' validation objective, from the JSONs
        running = -np.inf
        for g in doc["convergence"]:
            gen = PROPOSED[label][g["generation"]]
            assert g["n"] == len(gen)
            best = max(norm_mean(m, 0) for m in gen)
            running = max(running, best)
            assert g["best"] == pytest.approx(best, abs=1e-12) and g["best_so_far"] == pytest.approx(running, abs=1e-12)
    assert len(conv[conv["search"] == MAP_LABEL]) == 2 and len(conv[conv["search"] == CMA_LABEL]) == 3


def test_map_fronts_on_raw_validation_scores(tree, run):
    scores = run / "tables" / "scores.parquet"
    t = compute_tables(read_scores(scores)[0], None, read_searches(scores))
    (panel,) = map_fronts(t)
    doc = tree["docs"][MAP_LABEL]
    assert (panel["search"], panel["x"], panel["y"]) == (MAP_LABEL, "arithmetic", "reverse")
    front = [c["model_id"] for c in doc["candidates"] if c["info"]["role"] == "front"]
    assert panel["measured"]["model_id"] == front and len(front) >= 1
    assert list(panel["measured"]["x"]) == [VALUES[(m, "arithmetic")][0] for m in front]
    assert list(panel["measured"]["y"]) == [VALUES[(m, "reverse")][0] for m in front]
    assert panel["predicted"] == [(p["predicted"]["arithmetic"], p["predicted"]["reverse"])
                                  for p in doc["result"]["predicted_front"]]
    # the grid's front: the grid merges of the same method and experts, not dominated
    assert sorted(panel["grid"]["model_id"]) == sorted(tree["grid"])
    pts = {m: (VALUES[(m, "arithmetic")][0], VALUES[(m, "reverse")][0]) for m in tree["grid"]}
    expected = {m for m, (x, y) in pts.items()
                if not any(a >= x and b >= y and (a, b) != (x, y) for a, b in pts.values())}
    got = {m for m, f in zip(panel["grid"]["model_id"], panel["grid"]["on_front"]) if f}
    assert got == expected and got


def md_rows(md: str, title: str) -> list[list[str]]:
    """The body rows of the first markdown table after the heading ``title``."""
    lines = md.split(title + "\n", 1)[1].splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("|"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[i:]))
    return [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in table[2:]]


def test_markdown_and_report_show_the_searches(tree, run):
    md = (run / "leaderboard.md").read_text()
    groups = group_rows(run)
    rows = {r[0]: r for r in md_rows(md, "## Searches")}
    assert set(rows) == set(SEARCHES)
    for label, doc in tree["docs"].items():
        g = groups[label]
        want = [label, {"map": "MAP (quadratic surrogates, Pareto front)", "cmaes": "CMA-ES",
                        "cycleqd": "CycleQD"}[doc["strategy"]],
                "task_arithmetic", str(doc["budget"]), str(len(doc["candidates"])), str(len(doc["convergence"])),
                fmt(max(c["objective"] for c in doc["candidates"])), g["selected_model_id"],
                fmt(norm_mean(g["selected_model_id"], 0))]
        assert rows[label][:9] == want
        assert rows[label][9].startswith(fmt(norm_mean(g["selected_model_id"], 1)) + " ± ")
        assert rows[label][10] == str(g["rank"])
    conv = md_rows(md, "### Search convergence (validation objective)")
    assert conv == [[label, str(c["generation"]), str(c["n"]), fmt(c["best"]), fmt(c["best_so_far"])]
                    for label, doc in tree["docs"].items() for c in doc["convergence"]]
    pvm = md_rows(md, "### MAP: predicted vs measured front points (validation)")
    summary = tree["docs"][MAP_LABEL]["result"]["report"]["summary"]
    assert pvm == [[MAP_LABEL, q, str(s["n"]), fmt(s["rmse"], 4), fmt(s["max_abs_error"], 4), fmt(s["loo_rmse"], 4),
                    f"{s['within_2_loo']} of {s['n']}" if s["within_2_loo"] is not None else "–"]
                   for q, s in summary.items()]
    # every group in the selection table, the searches among them
    sel = {r[0] for r in md_rows(md, "## Selection per method")}
    assert sel == {"task_arithmetic", "ties", *SEARCHES}
    html = (run / "report" / "report.html").read_text()
    assert 'id="searches"' in html and 'id="fig-search_convergence"' in html and 'id="fig-search_fronts"' in html
    for label, g in groups.items():
        if label in SEARCHES:
            assert f">{label}<" in html and f">{g['selected_model_id']}<" in html
    paths = output_paths(run, searches=True)
    assert {"fig_search_convergence", "fig_search_fronts"} <= set(paths)
    for p in paths.values():
        assert p.is_file() and p.stat().st_size > 0, p
    assert paths["fig_search_fronts"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_the_searches_keys_there_are_no_search_groups(tree, tmp_path):
    listed = dict(tree["listed"])
    del listed["searches"], listed["search_only"]
    models = tmp_path / "evaluation_models.json"
    models.write_text(json.dumps(listed))
    scores = tmp_path / "scores.parquet"
    assert aggregate(tree["root"], scores, models) == 0
    assert read_searches(scores) == no_searches()
    out = tmp_path / "out"
    out.mkdir()
    assert leaderboard(scores, out) == 0
    sel = pd.read_parquet(out / "tables" / "selection.parquet")
    assert "search" not in sel.columns and set(sel["sweep_label"]) == {"task_arithmetic", "ties"}
    # the candidates are then plain points of task arithmetic's sweep
    assert int(sel.loc[sel["method"] == "task_arithmetic", "n_points"].iloc[0]) == len(tree["grid"]) + len(tree["only"])
    assert not (out / "report" / "search_convergence.png").exists()
    assert "## Searches" not in (out / "leaderboard.md").read_text()


def _edit(listed: dict, change) -> dict:
    listed = json.loads(json.dumps(listed))
    change(listed)
    return listed


BAD = {
    "missing result file": (lambda d: d["searches"][0].update(result="search/nowhere/result.json"),
                            "searches[0].result", "nowhere/result.json"),
    "search_only id not in models": (lambda d: d["search_only"].append("task-arithmetic-ffffffffff"),
                                     "search_only[", "task-arithmetic-ffffffffff"),
    "searches not a list": (lambda d: d.update(searches=d["searches"][0]), "'searches'", "must be a list"),
    "entry without id": (lambda d: d["searches"][1].pop("id"), "searches[1].id", "non-empty string"),
    "candidate not listed": (lambda d: (d["models"].remove(d["search_only"][0]), d["search_only"].pop(0)),
                             "searches[", "does not list"),
    "search_only not a list": (lambda d: d.update(search_only="x"), "'search_only'", "must be a list"),
    "label twice": (lambda d: d["searches"][1].update(label=MAP_LABEL), "searches[1].label", "repeats"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_searches_are_refused_naming_file_and_key(tree, tmp_path, capsys, case):
    change, key, detail = BAD[case]
    models = tmp_path / "evaluation_models.json"
    models.write_text(json.dumps(_edit(tree["listed"], change)))
    out = tmp_path / "scores.parquet"
    assert aggregate(tree["root"], out, models) == 1
    err = capsys.readouterr().err
    assert str(models) in err and key in err and detail in err, err
    assert not out.exists()
    # an existing table is left as it was
    good = tmp_path / "good.json"
    good.write_text(json.dumps(tree["listed"]))
    assert aggregate(tree["root"], out, good) == 0
    before = out.read_bytes()
    assert aggregate(tree["root"], out, models) == 1
    assert out.read_bytes() == before


def test_an_unreadable_result_file_is_refused(tree, tmp_path, capsys):
    bad = tmp_path / "result.json"
    bad.write_text("{not json")
    listed = _edit(tree["listed"], lambda d: d["searches"][0].update(result=str(bad)))
    models = tmp_path / "evaluation_models.json"
    models.write_text(json.dumps(listed))
    out = tmp_path / "scores.parquet"
    assert aggregate(tree["root"], out, models) == 1
    err = capsys.readouterr().err
    assert str(models) in err and "searches[0].result" in err and str(bad) in err
    assert not out.exists()


def test_a_corrupt_embedded_searches_document_is_refused(run, tmp_path, capsys):
    import pyarrow.parquet as pq

    from mergesweep.aggregate.scores import SEARCHES_KEY

    table = pq.read_table(run / "tables" / "scores.parquet")
    bad = tmp_path / "tables" / "scores.parquet"
    bad.parent.mkdir()
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, SEARCHES_KEY: b'{"format": 1}'}), bad)
    assert leaderboard(bad, tmp_path) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "mergesweep.searches" in err and "'searches'" in err, err
    assert not (tmp_path / "leaderboard.md").exists() and not (tmp_path / "tables" / "selection.parquet").exists()
