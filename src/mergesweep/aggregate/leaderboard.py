"""From the long scores table to the derived tables: leaderboard, selection, Pareto fronts.

:func:`compute_tables` is the single entry point; it reads nothing and writes nothing. Column
naming of the wide tables: ``<quantity>_<split>_<suite>`` with ``split`` one of ``val``
(validation) or ``test``; ``<quantity>`` is ``norm`` (normalised by the domain's expert),
``abs`` (raw score on the suite's primary metric) or ``delta`` (held-out change against the
base). ``norm_<split>_mean`` is the mean over the model's domains. Each has a ``_stderr`` twin.

The leaderboard, selection and Pareto tables are of merged models (role ``merged``) only; the
tasks reverted from a reversible merge (role ``reverted``, each evaluated on its own domain) have
their own table, :func:`reversible_table`, against their experts.

A run's searches (:mod:`mergesweep.aggregate.searches`) are method groups of their own, named by
their label: the selection table gets one row per search (column ``search``: its label, null for a
grid sweep), a candidate that only a search planned is a row of the leaderboard labelled by its
search and no point of its base method's sweep, and a grid merge that a search also proposed stays
its grid row (column ``searches``: the labels of the searches it is a candidate of). Without
searches neither column exists and every table is as before.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mergesweep.aggregate import analysis as A

SPLIT_TAG = {"validation": "val", "test": "test"}


@dataclass
class Tables:
    """Everything the markdown leaderboard, the figures and the report are drawn from."""

    scores: pd.DataFrame
    metrics: dict[str, str]
    skills: list[str]
    heldout: list[str]
    models: pd.DataFrame  # index model_id
    suites: pd.DataFrame  # long: model_id, suite, split, score, stderr, n
    norm: pd.DataFrame  # long normalised scores
    deltas: pd.DataFrame  # long held-out deltas
    wide: pd.DataFrame  # one row per model (all roles), wide columns
    leaderboard: pd.DataFrame  # one row per merged model
    selection: pd.DataFrame  # one row per sweep
    pareto: pd.DataFrame  # one row per (domain pair, split, merged model)
    failures: pd.DataFrame  # failed / missing (model, suite)
    hp_columns: list[str] = field(default_factory=list)
    #: one row per task reverted from a reversible merge (RMM), against its expert
    reversible: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=REVERSIBLE_COLUMNS))
    #: the run's searches as scores.parquet embeds them (mergesweep.aggregate.searches.summarise)
    searches: list[dict] = field(default_factory=list)
    #: the merged models only a search planned (no point of their base method's sweep)
    search_only: list[str] = field(default_factory=list)

    @property
    def references(self) -> pd.DataFrame:
        """Base and expert rows of :attr:`wide` (base first, experts by domain)."""
        ref = self.wide[self.wide["role"].isin(["base", "expert"])]
        order = ref["role"].map({"base": 0, "expert": 1})
        return ref.assign(_o=order).sort_values(["_o", "domain", "model_id"]).drop(columns="_o")


def col(quantity: str, split: str, suite: str | None = None, stderr: bool = False) -> str:
    """Column name ``<quantity>_<val|test>_<suite>[_stderr]``."""
    name = f"{quantity}_{SPLIT_TAG.get(split, split)}" + (f"_{suite}" if suite else "")
    return name + ("_stderr" if stderr else "")


def hyperparameter_columns(params: pd.Series) -> pd.DataFrame:
    """``hp_<name>`` columns from the params JSON: float where every value of the parameter is a
    number, else the value's JSON text (per-expert lists, mappings, strings)."""
    parsed = [json.loads(p) if isinstance(p, str) and p else {} for p in params]
    names = sorted({k for p in parsed for k in p})
    out = {}
    for name in names:
        vals = [p.get(name) for p in parsed]
        present = [v for v in vals if v is not None]
        numeric = present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)
        if numeric:
            out[f"hp_{name}"] = pd.Series([float(v) if v is not None else math.nan for v in vals],
                                          index=params.index, dtype="float64")
        else:
            out[f"hp_{name}"] = pd.Series(
                [None if v is None else (v if isinstance(v, str) else json.dumps(v, sort_keys=True))
                 for v in vals], index=params.index, dtype="str")
    return pd.DataFrame(out, index=params.index)


@functools.lru_cache(maxsize=4096)
def params_label(params: str | None, skip: tuple[str, ...] = ()) -> str:
    """``density=0.2, lambda=1`` from a params JSON (empty string for no parameters)."""
    if not isinstance(params, str) or not params:
        return ""
    p = json.loads(params)

    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return f"{v:g}"
        if isinstance(v, (list, dict)):
            return json.dumps(v, separators=(",", ":"))
        return str(v)

    return ", ".join(f"{k}={fmt(v)}" for k, v in sorted(p.items()) if k not in skip)


def _wide(tables_long: list[tuple[str, pd.DataFrame, str, str, list[str]]], models: pd.DataFrame) -> pd.DataFrame:
    """One column per (quantity, split, suite) and its stderr twin, for every suite the quantity
    covers (``suites``) whether or not any model has a score there: a suite that failed for
    every model is a column of NaN (shown as failures), never a missing column."""
    wide = models.copy()
    for quantity, df, value, se, suites in tables_long:
        for suite in suites:
            for split in A.SPLITS:
                wide[col(quantity, split, suite)] = np.nan
                wide[col(quantity, split, suite, stderr=True)] = np.nan
        if df.empty:
            continue
        for (suite, split), g in df.groupby(["suite", "split"], sort=True):
            g = g.set_index("model_id")
            wide[col(quantity, split, suite)] = g[value].reindex(wide.index).astype(float)
            wide[col(quantity, split, suite, stderr=True)] = g[se].reindex(wide.index).astype(float)
    return wide


def search_members(searches: list[dict], merged_ids) -> dict[str, list[str]]:
    """Per search label, its candidates that are merged models of the table (``merged_ids``), each
    once, in the order the search first proposed them."""
    present = set(merged_ids)
    return {s["label"]: list(dict.fromkeys(c["model_id"] for c in s["candidates"] if c["model_id"] in present))
            for s in searches}


def compute_tables(scores: pd.DataFrame, metric_overrides: Mapping[str, str] | None = None,
                   searches: Mapping | None = None) -> Tables:
    """All derived tables from the long scores table (see the module docstring for columns).
    ``searches``: the run's searches as scores.parquet embeds them
    (:func:`mergesweep.aggregate.searches.read_searches`), each one more method group."""
    metrics = A.primary_metrics(scores, metric_overrides)
    suite_role = scores.drop_duplicates("suite").set_index("suite")["suite_role"]
    skills = sorted(s for s, r in suite_role.items() if r == "skill")
    heldout = sorted(s for s, r in suite_role.items() if r != "skill")
    models = A.models_table(scores)
    suites = A.suite_scores(scores, metrics)
    norm = A.normalised_scores(suites, models)
    deltas = A.heldout_deltas(suites, models, heldout)
    means = A.mean_normalised(norm, models)
    fails = A.failures(scores)

    wide = _wide(
        [("abs", suites, "score", "stderr", skills + heldout), ("norm", norm, "norm", "norm_stderr", skills),
         ("delta", deltas, "delta", "delta_stderr", heldout)],
        models,
    )
    for split in A.SPLITS:
        m = means[means["split"] == split].set_index("model_id")
        wide[col("norm", split, "mean")] = m["norm_mean"].reindex(wide.index).astype(float)
        wide[col("norm", split, "mean", stderr=True)] = m["norm_mean_stderr"].reindex(wide.index).astype(float)
    failed = fails.groupby("model_id")["suite"].apply(lambda s: ",".join(sorted(s)))
    wide["failed_suites"] = failed.reindex(wide.index)
    wide["status"] = np.where(wide["failed_suites"].notna(), "error", "ok")
    wide["method_label"] = [A.method_label(m, a) for m, a in zip(wide["method"], wide["align"])]
    wide["domains"] = [json.dumps(d) for d in wide["domains"]]
    wide.index.name = "model_id"
    wide = wide.reset_index()

    # ---- leaderboard (merged models) and selection
    merged = wide[wide["role"] == "merged"].copy()
    hp = hyperparameter_columns(merged["params"])
    merged = pd.concat([merged, hp], axis=1)
    search_list = [dict(x) for x in (searches or {}).get("searches", [])]
    members = search_members(search_list, merged["model_id"])
    only = set((searches or {}).get("search_only", [])) & set(merged["model_id"])
    # a merge only a search planned is labelled by its (first) search
    own_search: dict[str, str] = {}
    for label, ids in members.items():
        for m in ids:
            if m in only:
                own_search.setdefault(m, label)
    grid_rows = ~merged["model_id"].isin(only)
    val_mean, test_mean = col("norm", "validation", "mean"), col("norm", "test", "mean")
    merged["task_key"] = [f"{b or ''}|{','.join(sorted(json.loads(e or '[]')))}"
                          for b, e in zip(merged["base"], merged["experts"])]
    multi = merged["task_key"].nunique() > 1
    merged["sweep_label"] = [
        f"{m} [{'+'.join(json.loads(d))}]" if multi else m
        for m, d in zip(merged["method_label"], merged["domains"])
    ]
    if search_list:
        points = _group_points(merged, grid_rows, members)
        sel = A.select_points(points.rename(columns={val_mean: "_score"}), score="_score",
                              group_columns=[*A.GROUP_COLUMNS, "search"])
        sel["search"] = [x if x else None for x in sel["search"]]
    own = merged["model_id"].map(own_search)
    mine = own.notna().to_numpy()
    if mine.any():  # a search-only merge is labelled by its search
        merged.loc[mine, "method_label"] = own[mine]
        merged.loc[mine, "sweep_label"] = own[mine]
    else:
        points = None
        sel = A.select_points(merged.rename(columns={val_mean: "_score"}), score="_score")
    merged["selected"] = merged["model_id"].isin(sel["selected_model_id"].dropna())
    group_key = merged[A.GROUP_COLUMNS].astype(object).where(merged[A.GROUP_COLUMNS].notna(), "")
    if own_search:  # a search-only merge is no point of its base method's sweep
        group_key = group_key.assign(_search=[own_search.get(m, "") for m in merged["model_id"]])
    merged["n_points"] = group_key.groupby(list(group_key.columns)).transform("size") if len(merged) else []
    if mine.any():  # a search's points are all its candidates, shared ones too
        merged.loc[mine, "n_points"] = [len(members[label]) for label in own[mine]]
    # the selected point of every group, ranked on test within its merge task (base + experts)
    by_id = merged.set_index("model_id")
    chosen = sel["selected_model_id"].dropna()
    sel["task_key"] = [f"{b or ''}|{','.join(sorted(json.loads(e or '[]')))}"
                       for b, e in zip(sel["base"], sel["experts"])]
    sel["rank"] = pd.array([pd.NA] * len(sel), dtype="Int64")
    picked = sel.loc[chosen.index].assign(_test=by_id[test_mean].reindex(chosen).to_numpy(dtype=float))
    for _, g in picked.groupby("task_key"):
        sel.loc[g.index, "rank"] = A.competition_rank(g["_test"])
    best_rank = sel.loc[chosen.index].groupby("selected_model_id")["rank"].min()
    merged["rank"] = pd.array(merged["model_id"].map(best_rank), dtype="Int64")
    merged = merged.sort_values(
        ["rank", "selected", "method_label", col("norm", "validation", "mean"), "model_id"],
        ascending=[True, False, True, False, True], na_position="last", kind="stable",
    ).reset_index(drop=True)

    lead_cols = ["model_id", "rank", "selected", "method", "method_label", "sweep_label", "params", *hp.columns,
                 "base", "experts", "align", "domains", "n_points", "status", "failed_suites"]
    if search_list:
        labels_of: dict[str, list[str]] = {}
        for label, ids in members.items():
            for m in ids:
                labels_of.setdefault(m, []).append(label)
        merged["searches"] = [json.dumps(labels_of[m]) if m in labels_of else None for m in merged["model_id"]]
        lead_cols.append("searches")
    score_cols = [c for c in wide.columns if c.startswith(("norm_", "abs_", "delta_"))]
    score_cols = sorted(score_cols, key=_score_col_order(skills, heldout))
    cost_cols = ["merge_runtime_s", "merge_peak_rss_mb", "eval_runtime_s", "eval_peak_rss_mb"]
    leaderboard = merged[lead_cols + score_cols + cost_cols]

    selection = _selection_table(sel, merged, points)
    pareto = _pareto_table(merged, skills)
    return Tables(
        scores=scores, metrics=metrics, skills=skills, heldout=heldout, models=models,
        suites=suites, norm=norm, deltas=deltas, wide=wide, leaderboard=_text(leaderboard),
        selection=_text(selection), pareto=_text(pareto), failures=fails, hp_columns=list(hp.columns),
        reversible=_text(reversible_table(wide, norm)), searches=search_list,
        search_only=sorted(only),
    )


def _group_points(merged: pd.DataFrame, grid_rows: pd.Series, members: Mapping[str, list[str]]) -> pd.DataFrame:
    """Every (group, point) pair of a run with searches: the grid merges (``grid_rows``) with
    ``search = ""`` and, per search, its candidates with ``search = <label>`` and
    ``sweep_label = <label>`` (a merge both a grid point and a candidate is a row of each)."""
    parts = [merged[grid_rows.to_numpy()].assign(search="")]
    by_id = merged.set_index("model_id", drop=False)
    for label, ids in members.items():
        if ids:
            parts.append(by_id.loc[ids].reset_index(drop=True).assign(search=label, sweep_label=label))
    return pd.concat(parts, ignore_index=True)


def _text(df: pd.DataFrame) -> pd.DataFrame:
    """Missing values of object (text) columns as NaN, as pandas' string columns (and so the
    written parquet table, read back) have them."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object:
            out[c] = out[c].where(out[c].notna(), np.nan)
    return out


def _score_col_order(skills: list[str], heldout: list[str]):
    qorder = {"norm": 0, "abs": 1, "delta": 2}
    sorder = {s: i for i, s in enumerate(["mean", *skills, *heldout])}

    def key(c: str):
        parts = c.split("_")
        q, split = parts[0], parts[1]
        stderr = c.endswith("_stderr")
        suite = "_".join(parts[2:-1] if stderr else parts[2:])
        return (0 if split == "test" else 1, qorder.get(q, 9), sorder.get(suite, 99), suite, stderr)

    return key


SELECTION_COLUMNS = ["method", "method_label", "sweep_label", "align", "base", "experts", "n_points", "n_eligible",
                     "n_failed", "selected_model_id", "params", "val_norm_mean", "test_norm_mean",
                     "test_norm_mean_stderr", "rank", "note"]


def _group_keys(df: pd.DataFrame, columns: list[str] | None = None) -> pd.Series:
    """One hashable key per row from :data:`analysis.GROUP_COLUMNS` (or ``columns``; null as "")."""
    columns = list(A.GROUP_COLUMNS if columns is None else columns)
    keys = df[columns].astype(object).where(df[columns].notna(), "")
    return pd.Series(list(zip(*(keys[c] for c in columns))), index=df.index, dtype=object)


def _selection_table(sel: pd.DataFrame, merged: pd.DataFrame, points: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per group of ``sel`` (:func:`analysis.select_points`, with its ``rank``): its
    label, counts and selected point. ``points``: the (group, point) rows of a run with searches
    (:func:`_group_points`; then a ``search`` column names each search's group), else the merged
    models are the points."""
    columns = SELECTION_COLUMNS + (["search"] if points is not None else [])
    if sel.empty:
        return pd.DataFrame(columns=columns)
    by = [*A.GROUP_COLUMNS, "search"] if points is not None else None
    points = merged if points is None else points
    groups = _group_keys(points, by)
    per_group = pd.DataFrame({"key": groups, "label": points["sweep_label"],
                              "failed": points["status"] == "error"}).groupby("key", sort=False)
    label, n_failed = per_group["label"].first(), per_group["failed"].sum()
    skey = _group_keys(sel.assign(search=sel["search"].fillna("")) if by else sel, by)
    by_id = merged.set_index("model_id")
    mid = sel["selected_model_id"]
    chosen = mid.map(lambda m: isinstance(m, str))
    r = by_id.reindex(mid.where(chosen, None))

    def picked(column: str, default):
        values = r[column].to_numpy()
        return [v if c else default for v, c in zip(values, chosen)]

    out = pd.DataFrame({
        "method": sel["method"].to_numpy(),
        "method_label": [A.method_label(m, a) for m, a in zip(sel["method"], sel["align"])],
        "sweep_label": [str(label[k]) for k in skey],
        "align": sel["align"].to_numpy(),
        "base": sel["base"].to_numpy(),
        "experts": sel["experts"].to_numpy(),
        "n_points": sel["n_points"].astype(int).to_numpy(),
        "n_eligible": sel["n_eligible"].astype(int).to_numpy(),
        "n_failed": [int(n_failed[k]) for k in skey],
        "selected_model_id": [m if c else None for m, c in zip(mid, chosen)],
        "params": picked("params", None),
        "val_norm_mean": np.array(picked(col("norm", "validation", "mean"), math.nan), dtype=float),
        "test_norm_mean": np.array(picked(col("norm", "test", "mean"), math.nan), dtype=float),
        "test_norm_mean_stderr": np.array(picked(col("norm", "test", "mean", True), math.nan), dtype=float),
        "rank": pd.array([r if c else pd.NA for r, c in zip(sel["rank"], chosen)], dtype="Int64"),
        "note": [None if c else "no point has complete validation scores" for c in chosen],
    }, columns=SELECTION_COLUMNS)
    if by:
        out["search"] = sel["search"].to_numpy(dtype=object)
        is_search = out["search"].notna()
        out.loc[is_search, "method_label"] = out.loc[is_search, "search"]
    return out.sort_values(["rank", "sweep_label"], na_position="last", kind="stable").reset_index(drop=True)


def _pareto_table(merged: pd.DataFrame, skills: list[str]) -> pd.DataFrame:
    """Per pair of domains (x < y alphabetically) and split, every merged model with both
    normalised scores, flagged ``on_front`` by :func:`analysis.pareto_front`."""
    cols = ["domain_x", "domain_y", "split", "model_id", "method", "method_label", "params",
            "x", "y", "x_stderr", "y_stderr", "on_front", "selected"]
    parts = []
    for dx, dy in itertools.combinations(skills, 2):
        for split in A.SPLITS:
            cx, cy = col("norm", split, dx), col("norm", split, dy)
            if cx not in merged or cy not in merged:
                continue
            pts = merged[merged[cx].notna() & merged[cy].notna()]
            if pts.empty:
                continue
            parts.append(pd.DataFrame({
                "domain_x": dx, "domain_y": dy, "split": split,
                "model_id": pts["model_id"].to_numpy(), "method": pts["method"].to_numpy(),
                "method_label": pts["method_label"].to_numpy(), "params": pts["params"].to_numpy(),
                "x": pts[cx].to_numpy(dtype=float), "y": pts[cy].to_numpy(dtype=float),
                "x_stderr": pts[col("norm", split, dx, True)].to_numpy(dtype=float),
                "y_stderr": pts[col("norm", split, dy, True)].to_numpy(dtype=float),
                "on_front": A.pareto_front(pts[cx], pts[cy]),
                "selected": pts["selected"].to_numpy(dtype=bool),
            }, columns=cols))
    if not parts:
        return pd.DataFrame(columns=cols)
    return pd.concat(parts, ignore_index=True)


REVERSIBLE_COLUMNS = [
    "merge_id", "task", "domain", "model_id", "method", "params", "n_components", "expert_model_id",
    *(f"{q}_{SPLIT_TAG[split]}{se}" for split in A.SPLITS for q in ("reverted", "expert", "norm")
      for se in ("", "_stderr")),
    "status", "failed_suites",
]


def n_components(method, params, experts) -> float:
    """The number of basis components a reversible merge used, from its params JSON and its
    experts (JSON list): RMM's own rule (:func:`mergesweep.merge.methods.rmm.components`: the
    ``components`` parameter capped at the number of experts); NaN when the params do not say."""
    p = json.loads(params) if isinstance(params, str) and params else {}
    v = p.get("components")
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return math.nan
    if method == "rmm":
        from mergesweep.merge.methods.rmm import components

        return float(components(p, len(json.loads(experts)) if isinstance(experts, str) else int(v)))
    return float(v)


def reversible_table(wide: pd.DataFrame, norm: pd.DataFrame) -> pd.DataFrame:
    """One row per task reverted from a reversible merge (role ``reverted``), by merge then task:
    its score on its domain (``reverted_<split>``), its expert's (``expert_<split>``) and their
    ratio ``norm_<split> = reverted / expert`` with the delta-method stderr, exactly the
    normalised score of :func:`analysis.normalised_scores` (whose reference for a reverted model
    is the expert it reverts); the merge's ``params`` and ``n_components``. Empty, with the
    columns, when the run has no reverted model."""
    rev = wide[wide["role"] == "reverted"]
    if rev.empty:
        return pd.DataFrame(columns=REVERSIBLE_COLUMNS)
    source = [A.revert_source(x, m) for x, m in zip(rev["source"], rev["model_id"])]
    out = pd.DataFrame({
        "merge_id": [m for m, _ in source],
        "task": [t for _, t in source],
        "domain": rev["domain"].to_numpy(dtype=object),
        "model_id": rev["model_id"].to_numpy(dtype=object),
        "method": rev["method"].to_numpy(dtype=object),
        "params": rev["params"].to_numpy(dtype=object),
        "n_components": [n_components(*x) for x in zip(rev["method"], rev["params"], rev["experts"])],
    })
    n = norm.set_index(["model_id", "suite", "split"])
    refs = []
    for split in A.SPLITS:
        tag = SPLIT_TAG[split]
        key = pd.MultiIndex.from_arrays([out["model_id"], out["domain"], [split] * len(out)])
        r = n.reindex(key)
        refs.append(r["ref_model_id"].to_numpy(dtype=object))
        for q, (v, se) in {"reverted": ("score", "stderr"), "expert": ("ref_score", "ref_stderr"),
                           "norm": ("norm", "norm_stderr")}.items():
            out[f"{q}_{tag}"] = r[v].to_numpy(dtype=float)
            out[f"{q}_{tag}_stderr"] = r[se].to_numpy(dtype=float)
    # the expert the ratio is taken against (the same on every split where there is one)
    out["expert_model_id"] = [next((x for x in xs if isinstance(x, str)), None) for xs in zip(*refs)]
    out["status"] = rev["status"].to_numpy(dtype=object)
    out["failed_suites"] = rev["failed_suites"].to_numpy(dtype=object)
    out = out.sort_values(["merge_id", "task", "model_id"], na_position="last", kind="stable")
    return out[REVERSIBLE_COLUMNS].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# method groups and searches, as the views and figures show them


def ranked_points(t: Tables) -> pd.DataFrame:
    """One row per method group with a selected point (each sweep and each search), by rank:
    the leaderboard row of its selected model, with the group's ``method_label``,
    ``sweep_label``, ``n_points``, ``rank`` and ``n_failed``. Without searches, the selected rows
    of the leaderboard themselves (one group per selected model); with searches, a model selected
    by two groups (a grid merge a search also proposed) is a row of each."""
    lb = t.leaderboard
    if "search" not in t.selection.columns:
        return lb[lb["selected"]]
    sel = t.selection.dropna(subset=["selected_model_id"])
    rows = lb.set_index("model_id", drop=False).loc[list(sel["selected_model_id"])].reset_index(drop=True)
    for c in ("method_label", "sweep_label", "n_points", "n_failed", "search"):
        rows[c] = sel[c].to_numpy()
    rows["rank"] = pd.array(sel["rank"].to_numpy(), dtype="Int64")
    return rows.sort_values(["rank", "method_label", col("norm", "validation", "mean"), "model_id"],
                            ascending=[True, True, False, True], na_position="last", kind="stable")


def grid_selected_ids(t: Tables) -> set[str]:
    """The models the grid sweeps (not the searches) selected."""
    sel = t.selection
    if "search" in sel.columns:
        sel = sel[sel["search"].isna()]
    return {str(m) for m in sel["selected_model_id"].dropna()}


def search_selection(t: Tables, label: str) -> dict | None:
    """The selection row of the search labelled ``label`` (as a dict), or None."""
    sel = t.selection
    if "search" not in sel.columns:
        return None
    rows = sel[sel["search"] == label]
    return rows.iloc[0].to_dict() if len(rows) else None


CONVERGENCE_COLUMNS = ["search", "strategy", "generation", "n", "best", "best_so_far"]


def convergence_table(t: Tables) -> pd.DataFrame:
    """Per search and evaluated generation: the number of candidates evaluated, the best
    validation objective among them and the best up to that generation (the search's own
    objective, as its result.json records it)."""
    rows = [{"search": s["label"], "strategy": s["strategy"], "generation": g.get("generation"), "n": g.get("n"),
             "best": g.get("best"), "best_so_far": g.get("best_so_far")}
            for s in t.searches for g in s["convergence"]]
    out = pd.DataFrame(rows, columns=CONVERGENCE_COLUMNS)
    for c in ("best", "best_so_far"):
        out[c] = pd.to_numeric(out[c], errors="coerce").astype(float)
    return out


def best_objective(search: Mapping) -> float:
    """The best validation objective a search reached (its candidates' maximum; NaN for none)."""
    values = [c["objective"] for c in search["candidates"] if isinstance(c.get("objective"), (int, float))]
    return float(max(values)) if values else math.nan


def _raw_validation(t: Tables, model_ids, suite: str) -> np.ndarray:
    """Each model's raw validation score on ``suite`` (the suite's primary metric; NaN where
    missing)."""
    v = t.suites[(t.suites["split"] == "validation") & (t.suites["suite"] == suite)].set_index("model_id")["score"]
    return v.reindex(list(model_ids)).to_numpy(dtype=float)


def map_fronts(t: Tables) -> list[dict]:
    """For every MAP search and pair ``(x, y)`` of its objective suites: ``predicted`` (the
    surrogates' predicted front, ``[(x, y), ...]``), ``measured`` (the front candidates it
    evaluated, their model ids and raw validation scores) and ``grid`` (the grid merges of the
    same method, base, experts and alignment, their raw validation scores and ``on_front``: not
    dominated on the two suites), all in raw validation scores per suite, as MAP fits them."""
    out = []
    lb = t.leaderboard
    grid = lb[~lb["model_id"].isin(t.search_only)]
    for s in t.searches:
        front = s.get("front")
        if s["strategy"] != "map" or not front:
            continue
        group = search_selection(t, s["label"])
        mine = grid
        if group is not None:
            for c in A.GROUP_COLUMNS:
                mine = mine[mine[c].isna()] if not isinstance(group[c], str) else mine[mine[c] == group[c]]
        else:
            mine = mine.iloc[:0]
        measured = [c["model_id"] for c in s["candidates"] if (c.get("info") or {}).get("role") == "front"]
        for sx, sy in itertools.combinations(front["tasks"], 2):
            pred = [(p.get(sx), p.get(sy)) for p in front["predicted"]]
            pred = [(float(a), float(b)) for a, b in pred if a is not None and b is not None]
            gx, gy = _raw_validation(t, mine["model_id"], sx), _raw_validation(t, mine["model_id"], sy)
            out.append({
                "search": s["label"], "x": sx, "y": sy, "predicted": pred,
                "measured": {"model_id": measured, "x": _raw_validation(t, measured, sx),
                             "y": _raw_validation(t, measured, sy)},
                "grid": {"model_id": list(mine["model_id"]), "x": gx, "y": gy, "on_front": A.pareto_front(gx, gy)},
            })
    return out
