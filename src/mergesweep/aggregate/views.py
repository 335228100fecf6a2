"""Presentation-ready views of the tables, shared by the markdown leaderboard and the HTML report:
column headers and formatted cells, computed once so both say the same thing."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mergesweep.aggregate.analysis import SEARCH_RULE, SELECTION_RULE
from mergesweep.aggregate.leaderboard import (
    Tables, best_objective, col, convergence_table, params_label, ranked_points, search_selection,
)
from mergesweep.record import ROLES

REVERSIBLE_DEFINITION = "Reversible merge (RMM)"
DEFINITIONS = [
    ("Suite score",
     "s(m, q) = mean over the suite's tasks of the primary metric (macro average); "
     "se = sqrt(sum se_t²) / T."),
    ("Normalised score",
     "norm(m, d) = s(m, d) / s(E_d, d), where E_d is the expert trained for domain d, on the same "
     "split; se by the delta method: sqrt((se_m / s_E)² + (s_m · se_E / s_E²)²)."),
    ("Mean normalised score",
     "mean over the domains of the merge's experts; missing if any of them is missing "
     "(never averaged over fewer domains); se = sqrt(sum se_d²) / D."),
    ("Held-out change",
     "Δ(m, h) = s(m, h) − s(base, h) on a held-out suite h, in absolute score points; negative = "
     "forgetting, positive = generalisation; se = sqrt(se_m² + se_base²)."),
    (REVERSIBLE_DEFINITION,
     "a merge stored as a basis plus per-task coefficients, from which each task's model is "
     "reverted (reconstructed) and evaluated on that task's domain only; reverted ÷ expert = "
     "s(reverted, d) / s(E_d, d) against the very expert it reverts, se by the delta method as for "
     "the normalised score. The reversible merge itself is not a model and is not evaluated."),
    ("Selection", SELECTION_RULE),
    ("Pareto front",
     "for a pair of domains, the merges that no other merge dominates (is at least as good on both "
     "domains' normalised scores and strictly better on one); taken over every merge of the run, "
     "all methods and hyperparameter points; descriptive only, never used for selection."),
]


def fmt(x, digits: int = 3, signed: bool = False) -> str:
    """A number for a table; an en dash for missing."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)) or x is pd.NA:
        return "–"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(v):
        return "–"
    s = f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
    return s.replace("-", "−")


def fmt_seconds(x) -> str:
    if x is None or not np.isfinite(float(x)):
        return "–"
    x = float(x)
    return f"{x:.1f} s" if x < 120 else f"{x / 60:.1f} min"


def fmt_mb(x) -> str:
    if x is None or not np.isfinite(float(x)):
        return "–"
    x = float(x)
    return f"{x:.0f} MB" if x < 10240 else f"{x / 1024:.1f} GB"


@dataclass
class Cell:
    """One table cell: ``text`` and, for estimates, its standard error ``se`` (shown as ± se)."""

    text: str
    best: bool = False
    error: bool = False
    numeric: bool = True
    se: str = ""

    @property
    def full(self) -> str:
        return f"{self.text} ± {self.se}" if self.se else self.text


@dataclass
class View:
    """A table: headers, rows of :class:`Cell`, a note; optionally a group per row (the report
    shows one group at a time, chosen from ``groups``: ``(key, label)`` pairs)."""

    title: str
    headers: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    note: str = ""
    row_groups: list[str] = field(default_factory=list)
    groups: list[tuple[str, str]] = field(default_factory=list)
    source: str = ""  # where the full table is (a report shows a long table page by page)
    group_column: int | None = None  # the column naming the group (hidden while one group is shown)


def _failed(r) -> set[str]:
    f = r.get("failed_suites")
    return set(f.split(",")) if isinstance(f, str) and f else set()


def _score_cell(r, c: str, suite: str | None, best: float | None, signed=False, with_se=True) -> Cell:
    v = r.get(c)
    text = fmt(v, signed=signed)
    se = fmt(r.get(c + "_stderr")) if with_se and text != "–" else ""
    failed = _failed(r)
    if text == "–" and (suite in failed or (suite == "mean" and failed)):
        return Cell("error", error=True)
    is_best = best is not None and v is not None and np.isfinite(float(v)) and math.isclose(float(v), best, abs_tol=1e-12)
    return Cell(text, best=is_best, se="" if se == "–" else se)


def leaderboard_views(t: Tables) -> list[View]:
    """The ranked table(s): one row per method (its selected point), test split, by rank; one
    table per merge task (base + expert set)."""
    lb = t.leaderboard
    sel = ranked_points(t)
    views = []
    by_selected = t.selection.dropna(subset=["selected_model_id"]).set_index("selected_model_id")
    tasks = list(dict.fromkeys(lb["experts"].fillna("[]"))) if len(lb) else []
    for experts in tasks or ["[]"]:
        s = sel[sel["experts"].fillna("[]") == experts]
        names = json.loads(experts)
        title = "Leaderboard" if len(tasks) <= 1 else f"Leaderboard: merges of {', '.join(names)}"
        doms = [d for d in t.skills if any(d in json.loads(x) for x in s["domains"])] or t.skills
        headers = ["#", "Method", "Selected hyperparameters"] + [f"{d} (norm.)" for d in doms] + ["Mean (norm.)"]
        headers += [f"{h} ({t.metrics.get(h, '?')})" for h in t.heldout] + [f"Δ {h} vs base" for h in t.heldout]
        headers += ["Val. mean (norm.)", "Points", "Model id"]
        v = View(title, headers)
        bests = {c: s[c].max() for c in s.columns if c.startswith(("norm_", "abs_", "delta_")) and not c.endswith("_stderr")}
        for _, r in s.iterrows():
            row = [Cell(str(r["rank"]) if pd.notna(r["rank"]) else "–"), Cell(str(r["method_label"]), numeric=False),
                   Cell(params_label(r["params"]) or "(defaults)", numeric=False)]
            row += [_score_cell(r, col("norm", "test", d), d, bests.get(col("norm", "test", d))) for d in doms]
            row.append(_score_cell(r, col("norm", "test", "mean"), "mean", bests.get(col("norm", "test", "mean"))))
            row += _heldout_and_selection_cells(t, r, bests, by_selected)
            v.rows.append(row)
        unselected = t.selection[t.selection["selected_model_id"].isna()
                                 & (t.selection["experts"].fillna("[]") == experts)]
        if len(unselected):
            v.note = "No point could be selected for: " + ", ".join(
                f"{m} ({n})" for m, n in zip(unselected["sweep_label"], unselected["note"]))
        views.append(v)
    return views


def _expert_set_label(experts: str, t: Tables, domains: dict[str, str]) -> str:
    names = json.loads(experts) if isinstance(experts, str) else []
    return "+".join(domains.get(e, e) for e in names) or "(no experts)"


def leaderboard_view(t: Tables) -> View:
    """The ranked table as one view: each merge task's (expert set's) selected points by rank,
    the task as a row group (the report shows one at a time: the largest set first)."""
    sel = ranked_points(t)
    domains = t.references.dropna(subset=["domain"]).set_index("model_id")["domain"].to_dict()
    tasks = list(dict.fromkeys(sel["experts"].fillna("[]"))) if len(sel) else []
    tasks.sort(key=lambda e: (-len(json.loads(e)), _expert_set_label(e, t, domains)))
    multi = len(tasks) > 1
    headers = ["#", "Method"] + (["Expert set"] if multi else []) + ["Selected hyperparameters"]
    headers += [f"{d} (norm.)" for d in t.skills] + ["Mean (norm.)"]
    headers += [f"{h} ({t.metrics.get(h, '?')})" for h in t.heldout] + [f"Δ {h} vs base" for h in t.heldout]
    headers += ["Val. mean (norm.)", "Points", "Model id"]
    v = View("Leaderboard", headers, group_column=2 if multi else None)
    by_selected = t.selection.dropna(subset=["selected_model_id"]).set_index("selected_model_id")
    notes = []
    for experts in tasks:
        s = sel[sel["experts"].fillna("[]") == experts]
        label = _expert_set_label(experts, t, domains)
        v.groups.append((experts, f"{label} ({len(s)} methods)"))
        bests = {c: s[c].max() for c in s.columns
                 if c.startswith(("norm_", "abs_", "delta_")) and not c.endswith("_stderr")}
        for r in s.to_dict("records"):
            own = set(json.loads(r["domains"])) if isinstance(r["domains"], str) else set()
            row = [Cell(str(r["rank"]) if pd.notna(r["rank"]) else "–"), Cell(str(r["method_label"]), numeric=False)]
            if multi:
                row.append(Cell(label, numeric=False))
            row.append(Cell(params_label(r["params"]) or "(defaults)", numeric=False))
            for d in t.skills:
                c = col("norm", "test", d)
                row.append(_score_cell(r, c, d, bests.get(c)) if d in own or not multi else Cell("·"))
            row.append(_score_cell(r, col("norm", "test", "mean"), "mean", bests.get(col("norm", "test", "mean"))))
            row += _heldout_and_selection_cells(t, r, bests, by_selected)
            v.rows.append(row)
            v.row_groups.append(experts)
    unselected = t.selection[t.selection["selected_model_id"].isna()]
    if len(unselected):
        notes.append("No point could be selected for: " + ", ".join(
            f"{m} ({n})" for m, n in zip(unselected["sweep_label"], unselected["note"])))
    v.note = " ".join(notes)
    return v


def all_models_view(t: Tables) -> View:
    """Every merged model, every domain, both splits: the full sweep."""
    lb = t.leaderboard.sort_values(["sweep_label", "params", "model_id"], kind="stable")
    headers = ["Model id", "Method", "Hyperparameters", "Selected"]
    headers += [f"{d} val / test" for d in t.skills] + ["Mean val / test"]
    headers += [f"Δ {h} test" for h in t.heldout] + ["Status"]
    v = View(f"All merged models ({len(lb)})", headers, source="tables/leaderboard.parquet")
    for r in lb.to_dict("records"):
        label = str(r["sweep_label"])
        also = [x for x in json.loads(r["searches"]) if x != label] if isinstance(r.get("searches"), str) else []
        if also:  # a grid merge that a search proposed too
            label += " (also " + ", ".join(also) + ")"
        row = [Cell(str(r["model_id"]), numeric=False), Cell(label, numeric=False),
               Cell(params_label(r["params"]) or "(defaults)", numeric=False),
               Cell("✓" if r["selected"] else "", numeric=False)]
        failed = _failed(r)
        for d in [*t.skills, "mean"]:
            a, b = fmt(r.get(col("norm", "validation", d))), fmt(r.get(col("norm", "test", d)))
            err = (d in failed) or (d == "mean" and bool(failed) and a == "–")
            row.append(Cell("error" if err and a == "–" and b == "–" else f"{a} / {b}", error=err))
        row += [Cell(fmt(r.get(col("delta", "test", h)), signed=True)) for h in t.heldout]
        status = "ok" if r["status"] == "ok" else f"failed: {r['failed_suites']}"
        row.append(Cell(status, error=r["status"] != "ok", numeric=False))
        v.rows.append(row)
    return v


def references_view(t: Tables) -> View:
    """Base and experts: absolute test scores on every suite (primary metric)."""
    suites = [*t.skills, *t.heldout]
    headers = ["Model id", "Role", "Domain"] + [f"{q} ({t.metrics.get(q, '?')})" for q in suites]
    v = View("Reference models (absolute test scores)", headers)
    for _, r in t.references.iterrows():
        row = [Cell(str(r["model_id"]), numeric=False), Cell(str(r["role"]), numeric=False),
               Cell(str(r["domain"]) if isinstance(r["domain"], str) else "–", numeric=False)]
        row += [_score_cell(r, col("abs", "test", q), q, None) for q in suites]
        v.rows.append(row)
    return v


REVERSIBLE_TITLE = "Reversible merges (RMM): each task reverted from the merged basis, against its expert"


def reversible_view(t: Tables) -> View:
    """Each task reverted from a reversible merge, by merge then task: its test score on its
    domain, its expert's, and their ratio (± se), and the validation ratio."""
    headers = ["Merge", "Hyperparameters", "Components", "Task (expert)", "Domain", "Reverted (test)",
               "Expert (test)", "Reverted ÷ expert (test)", "Reverted ÷ expert (val.)", "Model id"]
    v = View(REVERSIBLE_TITLE, headers, source="tables/reversible.parquet",
             note="Scores on the task's own domain, primary metric; ± one standard error.")
    for r in t.reversible.to_dict("records"):
        d, n = r["domain"], r["n_components"]
        v.rows.append([
            Cell(str(r["merge_id"]) if isinstance(r["merge_id"], str) else "–", numeric=False),
            Cell(params_label(r["params"]) or "(defaults)", numeric=False),
            Cell(f"{n:g}" if isinstance(n, float) and math.isfinite(n) else "–"),
            Cell(str(r["task"]) if isinstance(r["task"], str) else "–", numeric=False),
            Cell(str(d) if isinstance(d, str) else "–", numeric=False),
            _score_cell(r, "reverted_test", d, None),  # "error" where its evaluation failed
            _score_cell(r, "expert_test", None, None),
            _score_cell(r, "norm_test", d, None),
            _score_cell(r, "norm_val", d, None, with_se=False),
            Cell(str(r["model_id"]), numeric=False),
        ])
    return v


def definitions(t: Tables) -> list[tuple[str, str]]:
    """:data:`DEFINITIONS` of what the run shows (reversible merges only where it has some)."""
    out = [(name, text) for name, text in DEFINITIONS if t.reversible.shape[0] or name != REVERSIBLE_DEFINITION]
    if t.searches:
        out.append(("Search", SEARCH_RULE))
    return out


def selection_view(t: Tables) -> View:
    headers = ["Method", "Points", "Eligible", "Failed", "Selected hyperparameters", "Val. mean (norm.)",
               "Test mean (norm.)", "Rank"]
    v = View("Selection per method", headers, note=SELECTION_RULE)
    for s in t.selection.to_dict("records"):
        v.rows.append([
            Cell(str(s["sweep_label"]), numeric=False), Cell(str(s["n_points"])), Cell(str(s["n_eligible"])),
            Cell(str(s["n_failed"]), error=bool(s["n_failed"])),
            Cell(params_label(s["params"]) or ("(defaults)" if isinstance(s["params"], str) else str(s["note"])),
                 numeric=False, error=not isinstance(s["params"], str)),
            Cell(fmt(s["val_norm_mean"])),
            Cell(fmt(s["test_norm_mean"]), se=fmt(s["test_norm_mean_stderr"])
                 if np.isfinite(s["test_norm_mean"]) and np.isfinite(s["test_norm_mean_stderr"]) else ""),
            Cell(str(s["rank"]) if pd.notna(s["rank"]) else "–"),
        ])
    return v


def pareto_view(t: Tables) -> View:
    p = t.pareto
    v = View("Pareto fronts (test split)", ["Domains", "Model id", "Method", "Hyperparameters", "x (norm.)", "y (norm.)"],
             note="Non-dominated merges for each pair of domains, over every merge of the run.")
    if p.empty:
        return v
    f = p[(p["split"] == "test") & p["on_front"]].sort_values(["domain_x", "domain_y", "x"], ascending=[True, True, False])
    for _, r in f.iterrows():
        v.rows.append([Cell(f"{r['domain_x']} × {r['domain_y']}", numeric=False), Cell(str(r["model_id"]), numeric=False),
                       Cell(str(r["method_label"]), numeric=False), Cell(params_label(r["params"]) or "(defaults)", numeric=False),
                       Cell(fmt(r["x"])), Cell(fmt(r["y"]))])
    return v


def failures_view(t: Tables) -> View:
    v = View(f"Failed evaluations ({len(t.failures)})", source="tables/scores.parquet (status = error)", headers=["Model id", "Role", "Method", "Hyperparameters", "Suite",
                                                         "Status", "Error"])
    for r in t.failures.to_dict("records"):
        v.rows.append([Cell(str(r["model_id"]), numeric=False), Cell(str(r["role"]), numeric=False),
                       Cell(str(r["method"]) if isinstance(r["method"], str) else "–", numeric=False),
                       Cell(params_label(r["params"]) or "–", numeric=False), Cell(str(r["suite"]), numeric=False),
                       Cell(str(r["status"]), error=True, numeric=False), Cell(str(r["error"]), numeric=False)])
    return v


def cost_view(t: Tables) -> View:
    headers = ["Model id", "Role", "Method", "Hyperparameters", "Merge time", "Merge peak RSS",
               "Evaluation time (all suites)", "Evaluation peak RSS"]
    v = View("Runtime and peak memory", headers,
             source="tables/leaderboard.parquet (merge_*, eval_*), tables/scores.parquet (per evaluation)")
    w = t.wide.copy()
    w["_o"] = w["role"].map({r: i for i, r in enumerate(ROLES)})
    for r in w.sort_values(["_o", "method_label", "model_id"]).to_dict("records"):
        v.rows.append([Cell(str(r["model_id"]), numeric=False), Cell(str(r["role"]), numeric=False),
                       Cell(str(r["method_label"]) or "–", numeric=False),
                       Cell(params_label(r["params"]) if r["role"] in ("merged", "reverted") else "–",
                            numeric=False),
                       Cell(fmt_seconds(r["merge_runtime_s"])), Cell(fmt_mb(r["merge_peak_rss_mb"])),
                       Cell(fmt_seconds(r["eval_runtime_s"])), Cell(fmt_mb(r["eval_peak_rss_mb"]))])
    return v


def summary(t: Tables) -> dict:
    roles = t.wide["role"].value_counts()
    n_eval = t.scores.drop_duplicates(["model_id", "suite"]).shape[0]
    return {
        "n_models": int(len(t.wide)),
        "n_base": int(roles.get("base", 0)),
        "n_experts": int(roles.get("expert", 0)),
        "n_merged": int(roles.get("merged", 0)),
        "n_reverted": int(roles.get("reverted", 0)),
        "n_methods": (int(t.leaderboard["method_label"].nunique()) if not t.searches else
                      len(set(t.leaderboard["method_label"].dropna()) | {s["label"] for s in t.searches})),
        "n_searches": len(t.searches),
        "n_evaluations": int(n_eval),
        "n_failed": int((t.failures["status"] == "error").sum()),
        "n_missing": int((t.failures["status"] == "missing").sum()),
        "skills": t.skills,
        "heldout": t.heldout,
        "metrics": t.metrics,
    }


def _heldout_and_selection_cells(t: Tables, r, bests: dict, by_selected: pd.DataFrame) -> list[Cell]:
    """The cells a leaderboard row ends with: held-out scores and changes against the base (test),
    the validation mean it was selected on, its points (and failures) and its model id."""
    cells = [_score_cell(r, col("abs", "test", h), h, bests.get(col("abs", "test", h))) for h in t.heldout]
    cells += [_score_cell(r, col("delta", "test", h), h, bests.get(col("delta", "test", h)), signed=True)
              for h in t.heldout]
    cells.append(_score_cell(r, col("norm", "validation", "mean"), "mean", None, with_se=False))
    if "n_failed" in r:  # a run with searches: the group's own count (a model may be two groups' point)
        n_failed = int(r["n_failed"])
    else:
        n_failed = int(by_selected.at[r["model_id"], "n_failed"]) if r["model_id"] in by_selected.index else 0
    cells.append(Cell(f"{int(r['n_points'])}" + (f" ({n_failed} failed)" if n_failed else ""), error=bool(n_failed)))
    cells.append(Cell(str(r["model_id"]), numeric=False))
    return cells


# --------------------------------------------------------------------------------------------
# searches

SEARCHES_TITLE = "Searches"
STRATEGY_NAMES = {"map": "MAP (quadratic surrogates, Pareto front)", "cmaes": "CMA-ES", "cycleqd": "CycleQD"}


def _int_text(x) -> str:
    return str(int(x)) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else "–"


def searches_view(t: Tables) -> View:
    """One row per search: its label, strategy, base method, budget, the evaluations it spent
    (its candidates), the generations it evaluated, the best value of its own validation
    objective, and the candidate the leaderboard selected for it (highest mean normalised
    validation score) with that candidate's validation and test mean normalised scores and rank."""
    headers = ["Search", "Strategy", "Base method", "Budget", "Evaluations", "Generations", "Best val. objective",
               "Selected model", "Val. mean (norm.)", "Test mean (norm.)", "Rank"]
    v = View(SEARCHES_TITLE, headers, note=SEARCH_RULE)
    for s in t.searches:
        chosen = search_selection(t, s["label"]) or {}
        mid = chosen.get("selected_model_id")
        test, se = chosen.get("test_norm_mean"), chosen.get("test_norm_mean_stderr")
        rank = chosen.get("rank")
        v.rows.append([
            Cell(str(s["label"]), numeric=False),
            Cell(STRATEGY_NAMES.get(s["strategy"], str(s["strategy"])), numeric=False),
            Cell(str(s["method"]), numeric=False),
            Cell(_int_text(s.get("budget"))),
            Cell(str(len(s["candidates"]))),
            Cell(str(len(s["convergence"]))),
            Cell(fmt(best_objective(s))),
            Cell(str(mid) if isinstance(mid, str) else "– (no candidate has complete validation scores)",
                 numeric=False, error=not isinstance(mid, str)),
            Cell(fmt(chosen.get("val_norm_mean"))),
            Cell(fmt(test), se=fmt(se) if fmt(test) != "–" and fmt(se) != "–" else ""),
            Cell(str(rank) if rank is not None and pd.notna(rank) else "–"),
        ])
    return v


def convergence_view(t: Tables) -> View:
    """Per search and evaluated generation: candidates evaluated, the best validation objective
    among them and the best so far."""
    v = View("Search convergence (validation objective)",
             ["Search", "Generation", "Candidates", "Best of the generation", "Best so far"],
             note="The search's own objective on the validation split (its suites, weights and normalisation); "
                  "no search sees a test score.")
    for r in convergence_table(t).to_dict("records"):
        v.rows.append([Cell(str(r["search"]), numeric=False), Cell(_int_text(r["generation"])), Cell(_int_text(r["n"])),
                       Cell(fmt(r["best"])), Cell(fmt(r["best_so_far"]))])
    return v


def map_report_view(t: Tables) -> View:
    """Per MAP search and objective suite: how its measured front points compare with the
    surrogate's prediction (raw validation scores): RMSE and largest absolute error of measured
    − predicted, the surrogate's own leave-one-out RMSE, and how many points lie within 2 LOO
    RMSE of their prediction."""
    v = View("MAP: predicted vs measured front points (validation)",
             ["Search", "Suite", "Points", "RMSE", "Max abs. error", "LOO RMSE", "Within 2 LOO RMSE"],
             note="Errors = measured − predicted raw validation score of each front point MAP evaluated; LOO RMSE: "
                  "the quadratic surrogate's leave-one-out error on its design points.")
    for s in t.searches:
        front = s.get("front")
        summary = (front or {}).get("summary") or {}
        for suite in (front or {}).get("tasks", []):
            r = summary.get(suite) or {}
            n, within = r.get("n"), r.get("within_2_loo")
            v.rows.append([Cell(str(s["label"]), numeric=False), Cell(str(suite), numeric=False), Cell(_int_text(n)),
                           Cell(fmt(r.get("rmse"), 4)), Cell(fmt(r.get("max_abs_error"), 4)),
                           Cell(fmt(r.get("loo_rmse"), 4)),
                           Cell(f"{_int_text(within)} of {_int_text(n)}" if within is not None else "–")])
    return v
