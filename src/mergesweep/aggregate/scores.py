"""The long scores table: one row per (model, suite, task, metric, split).

``results/tables/scores.parquet`` is built from the per-(model, suite) evaluation JSONs written by
``mergesweep evaluate`` (format in docs/ARCHITECTURE.md). It is the single input of everything
downstream: ``mergesweep leaderboard`` regenerates every other table, the markdown leaderboard and
the report from it alone. The provenance of the run (config hash, checkpoints, versions) travels
inside the parquet file as schema metadata, so the file is self-describing.

A failed evaluation (``"status": "error"``) is not dropped: it becomes one row per
(model, suite) with ``status="error"``, the ``error`` message, ``task = suite``,
``metric = split = None`` and ``value = NaN``, so the failure shows up in every table.

Inputs that cannot be data are refused with a message naming the file, the row and the metric
(:mod:`mergesweep.aggregate.checks`): a value outside its metric's range or infinite, a negative
stderr or n, a duplicated row, a file whose directory is not its ``model_id`` or whose name is
not its ``suite`` (``results/evals/<model_id>/<suite>.json``), a malformed model record.
"""

from __future__ import annotations

import json
import logging
import math
import operator
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mergesweep.aggregate.checks import ROW_KEY, check_scores, metric_range, value_problem
from mergesweep.aggregate.files import publish
from mergesweep.atomic import atomic_file
from mergesweep.errors import MergesweepError
from mergesweep.record import ROLES, ModelRecord, RecordError

log = logging.getLogger(__name__)

#: Parquet schema-metadata key holding the run's provenance JSON.
PROVENANCE_KEY = b"mergesweep.provenance"
#: Parquet schema-metadata key holding the table's format version.
FORMAT_KEY = b"mergesweep.scores_format"
#: Parquet schema-metadata key holding the run's searches (:mod:`mergesweep.aggregate.searches`);
#: absent when the run has none.
SEARCHES_KEY = b"mergesweep.searches"
FORMAT_VERSION = "1"

#: Column -> Arrow type of ``scores.parquet``, in order. Model-level columns come from the
#: model's ``mergesweep.json`` (the ``model`` object of the evaluation JSON); ``merge_*`` are the
#: merge's own cost (merged models only); ``runtime_s``/``peak_rss_mb``/``device`` are the cost of
#: the (model, suite) evaluation and repeat on each of its rows.
SCORE_SCHEMA = pa.schema(
    [
        ("model_id", pa.string()),
        ("role", pa.string()),  # base | expert | merged | reverted (mergesweep.record.ROLES)
        ("method", pa.string()),  # merge method (merged models), else null
        ("params", pa.string()),  # canonical JSON object of the merge hyperparameters ("{}" if none)
        ("base", pa.string()),  # model id of the merge's base (merged models)
        ("experts", pa.string()),  # JSON list of input expert model ids, in merge order
        ("domain", pa.string()),  # experts: the skill (= suite) the expert was trained for
        ("align", pa.string()),  # JSON of the alignment used by a merge, else null
        ("source", pa.string()),  # base/experts: where the checkpoint came from
        ("fingerprint", pa.string()),  # content fingerprint of the checkpoint
        ("suite", pa.string()),
        ("suite_role", pa.string()),  # skill (a domain with an expert) | heldout
        ("task", pa.string()),  # as the evaluation file names it (the suite, for embedded suites)
        ("lm_eval_task", pa.string()),  # the lm-eval task behind the row (e.g. ms_arithmetic_test)
        ("metric", pa.string()),
        ("filter", pa.string()),  # lm-eval filter of the metric ("none" unless the task filters)
        ("split", pa.string()),  # validation | test
        ("value", pa.float64()),
        ("stderr", pa.float64()),
        ("n", pa.int64()),
        ("status", pa.string()),  # ok | error
        ("error", pa.string()),
        ("runtime_s", pa.float64()),  # evaluation of (model, suite)
        ("peak_rss_mb", pa.float64()),  # evaluation of (model, suite)
        ("device", pa.string()),
        ("merge_runtime_s", pa.float64()),  # the merge that produced the model
        ("merge_peak_rss_mb", pa.float64()),
        ("num_fewshot", pa.int64()),
        ("chat_template", pa.bool_()),
        ("task_version", pa.string()),
        ("versions", pa.string()),  # JSON of the evaluation's package versions
        ("model_versions", pa.string()),  # JSON of the versions that built the model
        ("eval_file", pa.string()),  # the evaluation JSON the row came from
    ]
)
SCORE_COLUMNS = list(SCORE_SCHEMA.names)

MODEL_COLUMNS = [
    "role",
    "method",
    "params",
    "base",
    "experts",
    "domain",
    "align",
    "source",
    "fingerprint",
    "merge_runtime_s",
    "merge_peak_rss_mb",
    "model_versions",
]


class EvalFileError(MergesweepError, ValueError):
    """An evaluation JSON is unreadable or violates the format; the message names the file."""


class ScoresError(MergesweepError, ValueError):
    """scores.parquet is missing, unreadable or lacks a column; the message names file/column."""


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _float(x: Any) -> float:
    """A float, NaN for null / "N/A" / non-numbers (lm-eval writes "N/A" for missing stderr)."""
    if x is None or isinstance(x, bool):
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _int(x: Any) -> int | None:
    f = _float(x)
    return None if math.isnan(f) else int(f)


def _str(x: Any) -> str | None:
    if x is None:
        return None
    if isinstance(x, str):
        return x
    if type(x) is int or (type(x) is float and math.isfinite(x)):
        return repr(x)  # what json.dumps writes for a number, without its overhead
    return _json(x)


def _load(path_or_dict: str | Path | Mapping) -> tuple[dict, str]:
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict), "<dict>"
    path = Path(path_or_dict)
    try:
        return json.loads(path.read_text()), str(path)
    except FileNotFoundError as e:
        raise EvalFileError(f"{path}: evaluation file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalFileError(f"{path}: not valid JSON ({e})") from e


def model_record(block: Any, where: str) -> ModelRecord | None:
    """The evaluated model's record, as the evaluation JSON carries it (``model``: the model's
    ``mergesweep.json``), read through :class:`mergesweep.record.ModelRecord` - the one way the
    aggregation reads a model's record and fingerprint. ``None`` for an absent or empty block
    (an evaluation that failed before reading it)."""
    if block is None or (isinstance(block, Mapping) and not block):
        return None
    if not isinstance(block, Mapping):
        raise EvalFileError(f"{where}: key 'model' must be an object (the model's mergesweep.json)")
    try:
        return ModelRecord.from_dict(dict(block), f"{where}: 'model'")
    except RecordError as e:
        raise EvalFileError(str(e)) from None


def check_eval_path(path: Path, model_id: str, suite: str) -> None:
    """An evaluation file lives at ``<evals>/<model_id>/<suite>.json``."""
    if path.parent.name != model_id:
        raise EvalFileError(f"{path}: its directory {path.parent.name!r} does not match its model_id "
                            f"{model_id!r} (expected .../{model_id}/{suite}.json)")
    if path.stem != suite:
        raise EvalFileError(f"{path}: its file name {path.name!r} does not match its suite {suite!r} "
                            f"(expected .../{model_id}/{suite}.json)")


#: columns that vary within one evaluation file (one value per result row); every other column
#: of :data:`SCORE_SCHEMA` is the same on every row of a file
ROW_COLUMNS = ["task", "lm_eval_task", "metric", "filter", "split", "value", "stderr", "n", "status", "error",
               "num_fewshot", "task_version"]
#: the order of a file's rows (and, with role, model and suite, of the whole table); null first
ROW_ORDER = ["task", "lm_eval_task", "metric", "filter", "split"]
#: the positions in a row tuple of :data:`ROW_KEY`'s columns (model and suite are the file's)
_FILE_KEY = [ROW_COLUMNS.index(c) for c in ROW_KEY if c in ROW_COLUMNS]
_KEY_LEN = len(_FILE_KEY)
assert _FILE_KEY == list(range(_KEY_LEN)), "a row tuple starts with its key columns"
_ORDER = [ROW_COLUMNS.index(c) for c in ROW_ORDER]


def _null_first(row: tuple) -> tuple:
    """Sort key of a row: :data:`ROW_ORDER`, a null before any value (as ``na_position="first"``)."""
    return tuple((0, "") if row[j] is None else (1, row[j]) for j in _ORDER)


def _sort_rows(rows: list[tuple]) -> None:
    """Rows in :data:`ROW_ORDER` (nulls first); without nulls in those columns, a plain sort."""
    if any(row[j] is None for row in rows for j in _ORDER):
        rows.sort(key=_null_first)
    else:
        rows.sort(key=operator.itemgetter(*_ORDER))


def _plainly_valid(metric: str, value, stderr, n) -> bool:
    """The usual row (float value in range, finite non-negative stderr or none, whole n >= 0 or
    none), checked quickly; anything else goes through :func:`value_problem`."""
    if type(value) is not float or not math.isfinite(value):
        return False
    lo, hi = metric_range(metric)
    if not lo <= value <= hi:
        return False
    if stderr is not None and not (type(stderr) is float and 0.0 <= stderr < math.inf):
        return False
    return n is None or (type(n) is int and n >= 0)


_last_record: list = [None, None]  # (model block, its columns): a model's suites come in a row


def _model_columns(block: Any, where: str) -> dict:
    """The model-level columns of a file from its ``model`` block, read through
    :func:`model_record` (all null for no record). The files of one model carry the same block:
    consecutive equal blocks are read once."""
    if block is not None and block == _last_record[0]:
        return _last_record[1]
    rec = model_record(block, where)
    if rec is None:
        return {"model_id": None, "role": None, "method": None, "params": None, "base": None, "experts": None,
                "domain": None, "align": None, "source": None, "fingerprint": None, "merge_runtime_s": math.nan,
                "merge_peak_rss_mb": math.nan, "model_versions": None}
    model = rec.to_dict()
    merged = rec.role == "merged"
    params = model.get("params")
    out = {
        "model_id": rec.model_id,
        "role": rec.role,
        "method": model.get("method"),
        "params": _json(params if params is not None else {}),
        "base": _str(model.get("base")),
        "experts": _json(list(model.get("experts") or [])),
        "domain": model.get("domain"),
        "align": _json(model["align"]) if model.get("align") else None,
        "source": _str(model.get("source")),
        "fingerprint": _str(model.get("fingerprint")),
        "merge_runtime_s": _float(model.get("runtime_s")) if merged else math.nan,
        "merge_peak_rss_mb": _float(model.get("peak_rss_mb")) if merged else math.nan,
        "model_versions": _json(model["versions"]) if model.get("versions") else None,
    }
    _last_record[:] = [block, out]
    return out


def rows_from_eval_json(path_or_dict: str | Path | Mapping) -> list[dict]:
    """Rows of the scores table from one evaluation JSON (a path or the parsed dict).

    An ``ok`` file gives one row per entry of ``results``; an ``error`` file (or an ``ok`` file
    with no results) gives a single row with ``status="error"``, ``task = suite`` and
    ``metric = split = None``, ``value = NaN``. ``suite_role`` is taken from the file's optional
    ``suite_role`` key and otherwise left null for :func:`build_scores` to infer.

    Raises :class:`EvalFileError` naming the file (and ``results[i]`` and the metric) for a
    malformed file, a path that is not ``<model_id>/<suite>.json``, an impossible value
    (:func:`mergesweep.aggregate.checks.value_problem`) or a duplicated result.
    """
    common, rows = read_eval_file(path_or_dict)
    return [{**common, **dict(zip(ROW_COLUMNS, r))} for r in rows]


def read_eval_file(path_or_dict: str | Path | Mapping) -> tuple[dict, list[tuple]]:
    """One evaluation JSON as ``(common, rows)``: the columns shared by all its rows, and one
    tuple of :data:`ROW_COLUMNS` values per row (what :func:`rows_from_eval_json` expands)."""
    doc, where = _load(path_or_dict)
    if not isinstance(doc, Mapping):
        raise EvalFileError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    for key in ("model_id", "suite"):
        if not doc.get(key):
            raise EvalFileError(f"{where}: missing required key '{key}'")
    model_id, suite = str(doc["model_id"]), str(doc["suite"])
    if not isinstance(path_or_dict, Mapping):
        check_eval_path(Path(path_or_dict), model_id, suite)
    model = _model_columns(doc.get("model"), where)
    if model["role"] is not None and model["model_id"] != model_id:
        raise EvalFileError(
            f"{where}: 'model_id' is {model_id!r} but 'model.model_id' is {model['model_id']!r}"
        )
    status = doc.get("status", "ok")
    if status not in ("ok", "error"):
        raise EvalFileError(f"{where}: 'status' is {status!r}, expected 'ok' or 'error'")

    common = {
        **model,
        "model_id": model_id,
        "suite": suite,
        "suite_role": doc.get("suite_role"),
        "runtime_s": _float(doc.get("runtime_s")),
        "peak_rss_mb": _float(doc.get("peak_rss_mb")),
        "device": _str(doc.get("device")),
        "chat_template": doc.get("chat_template") if isinstance(doc.get("chat_template"), bool) else None,
        "versions": _json(doc["versions"]) if doc.get("versions") else None,
        "eval_file": where,
    }
    results = doc.get("results") or []
    if not isinstance(results, list):
        raise EvalFileError(f"{where}: 'results' must be a list")
    if status == "error" or not results:
        message = doc.get("error") if status == "error" else None
        message = message or ("evaluation reported status 'error' without a message"
                              if status == "error" else "evaluation file has no results")
        return common, [(suite, None, None, None, None, math.nan, math.nan, None, "error", str(message), None, None)]
    rows = []
    seen: dict[tuple, int] = {}
    fewshot, task_versions = doc.get("num_fewshot"), doc.get("task_versions")
    fewshot_by_task, versions_by_task = isinstance(fewshot, Mapping), isinstance(task_versions, Mapping)
    for i, r in enumerate(results):
        if type(r) is not dict and not isinstance(r, Mapping):
            raise EvalFileError(f"{where}: results[{i}] must be an object")
        for key in ("task", "metric", "split"):
            if not r.get(key):
                raise EvalFileError(f"{where}: results[{i}] lacks '{key}'")
        if "value" not in r:
            raise EvalFileError(f"{where}: results[{i}] lacks 'value'")
        task = r["task"] if type(r["task"]) is str else str(r["task"])
        lm_task = r.get("lm_eval_task")
        lm_task = (lm_task if type(lm_task) is str else str(lm_task)) if lm_task else None
        metric = r["metric"] if type(r["metric"]) is str else str(r["metric"])
        value, n = r["value"], r.get("n")
        stderr = r.get("stderr")
        if stderr == "N/A":
            stderr = None
        if not _plainly_valid(metric, value, stderr, n):  # the common case needs no message
            problem = value_problem(metric, value, stderr, n)
            if problem:
                raise EvalFileError(f"{where}: results[{i}] ({lm_task or task}, split {r['split']!r}): {problem}")
        filt = r.get("filter")
        filt = (filt if type(filt) is str else str(filt)) if filt is not None else None
        name = lm_task or task  # num_fewshot/task_versions are keyed by lm-eval task, or one value
        shots = fewshot.get(name) if fewshot_by_task else fewshot
        version = task_versions.get(name) if versions_by_task else task_versions
        split = r["split"] if type(r["split"]) is str else str(r["split"])
        row = (task, lm_task, metric, filt, split,
               value if type(value) is float else _float(value),
               stderr if type(stderr) is float else _float(stderr),
               n if type(n) is int else _int(n), "ok", None,
               shots if type(shots) is int else _int(shots),
               version if type(version) is str else _str(version))
        key = row[:_KEY_LEN]
        if key in seen:
            raise EvalFileError(f"{where}: results[{i}] duplicates results[{seen[key]}] (task {task!r}, "
                                f"lm-eval task {lm_task!r}, metric {metric!r}, filter {filt!r}, "
                                f"split {row[4]!r})")
        seen[key] = i
        rows.append(row)
    return common, rows


def find_eval_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand the inputs: files are kept, directories are searched for ``**/*.json``."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.json") if not q.name.startswith("."))
            if not found:
                log.warning("%s: directory holds no evaluation JSON", p)
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise EvalFileError(f"{p}: evaluation file or directory not found")
    return files


class ModelsList(NamedTuple):
    """What ``aggregate --models`` lists: the models, the suites (``None``: every file of a
    model), and the models evaluated on a subset of the suites (``model_suites``: a task reverted
    from a reversible merge is evaluated on its own domain only). Unpacks as the arguments of
    :func:`eval_files_of`."""

    models: list[str]
    suites: list[str] | None
    model_suites: dict[str, list[str]]


def _strings_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def _model_suites(doc: Mapping, models: list[str], suites: list[str] | None, path: Path) -> dict[str, list[str]]:
    """The optional ``model_suites`` key: ``{model_id: [suite, ...]}``, each model one of
    ``models``, each suite one of ``suites`` (when given), no suite twice, none empty."""
    value = doc.get("model_suites")
    if value is None:
        return {}
    key = "model_suites"
    if not isinstance(value, Mapping) or not all(_strings_list(v) for v in value.values()):
        raise EvalFileError(f"{path}: key '{key}' must map model ids to lists of non-empty suite names")
    listed, known = set(models), set(suites) if suites is not None else None
    out: dict[str, list[str]] = {}
    for model, qs in value.items():
        if model not in listed:
            raise EvalFileError(f"{path}: key '{key}' names model {model!r}, which key 'models' does not list")
        if not qs:
            raise EvalFileError(f"{path}: key '{key}.{model}' lists no suite")
        unknown = [q for q in qs if known is not None and q not in known]
        if unknown:
            raise EvalFileError(f"{path}: key '{key}.{model}' names suite {unknown[0]!r}, which key 'suites' "
                                "does not list")
        if len(set(qs)) != len(qs):
            raise EvalFileError(f"{path}: key '{key}.{model}' lists a suite twice")
        out[str(model)] = list(qs)
    return out


def read_models_list(path: str | Path) -> ModelsList:
    """The models (and optionally the suites) a run evaluated: ``{"models": [...], "suites": [...],
    "model_suites": {model: [...]}}`` as the workflow's ``evaluation_models`` rule writes it
    (``suites`` and ``model_suites`` may be absent; ``model_suites`` names the models evaluated on
    some of the suites only), or a text file of model ids, one per line. Raises
    :class:`EvalFileError` naming the file and key."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise EvalFileError(f"{path}: models list not found") from None
    model_suites: dict[str, list[str]] = {}
    if path.suffix == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise EvalFileError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(doc, Mapping):
            raise EvalFileError(f"{path}: expected a JSON object with key 'models'")
        models, suites = doc.get("models"), doc.get("suites")
        for key, value in (("models", models), ("suites", suites)):
            if value is None and key == "suites":
                continue
            if not _strings_list(value):
                raise EvalFileError(f"{path}: key '{key}' must be a list of non-empty strings")
    else:
        models = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        suites = None
    if not models:
        raise EvalFileError(f"{path}: lists no model")
    dup = sorted({m for m in models if models.count(m) > 1}) if len(set(models)) != len(models) else []
    if dup:
        raise EvalFileError(f"{path}: model {dup[0]!r} is listed twice")
    if path.suffix == ".json":
        model_suites = _model_suites(doc, models, suites, path)
    return ModelsList(list(models), list(suites) if suites is not None else None, model_suites)


def eval_files_of(evals_dir: str | Path, models: list[str], suites: list[str] | None = None,
                  model_suites: Mapping[str, list[str]] | None = None) -> list[Path]:
    """The evaluation files of exactly ``models`` under ``evals_dir``: ``<dir>/<model>/<suite>.json``
    for each of ``suites`` (every one must exist), or every ``<dir>/<model>/*.json`` when no
    suites are given (each model must have at least one). A model of ``model_suites`` is read on
    its own suites only (``<dir>/<model>/<suite>.json``, every one must exist). Directories of
    other models (a stale model of an older config) are not read. A missing file or model is an
    error naming it."""
    root = Path(evals_dir)
    if not root.is_dir():
        raise EvalFileError(f"--evals-dir {root}: directory not found")
    own = dict(model_suites or {})
    files: list[Path] = []
    missing: list[str] = []
    for m in models:
        d = root / m
        wanted = own.get(m, suites)
        if wanted is not None:
            for q in wanted:
                p = d / f"{q}.json"
                if p.is_file():
                    files.append(p)
                else:
                    missing.append(str(p))
        else:
            found = sorted(p for p in d.glob("*.json") if not p.name.startswith(".")) if d.is_dir() else []
            if not found:
                missing.append(f"{d}/*.json")
            files.extend(found)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise EvalFileError(f"{missing[0]}: evaluation of a listed model not found{more}")
    return files


def infer_suite_roles(df: pd.DataFrame) -> pd.Series:
    """``skill`` for a suite that is some expert's ``domain``, ``heldout`` otherwise.

    An explicit ``suite_role`` carried by the evaluation file wins.
    """
    domains = set(df.loc[df["role"] == "expert", "domain"].dropna())
    explicit = df.loc[df["suite_role"].notna(), ["suite", "suite_role"]].drop_duplicates("suite")
    roles = {q: ("skill" if q in domains else "heldout") for q in df["suite"].dropna().unique()}
    roles.update(zip(explicit["suite"], explicit["suite_role"]))
    return df["suite"].map(roles)


_PANDAS_TYPES = {pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}


def _strings(column: pa.ChunkedArray) -> np.ndarray:
    """A string column as an object array whose equal values are one Python string (NaN for
    null, as pandas' own string columns): a million rows of a few thousand distinct values cost
    a pointer each, not a copy."""
    if not pa.types.is_dictionary(column.type):
        column = column.dictionary_encode()
    column = column.unify_dictionaries() if column.num_chunks > 1 else column
    out = np.empty(len(column), dtype=object)
    pos = 0
    for chunk in column.chunks:
        values = np.asarray([np.nan if v is None else v for v in chunk.dictionary.to_pylist()] + [np.nan],
                            dtype=object)
        idx = chunk.indices.fill_null(len(values) - 1).to_numpy()
        out[pos:pos + len(chunk)] = values[idx]
        pos += len(chunk)
    return out


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    """Nullable integers/booleans stay integers/booleans (not float/object); strings become
    object columns of shared Python strings (:func:`_strings`; a scores table repeats each model's
    and file's strings on every row)."""
    return _frame(dict(zip(table.column_names, table.columns)))


def _frame(columns: dict) -> pd.DataFrame:
    """:func:`_to_pandas` of named Arrow columns, converted one at a time and released (the dict
    is emptied)."""
    names = list(columns)
    out = {}
    for name in names:
        c = columns.pop(name)
        c = c if isinstance(c, pa.ChunkedArray) else pa.chunked_array([c])
        kind = c.type.value_type if pa.types.is_dictionary(c.type) else c.type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            out[name] = pd.Series(_strings(c), dtype=object, copy=False)
        else:
            out[name] = c.to_pandas(types_mapper=_PANDAS_TYPES.get)
        del c
    return pd.DataFrame(out, columns=names, copy=False)


def scores_frame(rows: list[dict]) -> pd.DataFrame:
    """A DataFrame with exactly the columns and dtypes of :data:`SCORE_SCHEMA`."""
    return _to_pandas(pa.Table.from_pylist(rows, schema=SCORE_SCHEMA))


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _fill_model_columns(commons: list[dict]) -> None:
    """Give every file of a model the model-level columns (:data:`MODEL_COLUMNS`) the model's
    other files carry (an error file may lack the ``model`` block): each missing value is the
    first one any file of the model has. Works on the files' shared columns, before they are
    expanded into rows."""
    first: dict[str, dict[str, Any]] = {}
    for common in commons:
        known = first.setdefault(common["model_id"], {})
        for c in MODEL_COLUMNS:
            if c not in known and not _missing(common[c]):
                known[c] = common[c]
    for common in commons:
        known = first[common["model_id"]]
        for c in MODEL_COLUMNS:
            if _missing(common[c]) and c in known:
                common[c] = known[c]


_CHUNK_ROWS = 200_000  # row columns become Arrow arrays every this many rows (bounded Python memory)


def _row_arrays(rows: list[tuple]) -> list[pa.Array]:
    """Arrow arrays of :data:`ROW_COLUMNS` from row tuples."""
    types = [SCORE_SCHEMA.field(c).type for c in ROW_COLUMNS]
    return [pa.array([r[j] for r in rows], type=t) for j, t in enumerate(types)]


def build_scores(paths: Iterable[str | Path | Mapping]) -> pd.DataFrame:
    """The long scores table from evaluation JSONs (paths, directories or parsed dicts).

    Rows are sorted by (role, model_id, suite, task, lm_eval_task, metric, filter, split), roles in
    the order of :data:`mergesweep.record.ROLES`. Two
    files for the same (model, suite) are an error naming both.

    Built column-wise: each file's rows (sorted within the file) become Arrow arrays chunk by
    chunk; the columns a file's rows share are kept once per file and expanded at the end; the
    files are put in (role, model, suite) order by one permutation of the rows.
    """
    items: list = []
    for p in paths:
        items.extend([p] if isinstance(p, Mapping) else find_eval_files([p]))
    commons: list[dict] = []
    counts: list[int] = []
    chunks: list[list[pa.Array]] = []
    pending: list[tuple] = []
    seen: dict[tuple[str, str], str] = {}
    for item in items:
        common, rows = read_eval_file(item)
        key = (common["model_id"], common["suite"])
        if key in seen:
            raise EvalFileError(
                f"{common['eval_file']}: (model {key[0]!r}, suite {key[1]!r}) already read from {seen[key]}"
            )
        seen[key] = common["eval_file"]
        _sort_rows(rows)
        commons.append(common)
        counts.append(len(rows))
        pending.extend(rows)
        if len(pending) >= _CHUNK_ROWS:
            chunks.append(_row_arrays(pending))
            pending = []
    if not commons:
        return scores_frame([])
    if pending:
        chunks.append(_row_arrays(pending))
    del pending
    _fill_model_columns(commons)
    no_role = next((c for c in commons if c["role"] is None), None)
    if no_role is not None:
        raise EvalFileError(
            f"{no_role['eval_file']}: no evaluation of model {no_role['model_id']!r} carries its 'model' "
            "metadata (role)"
        )
    # rows in (role, model, suite) order: whole files moved, each file's rows already in order
    role_order = {r: i for i, r in enumerate(ROLES)}
    order = sorted(range(len(commons)),
                   key=lambda i: (role_order[commons[i]["role"]], commons[i]["model_id"], commons[i]["suite"]))
    counts_arr = np.asarray(counts, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts_arr)[:-1]])
    ordered_counts = counts_arr[order]
    starts = np.repeat(offsets[order], ordered_counts)
    within = np.arange(int(counts_arr.sum())) - np.repeat(np.cumsum(ordered_counts) - ordered_counts, ordered_counts)
    perm = pa.array(starts + within)
    file_of_row = pa.array(np.repeat(np.arange(len(order), dtype=np.int32), ordered_counts))
    columns = {}
    for name, typ in zip(SCORE_SCHEMA.names, SCORE_SCHEMA.types):
        if name in ROW_COLUMNS:
            j = ROW_COLUMNS.index(name)
            columns[name] = pa.chunked_array([c[j] for c in chunks], type=typ).take(perm)
        else:
            per_file = pa.array([commons[i][name] for i in order], type=typ)
            # a file's value on each of its rows; strings stay one value per file
            columns[name] = (pa.DictionaryArray.from_arrays(file_of_row, per_file) if pa.types.is_string(typ)
                             else per_file.take(file_of_row))
    del chunks
    df = _frame(columns)
    df["suite_role"] = infer_suite_roles(df).astype(df["suite"].dtype)
    n_err = int((df["status"] == "error").sum())
    log.info(
        "scores: %d rows, %d models, %d suites, %d failed evaluations",
        len(df), df["model_id"].nunique(), df["suite"].nunique(), n_err,
    )
    return df


def write_scores(df: pd.DataFrame, path: str | Path, provenance: Mapping | None = None, *,
                 checked: bool = False, searches: Mapping | None = None) -> None:
    """Write the scores table atomically, with the provenance (and the run's searches, when it has
    any: :func:`mergesweep.aggregate.searches.read_searches_list`'s document) as parquet schema
    metadata. The table is checked first (:func:`check_scores`) unless the caller just did
    (``checked``)."""
    missing = [c for c in SCORE_COLUMNS if c not in df.columns]
    if missing:
        raise ScoresError(f"{path}: scores table lacks column(s) {', '.join(missing)}")
    if not checked:
        check_scores(df, f"refusing to write {path}")
    df = df[SCORE_COLUMNS]
    first = pa.Table.from_pandas(df.iloc[:_CHUNK_ROWS], schema=SCORE_SCHEMA, preserve_index=False)
    meta = dict(first.schema.metadata or {})
    meta[FORMAT_KEY] = FORMAT_VERSION.encode()
    if provenance:
        meta[PROVENANCE_KEY] = _json(provenance).encode()
    if searches:
        meta[SEARCHES_KEY] = _json(searches).encode()
    schema = first.schema.with_metadata(meta)
    # row group by row group: the table's strings are never all materialised in Arrow at once
    with atomic_file(path, "wb") as f, pq.ParquetWriter(f, schema) as writer:
        writer.write_table(first.replace_schema_metadata(meta))
        del first
        for start in range(_CHUNK_ROWS, len(df), _CHUNK_ROWS):
            chunk = pa.Table.from_pandas(df.iloc[start:start + _CHUNK_ROWS], schema=SCORE_SCHEMA, preserve_index=False)
            writer.write_table(chunk.replace_schema_metadata(meta))
    publish(Path(path))


def read_scores(path: str | Path) -> tuple[pd.DataFrame, dict | None]:
    """Read scores.parquet; return the table and the embedded provenance (or None).

    Raises :class:`ScoresError` naming the file and the missing columns if it is not a scores
    table.
    """
    path = Path(path)
    if not path.exists():
        raise ScoresError(f"{path}: scores table not found (run 'mergesweep aggregate' first)")
    try:
        schema = pq.read_schema(path)
        # strings read dictionary-encoded (each distinct value once, see _to_pandas)
        strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        pf = pq.ParquetFile(path, read_dictionary=strings)
    except (pa.ArrowException, OSError) as e:
        raise ScoresError(f"{path}: not a readable parquet file ({e})") from e
    required = ["model_id", "role", "method", "params", "base", "experts", "suite", "task",
                "metric", "value", "stderr", "n", "split", "status"]
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise ScoresError(f"{path}: missing column(s) {', '.join(missing)}")
    meta = schema.metadata or {}
    columns = {}
    try:
        for name in schema.names:  # one column at a time: never the whole decoded table at once
            columns.update(_frame({name: pf.read(columns=[name]).column(0)}))
            pa.default_memory_pool().release_unused()
    except (pa.ArrowException, OSError) as e:
        raise ScoresError(f"{path}: not a readable parquet file ({e})") from e
    df = pd.DataFrame(columns, copy=False)
    del columns
    for col, typ in zip(SCORE_SCHEMA.names, SCORE_SCHEMA.types):
        if col not in df.columns:  # tolerate tables from older/other writers
            df[col] = pd.Series([None] * len(df), dtype="float64" if pa.types.is_floating(typ) else "object")
    if df["suite_role"].isna().any():
        df["suite_role"] = infer_suite_roles(df).astype(df["suite"].dtype)
    provenance = json.loads(meta[PROVENANCE_KEY]) if PROVENANCE_KEY in meta else None
    return df, provenance
