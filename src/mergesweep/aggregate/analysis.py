"""The formulas of the leaderboard: suite scores, normalised scores, forgetting, selection and
Pareto fronts. Pure functions on DataFrames; no I/O.

Notation: ``s(m, q, split)`` is the score of model ``m`` on suite ``q`` for a split (the mean of
the suite's tasks on the suite's primary metric), ``se`` its standard error, ``E_d`` the expert of
domain ``d`` (the expert whose ``domain`` is ``d``), ``B`` the base model.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping

import numpy as np
import pandas as pd

from mergesweep.aggregate.scores import ScoresError
from mergesweep.ids import MERGE_ID_PATTERN

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

#: How searches enter the selection (shown only for a run that has searches).
SEARCH_RULE = (
    "Each search (MAP, CMA-ES, CycleQD over a base method's parameters) is one more method, named by "
    "its label: its candidates are selected on validation exactly like a sweep's points (highest mean "
    "normalised validation score, ties to the smallest model id), whatever objective the search itself "
    "optimised, and the selected candidate is ranked on test with every other method's selected point. "
    "A grid merge that a search also proposed is a point of both; a merge that only a search planned is "
    "not a point of its base method's sweep."
)


# --------------------------------------------------------------------------------------------
# suite scores


def primary_metrics(scores: pd.DataFrame, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The metric each suite is scored on: an override, else the first of
    :data:`METRIC_PREFERENCE` the suite reports, else its alphabetically first metric."""
    overrides = dict(overrides or {})
    ok = scores.loc[(scores["status"] == "ok") & scores["metric"].notna(), ["suite", "metric"]].drop_duplicates()
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
    # only the columns used: the table has a million rows at sweep scale
    used = ["model_id", "suite", "split", "metric", "filter", "value", "stderr", "n"]
    ok = scores.loc[(scores["status"] == "ok") & scores["split"].notna(), used]
    # per-suite lookups through the suite's code (a map over a million rows is slow)
    codes, suites = pd.factorize(ok["suite"])
    want_metric = np.array([metrics.get(q) for q in suites] + [None], dtype=object)[codes]
    ok = ok[ok["metric"].to_numpy(dtype=object) == want_metric]
    cols = ["model_id", "suite", "split", "score", "stderr", "n", "n_tasks"]
    if ok.empty:
        return pd.DataFrame(columns=cols)
    wanted = ok[["suite", "filter"]].drop_duplicates().groupby("suite")["filter"].apply(primary_filter)
    codes, suites = pd.factorize(ok["suite"])
    want = np.array([wanted.get(q) for q in suites], dtype=object)[codes]
    filters = ok["filter"].to_numpy(dtype=object)
    want_none = pd.isna(want)
    ok = ok[np.where(want_none, pd.isna(filters), filters == want)]

    ok = ok.assign(
        _v=ok["value"].astype(float).fillna(0.0),
        _vnan=ok["value"].isna().astype(int),
        _se2=ok["stderr"].astype(float).fillna(0.0) ** 2,
        _senan=ok["stderr"].isna().astype(int),
        _n=ok["n"].astype("Float64"),
        _one=1,
    )
    # grouped by one integer per (model_id, suite, split), in the keys' sorted order (faster than
    # grouping a million rows by three text columns; the same groups, rows and order)
    key = np.zeros(len(ok), dtype=np.int64)
    levels = []
    for c in ("model_id", "suite", "split"):
        codes, uniques = pd.factorize(ok[c], sort=True)
        key = key * len(uniques) + codes
        levels.append(uniques)
    g = ok.groupby(key, sort=True)
    agg = g[["_v", "_vnan", "_se2", "_senan", "_one"]].sum()
    agg["n"] = g["_n"].sum(min_count=1)
    k = agg["_one"].astype(float)
    rest = agg.index.to_numpy()
    parts = []
    for uniques in reversed(levels):
        parts.append(np.asarray(uniques, dtype=object)[rest % len(uniques)])
        rest = rest // len(uniques)
    model_id, suite, split = reversed(parts)
    return pd.DataFrame({
        "model_id": model_id, "suite": suite, "split": split,
        "score": np.where(agg["_vnan"] > 0, np.nan, agg["_v"] / k),
        "stderr": np.where(agg["_senan"] > 0, np.nan, np.sqrt(agg["_se2"]) / k),
        "n": agg["n"].astype("Int64").to_numpy(),
        "n_tasks": agg["_one"].astype(int).to_numpy(),
    }, columns=cols)


#: roles evaluated on their own ``domain`` only (a task reverted from a reversible merge is
#: compared with its expert on that task, and on nothing else)
DOMAIN_ONLY_ROLES = ("reverted",)


def failures(scores: pd.DataFrame) -> pd.DataFrame:
    """Every failed (model, suite) evaluation, and every (model, suite) pair that has no
    evaluation at all (``status="missing"``) although the suite was evaluated for other models.
    A model of :data:`DOMAIN_ONLY_ROLES` is expected on its domain only."""
    cols = ["model_id", "role", "method", "params", "suite", "status", "error"]
    err = scores.loc[scores["status"] == "error", cols].drop_duplicates(["model_id", "suite"])
    scores = scores[["model_id", "role", "method", "params", "domain", "suite"]]
    pairs = scores[["model_id", "suite"]].drop_duplicates()
    have = set(zip(pairs["model_id"], pairs["suite"]))
    models = scores.drop_duplicates("model_id").set_index("model_id")
    suites = sorted(scores["suite"].unique())

    def expected(m) -> list[str]:
        if models.at[m, "role"] in DOMAIN_ONLY_ROLES:
            d = models.at[m, "domain"]
            return [d] if isinstance(d, str) else []
        return suites

    missing = [
        {"model_id": m, "role": models.at[m, "role"], "method": models.at[m, "method"],
         "params": models.at[m, "params"], "suite": s, "status": "missing",
         "error": "no evaluation file for this (model, suite)"}
        for m in models.index
        for s in expected(m)
        if (m, s) not in have
    ] if len(have) < len(models) * len(suites) else []
    out = pd.concat([err, pd.DataFrame(missing, columns=cols)], ignore_index=True)
    return out.sort_values(["model_id", "suite"], kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# models


def models_table(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per model with its metadata and ``domains``: the skills it is meant to cover.

    An expert, and a task reverted from a reversible merge, covers its ``domain``; a merge covers
    the domains of its experts (looked up by model id); the base covers every skill suite.
    """
    first = scores.drop_duplicates("model_id").set_index("model_id")
    meta = first[["role", "method", "params", "base", "experts", "domain", "align", "source",
                  "fingerprint", "merge_runtime_s", "merge_peak_rss_mb"]].copy()
    per_eval = scores.drop_duplicates(["model_id", "suite"]).groupby("model_id")
    cost = pd.DataFrame({"eval_runtime_s": per_eval["runtime_s"].sum(min_count=1),
                         "eval_peak_rss_mb": per_eval["peak_rss_mb"].max()})
    meta = meta.join(cost)
    skills = sorted(scores.loc[scores["suite_role"] == "skill", "suite"].unique())
    expert_domain = meta.loc[meta["role"] == "expert", "domain"].to_dict()

    def domains(model_id, role, domain, experts) -> list[str]:
        if role == "expert" or role in DOMAIN_ONLY_ROLES:
            return [domain] if isinstance(domain, str) else []
        if role == "merged":
            ids = json.loads(experts or "[]")
            found = [expert_domain[e] for e in ids if isinstance(expert_domain.get(e), str)]
            unknown = [e for e in ids if e not in expert_domain]
            if unknown:
                log.warning("merged model %s: expert(s) %s have no evaluations; their domains "
                            "are unknown", model_id, ", ".join(unknown))
            return list(dict.fromkeys(found))
        return list(skills)

    meta["domains"] = [domains(*r) for r in zip(meta.index, meta["role"], meta["domain"], meta["experts"])]
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
    model's; a reverted model's own expert is the one it reverts)."""
    own = _own_experts(pd.DataFrame([model_row], columns=["role", "experts", "source"]))[0]
    return _expert_of(model_row.name, model_row["role"], model_row["domain"], own, domain,
                      by_domain if by_domain is not None else _experts_by_domain(models))


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


#: a reverted model's id, ``<merge id>--<expert name>`` (:func:`mergesweep.ids.reverted_model_id`)
_REVERTED_ID = re.compile(rf"({MERGE_ID_PATTERN})--(.+)")


def revert_source(source, model_id=None) -> tuple[str | None, str | None]:
    """``(merge id, task)`` of a reverted model from its ``source`` column (the JSON of
    ``{"type": "revert", "merge": <merge id>, "task": <expert name>}``), else from its id
    (``<merge id>--<expert name>``); ``(None, None)`` when neither says."""
    try:
        doc = json.loads(source) if isinstance(source, str) else None
    except json.JSONDecodeError:
        doc = None
    if isinstance(doc, Mapping) and doc.get("type") == "revert":
        merge, task = doc.get("merge"), doc.get("task")
        if isinstance(merge, str) and isinstance(task, str):
            return merge, task
    m = _REVERTED_ID.fullmatch(model_id) if isinstance(model_id, str) else None
    return (m.group(1), m.group(2)) if m else (None, None)


def _own_experts(models: pd.DataFrame) -> list[list[str]]:
    """Each model's experts (JSON list), parsed once. A reverted model's own expert is the one
    it reverts (its source's ``task``): it is normalised by that expert, not by the merge's
    first expert of the domain."""
    out = []
    for model_id, role, experts, source in zip(models.index, models["role"], models["experts"], models["source"]):
        task = revert_source(source, model_id)[1] if role == "reverted" else None
        out.append([task] if task else json.loads(experts or "[]") if isinstance(experts, str) else [])
    return out


def _expert_of(model_id, role, domain, own: list[str], d: str, by_domain: dict[str, list[str]]) -> str | None:
    """:func:`expert_for` on plain values."""
    if role == "expert" and domain == d:
        return model_id
    experts = by_domain.get(d, [])
    mine = [e for e in own if e in experts]
    if mine:
        return mine[0]
    return experts[0] if len(experts) == 1 else None


def _scores_of(suites: pd.DataFrame, model_ids, suite_names, splits, value: str = "score",
               error: str = "stderr") -> tuple[np.ndarray, np.ndarray]:
    """(value, error) columns of ``suites`` for each (model_id, suite, split) triple; NaN where
    there is no such row."""
    idx = pd.MultiIndex.from_frame(suites[["model_id", "suite", "split"]])
    pos = idx.get_indexer(pd.MultiIndex.from_arrays([np.asarray(model_ids, dtype=object),
                                                    np.asarray(suite_names, dtype=object),
                                                    np.asarray(splits, dtype=object)]))
    score = pd.to_numeric(suites[value], errors="coerce").astype(float).to_numpy()
    stderr = pd.to_numeric(suites[error], errors="coerce").astype(float).to_numpy()
    found = pos >= 0
    out_s = np.full(len(pos), np.nan)
    out_se = np.full(len(pos), np.nan)
    out_s[found] = score[pos[found]]
    out_se[found] = stderr[pos[found]]
    return out_s, out_se


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
    by_domain = _experts_by_domain(models)
    mids, doms, refs, splits = _per_split(
        (mid, d, _expert_of(mid, role, domain, own, d, by_domain))
        for mid, role, domain, own in zip(models.index, models["role"], models["domain"], _own_experts(models))
        for d in skills)
    s, se = _scores_of(suites, mids, doms, splits)
    rs, rse = _scores_of(suites, refs, doms, splits)
    is_ref = np.array([r == m for r, m in zip(refs, mids)], dtype=bool)
    usable = np.isfinite(rs) & (rs > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.where(usable, s / rs, np.nan)
        nse = np.where(is_ref, np.where(np.isnan(s), np.nan, 0.0),
                       np.sqrt((se / rs) ** 2 + (s * rse / rs**2) ** 2))
    nse = np.where(usable, nse, np.nan)
    keep = ~(np.isnan(s) & np.isnan(rs))
    out = pd.DataFrame({"model_id": mids, "suite": doms, "split": splits, "score": s, "stderr": se,
                        "ref_model_id": refs, "ref_score": rs, "ref_stderr": rse, "norm": norm,
                        "norm_stderr": nse}, columns=cols)
    return out[keep].reset_index(drop=True)


def _per_split(triples) -> tuple[list, list, list, list]:
    """(model, suite, reference) triples -> four parallel lists, one entry per split of SPLITS."""
    mids, suites, refs, splits = [], [], [], []
    for mid, suite, ref in triples:
        for split in SPLITS:
            mids.append(mid)
            suites.append(suite)
            refs.append(ref)
            splits.append(split)
    return mids, suites, refs, splits


def heldout_deltas(suites: pd.DataFrame, models: pd.DataFrame, heldout: list[str]) -> pd.DataFrame:
    """Per (model, held-out suite h, split): ``delta = s(m, h) - s(B, h)``, in absolute score
    points (negative = forgetting, positive = generalisation beyond the base), with
    ``se = sqrt(se_m^2 + se_B^2)``. The base itself is left out."""
    cols = ["model_id", "suite", "split", "score", "stderr", "base_model_id", "base_score",
            "base_stderr", "delta", "delta_stderr"]
    bases = list(models.index[models["role"] == "base"])
    only = bases[0] if len(bases) == 1 else None
    base_set = set(bases)
    mids, hs, bs, splits = _per_split(
        (mid, h, base if isinstance(base, str) and base in base_set else only)
        for mid, role, base in zip(models.index, models["role"], models["base"]) if role != "base"
        for h in heldout)
    s, se = _scores_of(suites, mids, hs, splits)
    b_s, b_se = _scores_of(suites, bs, hs, splits)
    keep = ~(np.isnan(s) & np.isnan(b_s))
    out = pd.DataFrame({"model_id": mids, "suite": hs, "split": splits, "score": s, "stderr": se,
                        "base_model_id": bs, "base_score": b_s, "base_stderr": b_se, "delta": s - b_s,
                        "delta_stderr": np.hypot(se, b_se)}, columns=cols)
    return out[keep].reset_index(drop=True)


def mean_normalised(norm: pd.DataFrame, models: pd.DataFrame) -> pd.DataFrame:
    """Per (model, split): ``norm_mean = (1/D) sum_d norm(m, d)`` over the model's own domains
    ``D``, with ``se = sqrt(sum_d se_d^2) / D``. NaN if any of its domains is NaN: a model is
    never averaged over fewer domains than it covers."""
    cols = ["model_id", "split", "norm_mean", "norm_mean_stderr", "n_domains"]
    ids = list(models.index)
    domains = list(models["domains"])
    n_dom = np.array([len(ds) for ds in domains], dtype=int)
    mean = np.full((len(ids), len(SPLITS)), np.nan)
    se = np.full((len(ids), len(SPLITS)), np.nan)
    for D in sorted(set(n_dom) - {0}):
        rows = np.flatnonzero(n_dom == D)
        for k, split in enumerate(SPLITS):
            m_ids = [ids[i] for i in rows for _ in range(D)]
            doms = [d for i in rows for d in domains[i]]
            v, e = _scores_of(norm, m_ids, doms, [split] * len(m_ids), "norm", "norm_stderr")
            v, e = v.reshape(len(rows), D), e.reshape(len(rows), D)
            # the same reductions, in the same order, as numpy over each model's own row
            mean[rows, k] = v.mean(axis=1)
            se[rows, k] = np.sqrt((e**2).sum(axis=1)) / D
    return pd.DataFrame({
        "model_id": np.repeat(np.asarray(ids, dtype=object), len(SPLITS)),
        "split": np.tile(np.asarray(SPLITS, dtype=object), len(ids)),
        "norm_mean": mean.ravel(),
        "norm_mean_stderr": se.ravel(),
        "n_domains": np.repeat(n_dom, len(SPLITS)),
    }, columns=cols)


# --------------------------------------------------------------------------------------------
# selection


def select_points(candidates: pd.DataFrame, score: str = "norm_val_mean",
                  group_columns: list[str] | None = None) -> pd.DataFrame:
    """For each sweep (rows sharing :data:`GROUP_COLUMNS`, or ``group_columns``), the point
    ``argmax_p score(p)`` over points with a finite ``score`` (the validation mean normalised
    score); ties go to the smallest ``model_id``. Returns one row per group with
    ``selected_model_id`` (null when no point is eligible), ``n_points``, ``n_eligible``.

    ``candidates`` has one row per merged model of a group with ``model_id``, the group columns
    and ``score`` (a model may be a point of several groups: a grid merge that a search also
    proposed is a row of each). Test columns are not looked at.
    """
    group_columns = list(GROUP_COLUMNS if group_columns is None else group_columns)
    cols = group_columns + ["n_points", "n_eligible", "selected_model_id", "selection_score"]
    if candidates.empty:
        return pd.DataFrame(columns=cols)
    keys = candidates[group_columns].astype(object).where(candidates[group_columns].notna(), "")
    values = candidates[score].astype(float)
    frame = keys.assign(_eligible=np.isfinite(values).to_numpy(), _pos=np.arange(len(candidates)))
    by = frame.groupby(group_columns, sort=True)
    out = by.agg(n_points=("_pos", "size"), n_eligible=("_eligible", "sum"), _first=("_pos", "min"))
    # the best eligible point of each sweep: highest score, then smallest model id
    eligible = frame[frame["_eligible"]].assign(_score=values[frame["_eligible"].to_numpy()].to_numpy(),
                                               _id=candidates["model_id"].to_numpy()[frame["_eligible"].to_numpy()])
    best = eligible.sort_values(["_score", "_id"], ascending=[False, True], kind="stable").drop_duplicates(
        group_columns).set_index(group_columns)
    out = out.join(best[["_id", "_score"]])
    first = candidates.iloc[out["_first"].to_numpy()]
    return pd.DataFrame({
        **{c: first[c].to_numpy() for c in group_columns},
        "n_points": out["n_points"].to_numpy(dtype=int),
        "n_eligible": out["n_eligible"].to_numpy(dtype=int),
        "selected_model_id": [m if isinstance(m, str) else None for m in out["_id"]],
        "selection_score": out["_score"].to_numpy(dtype=float),
    }, columns=cols)


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

    O(n log n): sorted by x descending (then y descending), a point is dominated exactly when a
    point of strictly larger x has y at least as large (the running maximum of y before its
    group of equal x), or a point of equal x has a strictly larger y (its group's first y).
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    front = np.zeros(len(x), dtype=bool)
    ok = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    if not len(ok):
        return front
    xs, ys = x[ok], y[ok]
    order = np.lexsort((-ys, -xs))
    xs, ys = xs[order], ys[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(xs)]))
    best_before = np.full(len(starts), -np.inf)  # max y over strictly larger x
    best_before[1:] = np.maximum.accumulate(ys)[starts[1:] - 1]
    dominated = (best_before[group] >= ys) | (ys[starts][group] > ys)
    front[ok[order]] = ~dominated
    return front
