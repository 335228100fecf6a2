"""What a strategy sees of an evaluated candidate: its validation scores, and nothing else.

**A strategy never receives a test score.** An :class:`Observation` holds a candidate's merge
parameters and its score on each suite on the *validation* split; the only way this package reads
a scores table (:func:`observations_from_scores`, :func:`validation_suite_scores`) drops every row
whose ``split`` is not ``validation`` before looking at anything else, and refuses to be asked for
another split. Test scores are for the leaderboard, which ranks the search's selected candidates on
test like every other method.

A suite's score is computed as the leaderboard computes it
(:func:`mergesweep.aggregate.analysis.suite_scores`): rows with ``status == "ok"`` (when the
column exists), the suite's primary metric (``metrics[suite]`` or the first of
:data:`~mergesweep.aggregate.analysis.METRIC_PREFERENCE` it reports), its primary lm-eval filter
(when the column exists), averaged over the suite's tasks; a NaN among them makes the suite's
score missing. A suite without a score (a failed evaluation) is absent from ``scores``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from mergesweep.search.base import SearchError

if TYPE_CHECKING:
    import pandas as pd

#: the only split a search reads
VALIDATION = "validation"


@dataclass(frozen=True)
class Observation:
    """A candidate's merge ``params`` and its validation ``scores`` (suite -> finite score;
    suites that failed are absent). ``model_id`` (optional) is the merged model's content id."""

    params: Mapping[str, Any]
    scores: Mapping[str, float] = field(default_factory=dict)
    model_id: str | None = None

    def __post_init__(self):
        clean = {}
        for suite, v in dict(self.scores).items():
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
                raise SearchError(f"observation of {self.model_id or dict(self.params)}: score of {suite!r} is {v!r}, not a number")
            v = float(v)
            if math.isfinite(v):
                clean[str(suite)] = v
        object.__setattr__(self, "scores", clean)
        object.__setattr__(self, "params", dict(self.params))

    def to_dict(self) -> dict:
        return {"params": dict(self.params), "scores": dict(self.scores), "model_id": self.model_id}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Observation":
        return cls(params=dict(data["params"]), scores=dict(data.get("scores", {})), model_id=data.get("model_id"))


def _only_validation(split: str) -> None:
    if split != VALIDATION:
        raise SearchError(
            f"a search reads the {VALIDATION!r} split only; {split!r} was asked for "
            f"(test scores are never shown to a search strategy)"
        )


def validation_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a scores table on the validation split (a copy; the rest is never looked at)."""
    for c in ("model_id", "suite", "split"):
        if c not in table.columns:
            raise SearchError(f"scores table: no column {c!r} (columns: {', '.join(map(str, table.columns))})")
    return table.loc[table["split"] == VALIDATION].copy()


def validation_suite_scores(
    table: pd.DataFrame,
    *,
    split: str = VALIDATION,
    metrics: Mapping[str, str] | None = None,
    model_ids: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per (model_id, suite): ``score`` on the validation split (see the module
    docstring). ``split`` exists only to be refused when it is not ``"validation"``."""
    import pandas as pd

    _only_validation(split)
    rows = validation_rows(table)
    if model_ids is not None:
        rows = rows[rows["model_id"].isin(list(model_ids))]
    for c in ("metric", "value"):
        if c not in rows.columns:
            raise SearchError(f"scores table: no column {c!r}")
    if "status" in rows.columns:
        rows = rows[rows["status"] == "ok"]
    cols = ["model_id", "suite", "score"]
    if rows.empty:
        return pd.DataFrame(columns=cols)
    from mergesweep.aggregate.analysis import METRIC_PREFERENCE, primary_filter

    metrics = dict(metrics or {})
    chosen = {}
    for suite, group in rows.groupby("suite", sort=True):
        available = sorted(group["metric"].dropna().unique())
        if suite in metrics:
            chosen[suite] = metrics[suite]
        elif available:
            chosen[suite] = next((m for m in METRIC_PREFERENCE if m in available), available[0])
    rows = rows[rows["metric"].to_numpy(dtype=object) == rows["suite"].map(chosen).to_numpy(dtype=object)]
    if "filter" in rows.columns and not rows.empty:
        wanted = rows.groupby("suite")["filter"].apply(lambda f: primary_filter(f))
        want = rows["suite"].map(wanted).to_numpy(dtype=object)
        have = rows["filter"].to_numpy(dtype=object)
        rows = rows[np.where(pd.isna(want), pd.isna(have), have == want)]
    if rows.empty:
        return pd.DataFrame(columns=cols)
    value = rows["value"].astype(float)
    g = rows.assign(_v=value, _nan=value.isna()).groupby(["model_id", "suite"], sort=True)
    out = g.agg(score=("_v", "mean"), nan=("_nan", "any")).reset_index()
    # a NaN among a suite's tasks makes the suite's score NaN (as the leaderboard's suite_scores)
    out.loc[out["nan"], "score"] = float("nan")
    return out[cols]


def observations_from_scores(
    table: pd.DataFrame,
    candidates: Mapping[str, Mapping[str, Any]],
    suites: Sequence[str],
    *,
    split: str = VALIDATION,
    metrics: Mapping[str, str] | None = None,
) -> list[Observation]:
    """One :class:`Observation` per candidate (``model_id -> merge params``, in that order) with
    its validation score on each of ``suites`` (missing where the table has none). Rows of any
    other split are dropped before anything else is read; asking for another ``split`` raises."""
    _only_validation(split)
    scores = validation_suite_scores(table, metrics=metrics, model_ids=list(candidates))
    wanted = set(suites)
    by_model: dict[str, dict[str, float]] = {}
    for mid, suite, score in scores.itertuples(index=False):
        if suite in wanted:
            by_model.setdefault(mid, {})[suite] = score
    return [Observation(params=dict(params), scores=by_model.get(mid, {}), model_id=mid)
            for mid, params in candidates.items()]


def reference_scores(table: pd.DataFrame, expert_of_suite: Mapping[str, str], *, split: str = VALIDATION,
                     metrics: Mapping[str, str] | None = None) -> dict[str, float]:
    """``suite -> validation score of that suite's expert`` (the objective's normalisation)."""
    _only_validation(split)
    scores = validation_suite_scores(table, metrics=metrics, model_ids=list(set(expert_of_suite.values())))
    out = {}
    for mid, suite, score in scores.itertuples(index=False):
        if expert_of_suite.get(suite) == mid and math.isfinite(score):
            out[suite] = float(score)
    return out
