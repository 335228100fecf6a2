"""The static HTML report: one self-contained file (inline CSS, figures as base64 PNG data URIs,
one small inline script, no network), so it opens offline and can be mailed or archived as is.

It stays readable, and a few MB, for sweeps of thousands of models: one leaderboard with an
expert-set selector, sortable and searchable tables, long tables paged (their rows travel as
compact JSON; the first page is also plain HTML), figures of bounded size
(:mod:`mergesweep.aggregate.figures` says what they leave out), the provenance summarised."""

from __future__ import annotations

import base64
import json
from collections import Counter

import jinja2
from markupsafe import Markup

from mergesweep.aggregate import views as V
from mergesweep.aggregate.figures import DPI, FIGURES, SEARCH_FIGURES, figure_notes
from mergesweep.aggregate.leaderboard import Tables
from mergesweep.aggregate.provenance import checkpoint_identities

FIGURE_CAPTIONS = {
    "bars": "Normalised test score (merged ÷ the domain's expert) of each method's selected "
            "hyperparameter point, per domain and averaged; error bars are one standard error "
            "(delta method). Dashed line: expert level; dotted: the base model's mean. Right: absolute "
            "test score on the held-out suite(s), against the base (dotted).",
    "heatmap": "Normalised test score of each method's selected point (rows, ranked) on each domain "
               "(columns) and the mean over the merge's own domains; the base model as a reference "
               "row. Grey cells are outside a merge's domains (value in parentheses, not averaged) or "
               "missing (a failed evaluation, marked error).",
    "sensitivity": "Mean normalised score against each swept hyperparameter, one line per value of the "
                   "other hyperparameters. Solid: validation (the selection criterion); dashed: test "
                   "(reported only). Star: the selected point; red cross: a point with a failed "
                   "evaluation (not selectable).",
    "pareto": "Every merge of the run (all methods and hyperparameter points) in the plane of two "
              "domains' normalised test scores. Staircase: the Pareto front; outlined: each method's "
              "selected point; crosses: the experts; grey dot: the base.",
    "search_convergence": "Each search's own validation objective: the best value among the candidates of "
                          "each generation (dots) and the best so far (line). No search sees a test score.",
    "search_fronts": "Each MAP search, per pair of its objective suites, in raw validation scores (what MAP's "
                     "quadratic surrogates fit): the surrogates' predicted Pareto front (line), the front points "
                     "it merged and evaluated, at their measured scores (diamonds), and the grid merges of the "
                     "same method and experts (grey; dashed: their Pareto front).",
}


#: Figures are rendered at 200 dpi and shown at 60 % of their pixel width (crisp on HiDPI screens).
DISPLAY_SCALE = 0.6
#: Rows per page of a long table; a table of more than PAGE_AFTER rows is paged.
PAGE_ROWS = 50
PAGE_AFTER = 120
#: The configuration shown in the report is cut after this many characters (all of it is in
#: provenance.json and the scores parquet).
CONFIG_CHARS = 20000


def png_dpi(png: bytes) -> float:
    """The resolution a PNG records (its pHYs chunk, pixels per metre), else the figures' DPI."""
    pos = png.find(b"pHYs")
    if pos < 0:
        return float(DPI)
    x = int.from_bytes(png[pos + 4:pos + 8], "big")
    unit = png[pos + 12]
    return float(round(x * 0.0254)) if unit == 1 and x else float(DPI)


def png_width(png: bytes) -> int:
    """Pixel width from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    return int.from_bytes(png[16:20], "big")


def _env() -> jinja2.Environment:
    loader = jinja2.PackageLoader("mergesweep.aggregate", "templates")
    env = jinja2.Environment(loader=loader, autoescape=jinja2.select_autoescape(["html", "j2"]),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env


def _payload(view: V.View) -> str:
    """The rows as compact JSON for the report's script, ``{"rows": [...], "groups": [...] or
    null}``: a cell is its text, or ``[text, flags, se]`` (flags ``b`` best, ``e`` error); a
    row's group (:attr:`View.row_groups`) by its index in ``groups``. Escaped for a ``<script>``
    element."""
    rows = [[c.text if not (c.best or c.error or c.se) else [c.text, ("b" if c.best else "") + ("e" if c.error else ""),
                                                             c.se] for c in row] for row in view.rows]
    doc = {"rows": rows, "groups": view.row_groups or None}
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def table_layout(view: V.View) -> dict:
    """How the report writes a view: numeric columns, paged or not, rows written as HTML."""
    n = len(view.rows)
    numeric = [bool(view.rows) and all(r[i].numeric for r in view.rows) for i in range(len(view.headers))]
    paged = n > PAGE_AFTER
    return {"numeric": numeric, "paged": paged, "page": PAGE_ROWS, "static": PAGE_ROWS if paged else n,
            "payload": Markup(_payload(view)) if paged else ""}


def _summarise(value) -> str:
    """A provenance value for one table cell: scalars as they are, collections by their size."""
    if isinstance(value, dict):
        return f"{len(value):,} entries (in tables/provenance.json)"
    if isinstance(value, list):
        return f"{len(value):,} items (in tables/provenance.json)"
    text = str(value)
    return text if len(text) <= 200 else text[:200] + "…"


def provenance_context(t: Tables, provenance: dict | None, scores_path: str | None,
                       scores_sha256: str | None) -> dict:
    """Config hash, checkpoints (ids, sources, revisions, hashes), versions and evaluation settings,
    from the provenance JSON where given and from the scores table in any case."""
    prov = provenance or {}
    checkpoints = checkpoint_identities(prov, t.references)

    evals = t.scores[["model_id", "suite", "versions", "model_versions"]].drop_duplicates(["model_id", "suite"])

    def distinct(column: str) -> list[tuple[str, int]]:
        counts = evals[column].dropna().value_counts()
        return sorted(Counter({str(k): int(n) for k, n in counts.items()}).items())

    eval_versions = distinct("versions")
    settings = []
    ok = t.scores["status"] == "ok"
    for column, label in (("device", "device"), ("num_fewshot", "few-shot examples"),
                          ("chat_template", "chat template")):
        vals = {str(v) for v in t.scores.loc[ok, column].dropna().unique()}
        settings.append((label, ", ".join(sorted(vals)) or "–"))
    config_json = json.dumps(prov["config"], indent=2, sort_keys=True) if prov.get("config") else ""
    return {
        "config_hash": prov.get("config_hash") or "",
        "config_json": config_json[:CONFIG_CHARS],
        "config_truncated": len(config_json) > CONFIG_CHARS,
        "checkpoints": checkpoints,
        "versions": sorted((str(k), str(v)) for k, v in (prov.get("versions") or {}).items()),
        "eval_versions": [(", ".join(f"{k} {v}" for k, v in sorted(json.loads(s).items())), n)
                          for s, n in eval_versions],
        "model_versions": [(", ".join(f"{k} {v}" for k, v in sorted(json.loads(s).items())), n)
                           for s, n in distinct("model_versions")],
        "settings": settings,
        "metrics": sorted(t.metrics.items()),
        "scores_path": scores_path or "",
        "scores_sha256": scores_sha256 or "",
        "extra": [(k, _summarise(v)) for k, v in prov.items()
                  if k not in ("config_hash", "config", "checkpoints", "versions")],
    }


def render_report(t: Tables, figures: dict[str, bytes], provenance: dict | None = None,
                  scores_path: str | None = None, scores_sha256: str | None = None) -> str:
    """The report as one HTML string; ``figures`` maps figure names (see ``FIGURES``) to PNG bytes."""
    notes = figure_notes(t)
    titles = {**FIGURES, **SEARCH_FIGURES}
    figs = [
        {"name": name, "title": titles[name], "caption": FIGURE_CAPTIONS[name], "note": notes.get(name, ""),
         "src": "data:image/png;base64," + base64.b64encode(figures[name]).decode("ascii"),
         # shown at DISPLAY_SCALE of a DPI-resolution figure's pixels, whatever its resolution
         "width": round(png_width(figures[name]) * DISPLAY_SCALE * DPI / png_dpi(figures[name]))}
        for name in titles if name in figures
    ]
    views = {
        "leaderboard": V.leaderboard_view(t),
        "selection": V.selection_view(t),
        "all_models": V.all_models_view(t),
        "references": V.references_view(t),
        "pareto": V.pareto_view(t),
        "reversible": V.reversible_view(t),
        "failures": V.failures_view(t),
        "cost": V.cost_view(t),
    }
    if t.searches:  # only then: the report of a run without searches is as before
        views.update(searches=V.searches_view(t), convergence=V.convergence_view(t), map_report=V.map_report_view(t))
    ctx = {
        "summary": V.summary(t),
        **views,
        "tables": {v.title: table_layout(v) for v in views.values()},
        "definitions": V.definitions(t),
        "selection_rule": V.SELECTION_RULE,
        "figures": figs,
        "prov": provenance_context(t, provenance, scores_path, scores_sha256),
        "failed_models": sorted(set(t.failures["model_id"])),
        "has_searches": bool(t.searches),
    }
    return _env().get_template("report.html.j2").render(**ctx)
