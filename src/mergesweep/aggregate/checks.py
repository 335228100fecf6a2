"""What a score may be: the one table of metric ranges, and the checks of evaluation rows and of
the scores table built from them.

A value outside its metric's range, an infinite value, a negative stderr or sample count, a
missing value in an ``ok`` row and a duplicated row are not data: they stop ``aggregate`` and
``leaderboard`` with a message naming the file, the row and the metric, before anything is
written (docs/report.md, "Inputs that are refused").
"""

from __future__ import annotations

import fnmatch
import functools
import math
from collections.abc import Iterable

import numpy as np
import pandas as pd

INF = math.inf

#: metric name (or fnmatch pattern) -> (lowest, highest) possible value, both inclusive. The first
#: matching entry wins; a metric not listed may take any finite value.
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "acc": (0.0, 1.0),
    "acc_norm": (0.0, 1.0),
    "acc_mutual_info": (0.0, 1.0),
    "exact_match": (0.0, 1.0),
    "f1": (0.0, 1.0),
    "em": (0.0, 1.0),
    "brier_score": (0.0, 2.0),
    "mcc": (-1.0, 1.0),
    "pass@*": (0.0, 1.0),
    "*_acc": (0.0, 1.0),  # ifeval: prompt_level_strict_acc, inst_level_loose_acc, ...
    "perplexity": (1.0, INF),
    "word_perplexity": (1.0, INF),
    "byte_perplexity": (1.0, INF),
    "bits_per_byte": (0.0, INF),
    "bleu": (0.0, 100.0),
    "chrf": (0.0, 100.0),
}

#: columns that identify one row of the scores table: a suite of several lm-eval tasks has one
#: row per lm-eval task, a metric reported under two filters one row per filter
ROW_KEY = ["model_id", "suite", "task", "lm_eval_task", "metric", "filter", "split"]


@functools.lru_cache(maxsize=1024)
def metric_range(metric: str) -> tuple[float, float]:
    """The possible values of ``metric`` (``(-inf, inf)`` for a metric not in the table)."""
    for pattern, rng in METRIC_RANGES.items():
        if fnmatch.fnmatchcase(metric, pattern):
            return rng
    return (-INF, INF)


def _fmt(x) -> str:
    return repr(x) if isinstance(x, str) else f"{x:g}" if isinstance(x, float) else str(x)


def value_problem(metric: str, value, stderr, n) -> str | None:
    """What is impossible about one ``ok`` row, or None. ``value`` must be a finite number in the
    metric's range; ``stderr`` missing (NaN/None: lm-eval reports none for some aggregations)
    or finite and >= 0; ``n`` missing or >= 0."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"value {_fmt(value)} of {metric!r} is not a number"
    if math.isnan(value):
        return f"value of {metric!r} is missing (NaN) in an ok evaluation"
    if math.isinf(value):
        return f"value of {metric!r} is {value}"
    lo, hi = metric_range(metric)
    if not lo <= value <= hi:
        return f"value {value:g} of {metric!r} is outside its range [{lo:g}, {hi:g}]"
    if stderr is not None and not (isinstance(stderr, float) and math.isnan(stderr)):
        if isinstance(stderr, bool) or not isinstance(stderr, (int, float)):
            return f"stderr {_fmt(stderr)} of {metric!r} is not a number"
        if math.isinf(stderr):
            return f"stderr of {metric!r} is {stderr}"
        if stderr < 0:
            return f"stderr {stderr:g} of {metric!r} is negative"
    if n is not None and not (isinstance(n, float) and math.isnan(n)):
        if isinstance(n, bool) or not isinstance(n, (int, float)) or n != int(n):
            return f"n {_fmt(n)} of {metric!r} is not a whole number"
        if n < 0:
            return f"n {int(n)} of {metric!r} is negative"
    return None


def _py(x):
    """A pandas cell as a plain Python value (NA -> None)."""
    if x is None or x is pd.NA:
        return None
    if hasattr(x, "item"):
        return x.item()
    return x


def _origin(row: pd.Series) -> str:
    where = row.get("eval_file")
    ident = (f"model {row['model_id']!r}, suite {row['suite']!r}, "
             f"lm-eval task {_py(row.get('lm_eval_task'))!r}, metric {_py(row['metric'])!r}, "
             f"filter {_py(row.get('filter'))!r}, split {_py(row['split'])!r}")
    return f"{ident}, from {where}" if isinstance(where, str) and where else ident


def check_scores(df: pd.DataFrame, source: str, *, inputs: Iterable[str] | None = None) -> None:
    """Refuse a scores table that must not be published; raise ``ScoresError`` naming ``source``.

    Refused: no rows; no ``ok`` row (every evaluation failed: the message lists some errors);
    a duplicated row (:data:`ROW_KEY`); an ``ok`` row whose value, stderr or n is impossible
    (:func:`value_problem`)."""
    from mergesweep.aggregate.scores import ScoresError

    if df.empty:
        what = f" (from {', '.join(inputs)})" if inputs else ""
        raise ScoresError(f"{source}: the scores table has no rows{what}; nothing is written")
    is_ok = (df["status"] == "ok").to_numpy(dtype=bool)
    if not is_ok.any():
        errs = df.drop_duplicates(["model_id", "suite"]).head(3)
        examples = "; ".join(f"{r.model_id}/{r.suite}: {r.error}" for r in errs.itertuples())
        raise ScoresError(f"{source}: no evaluation succeeded ({len(df)} error rows, e.g. {examples}); "
                          "nothing is written")
    dup = _duplicated(df, ROW_KEY)
    if dup.any():
        first = df[dup].iloc[0]
        same = pd.Series(True, index=df.index)
        for c in ROW_KEY:
            v = first[c]
            same &= df[c].isna() if _py(v) is None else (df[c] == v).fillna(False).astype(bool)
        files = sorted({str(f) for f in df.loc[same, "eval_file"].dropna()}) if "eval_file" in df else []
        raise ScoresError(f"{source}: duplicated row ({_origin(first)}) appears {int(same.sum())} times"
                          + (f", in {', '.join(files)}" if files else ""))
    ok = df.loc[is_ok, ["metric", "value", "stderr", "n"]]  # only what the value checks read
    bad = _impossible(ok)
    for i in np.flatnonzero(is_ok)[bad.to_numpy()]:  # the first row whose problem has a message
        row = df.iloc[i]
        if not isinstance(_py(row["metric"]), str):
            raise ScoresError(f"{source}: ok row without a metric ({_origin(row)})")
        problem = value_problem(row["metric"], _py(row["value"]), _py(row["stderr"]), _py(row["n"]))
        if problem:
            raise ScoresError(f"{source}: {problem} ({_origin(row)})")


def _duplicated(df: pd.DataFrame, columns: list[str]) -> pd.Series:
    """Rows whose values in ``columns`` occur more than once (nulls equal to each other), via
    one integer key per row (each column's codes combined; re-coded before they could overflow)."""
    key = np.zeros(len(df), dtype=np.int64)
    size = 1
    for c in columns:
        codes, uniques = pd.factorize(df[c], use_na_sentinel=True)
        n = len(uniques) + 1
        if size * n >= 2**62:
            key, uniq = pd.factorize(key)
            size = len(uniq)
        key = key * n + (codes.astype(np.int64) + 1)
        size *= n
    return pd.Series(pd.Series(key).duplicated(keep=False).to_numpy(), index=df.index)


def _impossible(ok: pd.DataFrame) -> pd.Series:
    """Rows :func:`value_problem` may refuse, found column-wise (a superset: each is re-checked
    with :func:`value_problem`, which words the message)."""
    value = pd.to_numeric(ok["value"], errors="coerce").astype(float)
    stderr = pd.to_numeric(ok["stderr"], errors="coerce").astype(float)
    n = pd.to_numeric(ok["n"], errors="coerce").astype(float)
    bad = ok["metric"].isna() | ~np.isfinite(value) | (ok["value"].notna() & value.isna())
    bad |= np.isinf(stderr) | (stderr < 0) | (ok["stderr"].notna() & stderr.isna())
    bad |= (n < 0) | (n != np.floor(n)) & n.notna() | (ok["n"].notna() & n.isna())
    for metric in ok["metric"].dropna().unique():
        lo, hi = metric_range(str(metric))
        m = (ok["metric"] == metric).to_numpy()
        bad |= m & ((value < lo) | (value > hi))
    return bad
