"""The formulas of the leaderboard: suite scores, normalised scores, forgetting, selection and
Pareto fronts. Pure functions on DataFrames; no I/O.

Notation: ``s(m, q, split)`` is the score of model ``m`` on suite ``q`` for a split (the mean of
the suite's tasks on the suite's primary metric), ``se`` its standard error, ``E_d`` the expert of
domain ``d`` (the expert whose ``domain`` is ``d``), ``B`` the base model.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from mergesweep.aggregate.scores import ScoresError

log = logging.getLogger(__name__)

#: Preferred primary metrics, in order, when a suite has several.
METRIC_PREFERENCE = ("acc", "exact_match", "acc_norm", "f1", "pass@1")
SELECTION_SPLIT = "validation"
REPORT_SPLIT = "test"
SPLITS = (SELECTION_SPLIT, REPORT_SPLIT)
#: Columns that identify a hyperparameter sweep: one selected point per group.
GROUP_COLUMNS = ["method", "align", "base", "experts"]

SELECTION_RULE = (
    "For each merge method (and each base, expert set and alignment it was run with), the "
    "hyperparameter point with the highest mean normalised score on the validation split is "
    "selected; ties go to the smallest model id. A point whose validation score is missing for "
    "any of its domains (a failed evaluation) cannot be selected. The selected points are ranked "
    "by their mean normalised score on the test split. Test scores are never used for selection."
)


# --------------------------------------------------------------------------------------------
# suite scores


def primary_metrics(scores: pd.DataFrame, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The metric each suite is scored on: an override, else the first of
    :data:`METRIC_PREFERENCE` the suite reports, else its alphabetically first metric."""
    overrides = dict(overrides or {})
    ok = scores[(scores["status"] == "ok") & scores["metric"].notna()]
    out: dict[str, str] = {}
    for suite in sorted(scores["suite"].dropna().unique()):
        available = sorted(ok.loc[ok["suite"] == suite, "metric"].unique())
        if suite in overrides:
            if available and overrides[suite] not in available:
                raise ScoresError(
                    f"--metric {suite}={overrides[suite]}: suite {suite!r} reports only "
                    f"{', '.join(available)}"
                )
            out[suite] = overrides[suite]
            continue
        if not available:
            continue
        out[suite] = next((m for m in METRIC_PREFERENCE if m in available), available[0])
    unknown = set(overrides) - set(out)
    if unknown:
        raise ScoresError(f"--metric: unknown suite(s) {', '.join(sorted(unknown))}")
    return out


def primary_filter(filters: pd.Series) -> str | None:
    """lm-eval filter a metric is read under: ``none`` where reported, else the first by name."""
    present = sorted(set(filters.dropna()))
    if not present:
        return None
    return "none" if "none" in present else present[0]


def suite_scores(scores: pd.DataFrame, metrics: Mapping[str, str]) -> pd.DataFrame:
    """One row per (model_id, suite, split) on the suite's primary metric (and filter).

    ``score = mean_t value_t`` over the suite's task rows ``t`` for that split (macro average;
    NaN if any is NaN), ``stderr = sqrt(sum_t se_t^2) / T`` (tasks independent),
    ``n = sum_t n_t``.
    """
    ok = scores[(scores["status"] == "ok") & scores["split"].notna()]
    ok = ok[ok["metric"] == ok["suite"].map(metrics)]
    cols = ["model_id", "suite", "split", "score", "stderr", "n", "n_tasks"]
    if ok.empty:
        return pd.DataFrame(columns=cols)
    wanted = ok.groupby("suite")["filter"].apply(primary_filter)
    want = ok["suite"].map(wanted)
    ok = ok[(ok["filter"] == want) | (ok["filter"].isna() & want.isna())]

    ok = ok.assign(
        _v=ok["value"].astype(float).fillna(0.0),
        _vnan=ok["value"].isna().astype(int),
        _se2=ok["stderr"].astype(float).fillna(0.0) ** 2,
        _senan=ok["stderr"].isna().astype(int),
        _n=ok["n"].astype("Float64"),
        _one=1,
    )
    g = ok.groupby(["model_id", "suite", "split"], sort=True)
    agg = g[["_v", "_vnan", "_se2", "_senan", "_one"]].sum()
    agg["n"] = g["_n"].sum(min_count=1)
    k = agg["_one"].astype(float)
    out = pd.DataFrame({
        "score": np.where(agg["_vnan"] > 0, np.nan, agg["_v"] / k),
        "stderr": np.where(agg["_senan"] > 0, np.nan, np.sqrt(agg["_se2"]) / k),
        "n": agg["n"].astype("Int64"),
        "n_tasks": agg["_one"].astype(int),
    }, index=agg.index)
    return out.reset_index()[cols]


def failures(scores: pd.DataFrame) -> pd.DataFrame:
    """Every failed (model, suite) evaluation, and every (model, suite) pair that has no
    evaluation at all (``status="missing"``) although the suite was evaluated for other models."""
    cols = ["model_id", "role", "method", "params", "suite", "status", "error"]
    err = scores.loc[scores["status"] == "error", cols].drop_duplicates(["model_id", "suite"])
    have = set(zip(scores["model_id"], scores["suite"]))
    models = scores.drop_duplicates("model_id").set_index("model_id")
    missing = [
        {"model_id": m, "role": models.at[m, "role"], "method": models.at[m, "method"],
         "params": models.at[m, "params"], "suite": s, "status": "missing",
         "error": "no evaluation file for this (model, suite)"}
        for m in models.index
        for s in sorted(scores["suite"].unique())
        if (m, s) not in have
    ]
    out = pd.concat([err, pd.DataFrame(missing, columns=cols)], ignore_index=True)
    return out.sort_values(["model_id", "suite"], kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# models


def models_table(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per model with its metadata and ``domains``: the skills it is meant to cover.

    An expert covers its ``domain``; a merge covers the domains of its experts (looked up by
    model id); the base covers every skill suite.
    """
    first = scores.drop_duplicates("model_id").set_index("model_id")
    meta = first[["role", "method", "params", "base", "experts", "domain", "align", "source",
                  "fingerprint", "merge_runtime_s", "merge_peak_rss_mb"]].copy()
    cost = scores.drop_duplicates(["model_id", "suite"]).groupby("model_id").agg(
        eval_runtime_s=("runtime_s", lambda s: s.sum(min_count=1)),
        eval_peak_rss_mb=("peak_rss_mb", "max"),
    )
    meta = meta.join(cost)
    skills = sorted(scores.loc[scores["suite_role"] == "skill", "suite"].unique())
    expert_domain = meta.loc[meta["role"] == "expert", "domain"].to_dict()

    def domains(row) -> list[str]:
        if row["role"] == "expert":
            return [row["domain"]] if isinstance(row["domain"], str) else []
        if row["role"] == "merged":
            ids = json.loads(row["experts"] or "[]")
            found = [expert_domain[e] for e in ids if isinstance(expert_domain.get(e), str)]
            unknown = [e for e in ids if e not in expert_domain]
            if unknown:
                log.warning("merged model %s: expert(s) %s have no evaluations; their domains "
                            "are unknown", row.name, ", ".join(unknown))
            return list(dict.fromkeys(found))
        return list(skills)

    meta["domains"] = [domains(r) for _, r in meta.iterrows()]
    return meta


def method_label(method, align) -> str:
    """``method``, or ``method+<alignment method>`` for an aligned merge."""
    if not isinstance(method, str):
        return ""
    if isinstance(align, str) and align:
        try:
            a = json.loads(align)
        except json.JSONDecodeError:
            a = align
        tag = a.get("method", "align") if isinstance(a, Mapping) else str(a)
        return f"{method}+{tag}"
    return method


def expert_for(model_row: pd.Series, domain: str, models: pd.DataFrame,
               by_domain: dict[str, list[str]] | None = None) -> str | None:
    """``E_d`` for a model: the expert of domain ``d`` among the model's own experts, else the
    only expert of ``d`` in the run (None when there is none, or several and none is the
    model's)."""
    if model_row["role"] == "expert" and model_row["domain"] == domain:
        return model_row.name
    experts = (by_domain if by_domain is not None else _experts_by_domain(models)).get(domain, [])
    own = json.loads(model_row["experts"] or "[]") if isinstance(model_row["experts"], str) else []
    mine = [e for e in own if e in experts]
    if mine:
        return mine[0]
    if len(experts) == 1:
        return experts[0]
    return None


def _experts_by_domain(models: pd.DataFrame) -> dict[str, list[str]]:
    ex = models[models["role"] == "expert"]
    out: dict[str, list[str]] = {}
    for mid, d in zip(ex.index, ex["domain"]):
        if isinstance(d, str):
            out.setdefault(d, []).append(mid)
    return out


def base_for(model_row: pd.Series, models: pd.DataFrame) -> str | None:
    """``B`` for a model: its ``base`` field if that is a base model of the run, else the only
    base model of the run."""
    bases = models.index[models["role"] == "base"]
    if isinstance(model_row["base"], str) and model_row["base"] in bases:
        return model_row["base"]
    return bases[0] if len(bases) == 1 else None


# --------------------------------------------------------------------------------------------
# normalised scores and forgetting


def normalised_scores(suites: pd.DataFrame, models: pd.DataFrame) -> pd.DataFrame:
    """Per (model, domain d, split): ``norm = s(m, d) / s(E_d, d)``.

    Its standard error is the delta-method one,
    ``se_norm = sqrt((se_m / s_E)^2 + (s_m * se_E / s_E^2)^2)`` (zero for ``m = E_d`` itself,
    whose ratio is exactly 1). NaN when the model's or the expert's score is missing or the
    expert scores 0.
    """
    cols = ["model_id", "suite", "split", "score", "stderr", "ref_model_id", "ref_score",
            "ref_stderr", "norm", "norm_stderr"]
    skills = sorted(set(d for ds in models["domains"] for d in ds) | set(
        models.loc[models["role"] == "expert", "domain"].dropna()))
    idx = _index(suites)
    by_domain = _experts_by_domain(models)
    rows = []
    for mid, row in models.iterrows():
        for d in skills:
            ref = expert_for(row, d, models, by_domain)
            for split in SPLITS:
                s, se = _lookup(idx, mid, d, split)
                rs, rse = _lookup(idx, ref, d, split) if ref else (math.nan, math.nan)
                if rs and not math.isnan(rs) and rs > 0:
                    norm = s / rs
                    if ref == mid:
                        nse = 0.0 if not math.isnan(s) else math.nan
                    else:
                        nse = math.sqrt((se / rs) ** 2 + (s * rse / rs**2) ** 2)
                else:
                    norm = nse = math.nan
                if math.isnan(s) and math.isnan(rs):
                    continue
                rows.append([mid, d, split, s, se, ref, rs, rse, norm, nse])
    return pd.DataFrame(rows, columns=cols)


def heldout_deltas(suites: pd.DataFrame, models: pd.DataFrame, heldout: list[str]) -> pd.DataFrame:
    """Per (model, held-out suite h, split): ``delta = s(m, h) - s(B, h)``, in absolute score
    points (negative = forgetting, positive = generalisation beyond the base), with
    ``se = sqrt(se_m^2 + se_B^2)``. The base itself is left out."""
    cols = ["model_id", "suite", "split", "score", "stderr", "base_model_id", "base_score",
            "base_stderr", "delta", "delta_stderr"]
    idx = _index(suites)
    rows = []
    for mid, row in models.iterrows():
        if row["role"] == "base":
            continue
        b = base_for(row, models)
        for h in heldout:
            for split in SPLITS:
                s, se = _lookup(idx, mid, h, split)
                bs, bse = _lookup(idx, b, h, split) if b else (math.nan, math.nan)
                if math.isnan(s) and math.isnan(bs):
                    continue
                rows.append([mid, h, split, s, se, b, bs, bse, s - bs, math.hypot(se, bse)])
    return pd.DataFrame(rows, columns=cols)


def _index(suites: pd.DataFrame) -> dict[tuple, tuple[float, float]]:
    """(model_id, suite, split) -> (score, stderr)."""
    return {
        (m, q, sp): (float(v), float(se) if pd.notna(se) else math.nan)
        for m, q, sp, v, se in zip(suites["model_id"], suites["suite"], suites["split"],
                                   suites["score"], suites["stderr"])
    }


def _lookup(idx: dict, model_id, suite, split) -> tuple[float, float]:
    return idx.get((model_id, suite, split), (math.nan, math.nan))


def mean_normalised(norm: pd.DataFrame, models: pd.DataFrame) -> pd.DataFrame:
    """Per (model, split): ``norm_mean = (1/D) sum_d norm(m, d)`` over the model's own domains
    ``D``, with ``se = sqrt(sum_d se_d^2) / D``. NaN if any of its domains is NaN: a model is
    never averaged over fewer domains than it covers."""
    rows = []
    idx = {(m, q, sp): (v, se) for m, q, sp, v, se in
           zip(norm["model_id"], norm["suite"], norm["split"], norm["norm"], norm["norm_stderr"])}
    for mid, row in models.iterrows():
        ds = row["domains"]
        for split in SPLITS:
            if not ds:
                m = se = math.nan
            else:
                v = np.array([idx.get((mid, d, split), (math.nan, math.nan)) for d in ds], dtype=float)
                m = float(v[:, 0].mean())
                se = float(math.sqrt((v[:, 1] ** 2).sum()) / len(ds))
            rows.append([mid, split, m, se, len(ds)])
    return pd.DataFrame(rows, columns=["model_id", "split", "norm_mean", "norm_mean_stderr", "n_domains"])


# --------------------------------------------------------------------------------------------
# selection


def select_points(candidates: pd.DataFrame, score: str = "norm_val_mean") -> pd.DataFrame:
    """For each sweep (rows sharing :data:`GROUP_COLUMNS`), the point
    ``argmax_p score(p)`` over points with a finite ``score`` (the validation mean normalised
    score); ties go to the smallest ``model_id``. Returns one row per group with
    ``selected_model_id`` (null when no point is eligible), ``n_points``, ``n_eligible``.

    ``candidates`` has one row per merged model with ``model_id``, the group columns and
    ``score``. Test columns are not looked at.
    """
    out = []
    keys = candidates[GROUP_COLUMNS].astype(object).where(candidates[GROUP_COLUMNS].notna(), "")
    for key, g in candidates.groupby([keys[c] for c in GROUP_COLUMNS], sort=True):
        eligible = g[np.isfinite(g[score].astype(float))]
        chosen = None
        if not eligible.empty:
            best = eligible[score].max()
            chosen = sorted(eligible.loc[eligible[score] == best, "model_id"])[0]
        first = g.iloc[0]
        out.append({
            **{c: first[c] for c in GROUP_COLUMNS},
            "n_points": len(g),
            "n_eligible": len(eligible),
            "selected_model_id": chosen,
            "selection_score": float(eligible[score].max()) if chosen else math.nan,
        })
    return pd.DataFrame(out, columns=GROUP_COLUMNS + ["n_points", "n_eligible", "selected_model_id",
                                                      "selection_score"])


def competition_rank(values: pd.Series) -> pd.Series:
    """1 for the highest value; equal values share a rank ("1224"); NaN values get no rank."""
    return values.rank(method="min", ascending=False).astype("Int64")


# --------------------------------------------------------------------------------------------
# Pareto fronts


def pareto_front(x, y) -> np.ndarray:
    """Boolean mask of the non-dominated points (both objectives maximised).

    Point ``i`` is dominated if some ``j`` has ``x_j >= x_i`` and ``y_j >= y_i`` with at least
    one strict inequality; identical points do not dominate each other. Points with a NaN
    coordinate are never on the front.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    front = np.zeros(len(x), dtype=bool)
    for i in np.flatnonzero(ok):
        ge = ok & (x >= x[i]) & (y >= y[i])
        gt = (x > x[i]) | (y > y[i])
        front[i] = not np.any(ge & gt)
    return front
