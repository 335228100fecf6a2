"""The static HTML report: one self-contained file (inline CSS, figures as base64 PNG data URIs,
no scripts, no network), so it opens offline and can be mailed or archived as is."""

from __future__ import annotations

import base64
import json
from collections import Counter

import jinja2

from mergesweep.aggregate import views as V
from mergesweep.aggregate.figures import FIGURES
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
}


#: Figures are rendered at 200 dpi and shown at 60 % of their pixel width (crisp on HiDPI screens).
DISPLAY_SCALE = 0.6


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


def provenance_context(t: Tables, provenance: dict | None, scores_path: str | None,
                       scores_sha256: str | None) -> dict:
    """Config hash, checkpoints (ids, sources, revisions, hashes), versions and evaluation settings,
    from the provenance JSON where given and from the scores table in any case."""
    prov = provenance or {}
    checkpoints = checkpoint_identities(prov, t.references)

    def distinct(column: str) -> list[tuple[str, int]]:
        per_eval = t.scores.drop_duplicates(["model_id", "suite"])[column].dropna()
        return sorted(Counter(map(str, per_eval)).items())

    eval_versions = distinct("versions")
    settings = []
    for column, label in (("device", "device"), ("num_fewshot", "few-shot examples"),
                          ("chat_template", "chat template")):
        vals = t.scores.loc[t.scores["status"] == "ok", column].dropna().astype(str)
        settings.append((label, ", ".join(sorted(set(vals))) or "–"))
    return {
        "config_hash": prov.get("config_hash") or "",
        "config_json": json.dumps(prov["config"], indent=2, sort_keys=True) if prov.get("config") else "",
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
        "extra": {k: v for k, v in prov.items() if k not in ("config_hash", "config", "checkpoints", "versions")},
    }


def render_report(t: Tables, figures: dict[str, bytes], provenance: dict | None = None,
                  scores_path: str | None = None, scores_sha256: str | None = None) -> str:
    """The report as one HTML string; ``figures`` maps figure names (see ``FIGURES``) to PNG bytes."""
    figs = [
        {"name": name, "title": FIGURES[name], "caption": FIGURE_CAPTIONS[name],
         "src": "data:image/png;base64," + base64.b64encode(figures[name]).decode("ascii"),
         "width": round(png_width(figures[name]) * DISPLAY_SCALE)}
        for name in FIGURES if name in figures
    ]
    ctx = {
        "summary": V.summary(t),
        "leaderboards": V.leaderboard_views(t),
        "selection": V.selection_view(t),
        "all_models": V.all_models_view(t),
        "references": V.references_view(t),
        "pareto": V.pareto_view(t),
        "failures": V.failures_view(t),
        "cost": V.cost_view(t),
        "definitions": V.DEFINITIONS,
        "selection_rule": V.SELECTION_RULE,
        "figures": figs,
        "prov": provenance_context(t, provenance, scores_path, scores_sha256),
        "failed_models": sorted(set(t.failures["model_id"])),
    }
    return _env().get_template("report.html.j2").render(**ctx)
