"""Writing every derived output from scores.parquet, atomically: what ``mergesweep leaderboard``
does. Nothing is recomputed but the tables, figures and report themselves."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from mergesweep.aggregate.checks import check_scores
from mergesweep.aggregate.files import write_bytes, write_parquet, write_text
from mergesweep.aggregate.figures import FIGURES, SEARCH_FIGURES, render_figures
from mergesweep.layout import SEARCH_FIGURES as SEARCH_FIGURE_NAMES
from mergesweep.aggregate.leaderboard import Tables, compute_tables
from mergesweep.aggregate.markdown import render_markdown
from mergesweep.aggregate.report import render_report
from mergesweep.aggregate.scores import read_scores
from mergesweep.aggregate.searches import read_searches
from mergesweep.layout import Layout
from mergesweep.record import sha256_file

log = logging.getLogger(__name__)

def output_paths(out_dir: str | Path, searches: bool = False) -> dict[str, Path]:
    """Every file ``mergesweep leaderboard --out-dir OUT_DIR`` writes (the workflow's outputs):
    :meth:`mergesweep.layout.Layout.leaderboard_outputs` under ``OUT_DIR`` (the one owner of
    those paths), and, when the scores table has searches (``searches``), the search figures
    ``fig_search_convergence`` and ``fig_search_fronts`` (``report/<name>.png``, where
    :meth:`~mergesweep.layout.Layout.figure` puts every figure)."""
    layout = Layout(results=str(out_dir))
    paths = {k: Path(v) for k, v in layout.leaderboard_outputs().items()}
    missing = [f"fig_{name}" for name in FIGURES if f"fig_{name}" not in paths]
    if missing:  # a figure the Layout does not name could not be a workflow output
        raise RuntimeError(f"Layout.leaderboard_outputs lacks {', '.join(missing)}")
    if searches:
        if tuple(SEARCH_FIGURES) != SEARCH_FIGURE_NAMES:  # the workflow declares the layout's names
            raise RuntimeError(f"mergesweep.layout.SEARCH_FIGURES {SEARCH_FIGURE_NAMES} differs from the figures "
                               f"drawn {tuple(SEARCH_FIGURES)}")
        paths.update({f"fig_{name}": Path(layout.figure(name)) for name in SEARCH_FIGURE_NAMES})
    return paths


def regenerate(scores_path: str | Path, out_dir: str | Path, provenance: Mapping | None = None,
               metrics: Mapping[str, str] | None = None) -> tuple[Tables, dict[str, Path]]:
    """Read scores.parquet and write the tables, ``leaderboard.md``, the figures and the report.

    ``provenance`` overrides the provenance embedded in scores.parquet (if any). The searches
    embedded in it (:func:`mergesweep.aggregate.searches.read_searches`) are method groups of
    their own, with their section and figures. The table is
    checked (:func:`mergesweep.aggregate.checks.check_scores`: rows, an ok row, ranges,
    duplicates) and every output is rendered in memory before the first one is written, so a
    refused table leaves existing outputs byte-identical.
    """
    scores_path = Path(scores_path)
    scores, embedded = read_scores(scores_path)
    check_scores(scores, str(scores_path))
    prov = dict(provenance) if provenance else embedded
    tables = compute_tables(scores, metrics, read_searches(scores_path))
    figures = render_figures(tables)
    markdown = render_markdown(tables, prov, report_href="report/report.html")
    html = render_report(tables, figures, prov, scores_path=str(scores_path),
                         scores_sha256=sha256_file(scores_path))
    paths = output_paths(out_dir, searches=bool(tables.searches))
    write_parquet(tables.leaderboard, paths["leaderboard"])
    write_parquet(tables.selection, paths["selection"])
    write_parquet(tables.pareto, paths["pareto"])
    write_parquet(tables.reversible, paths["reversible"])
    for name, png in figures.items():
        write_bytes(paths[f"fig_{name}"], png)
    write_text(paths["markdown"], markdown)
    write_text(paths["report"], html)
    log.info("leaderboard: %d merged models, %d methods -> %s", len(tables.leaderboard),
             len(tables.selection), Path(out_dir))
    return tables, paths


def selected_model_ids(selection_path: str | Path) -> list[str]:
    """The selected merged model of every sweep in a ``selection.parquet`` (sweeps with no
    eligible point select none), sorted. What ``keep_models: selected`` keeps on disk."""
    import pandas as pd

    sel = pd.read_parquet(selection_path, columns=["selected_model_id"])
    return sorted({str(i) for i in sel["selected_model_id"].dropna()})
