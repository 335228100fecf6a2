"""The report of a big sweep stays bounded: one grouped leaderboard, paged tables, figures with a
bounded number of panels and pixels that say what they leave out, the provenance summarised. On a
synthetic 600-model tree of 260 sweeps (benchmarks/synth_evals.py)."""

from __future__ import annotations

import json
import re
import sys

import pytest

from helpers_pipeline import REPO
from mergesweep.aggregate import figures as F
from mergesweep.aggregate.leaderboard import compute_tables
from mergesweep.aggregate.report import PAGE_ROWS, png_dpi, png_width, render_report
from mergesweep.aggregate.scores import build_scores

sys.path.insert(0, str(REPO / "benchmarks"))
from synth_evals import generate  # noqa: E402


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    tree = generate(tmp_path_factory.mktemp("scale") / "tree", 600, tasks=2, indent=None)
    tables = compute_tables(build_scores([tree.evals]))
    figures = F.render_figures(tables)
    provenance = json.loads(tree.provenance.read_text())
    html = render_report(tables, figures, provenance)
    return tree, tables, figures, html


def test_synthetic_tree_is_deterministic(tmp_path):
    a = generate(tmp_path / "a", 40, tasks=2)
    b = generate(tmp_path / "b", 40, tasks=2)
    files = sorted(p.relative_to(a.evals) for p in a.evals.rglob("*.json"))
    assert len(files) == 40 * 6 and files == sorted(p.relative_to(b.evals) for p in b.evals.rglob("*.json"))
    assert all((a.evals / f).read_bytes() == (b.evals / f).read_bytes() for f in files)
    doc = json.loads((a.evals / files[-1]).read_text())
    assert doc["model"]["stage"] in ("merge", "finetune", "pretrain") and doc["model_id"] == files[-1].parent.name


def test_figures_are_bounded_and_say_what_they_leave_out(big):
    _, tables, figures, _ = big
    n_sel = int(tables.leaderboard["selected"].sum())
    assert len(tables.selection) == 260 and n_sel > 250  # 26 expert sets x 10 methods (a few all failed)
    notes = F.figure_notes(tables)
    assert f"of {n_sel}" in notes["bars"] and f"of {n_sel}" in notes["heatmap"]
    assert f"Shown: 12 of {len(F._sweeps(tables))} sweeps" in notes["sensitivity"] and len(F._sweeps(tables)) > 200
    assert "pareto" not in notes  # 10 domain pairs: all shown
    for name, png in figures.items():
        inches = png_width(png) / png_dpi(png)
        assert inches <= 14, (name, inches)  # the user's sweep had a 394-inch (78,800 px) bar chart
        assert len(png) < 600_000, (name, len(png))
    sens = F.sensitivity_figure(tables)
    panels = [ax for ax in sens.axes if ax.axison]
    assert len(panels) == F.SENSITIVITY_MAX
    methods = {ax.get_title(loc="left").split("\n")[0] for ax in panels}
    assert len(methods) == 10  # one sweep of each method before any second one
    assert len(F._selected(tables, F.BARS_MAX)) == F.BARS_MAX


def test_one_grouped_leaderboard_and_paged_tables(big):
    _, tables, _, html = big
    assert html.count("<h2>Leaderboard") == 1 and "Leaderboard: merges of" not in html
    options = re.findall(r'<select class="group">(.*?)</select>', html, re.S)
    assert len(options) == 1 and options[0].count("<option") == 26 + 1
    # the all-models table: the first page as HTML, every row in the JSON payload
    n = len(tables.leaderboard)
    section = html[html.index('<section id="sweep">'):html.index('<section id="failures">')]
    payload = re.search(r'<script type="application/json" class="rows">(.*?)</script>', section, re.S).group(1)
    rows = json.loads(payload)["rows"]
    assert len(rows) == n and {r[0] for r in rows} == set(tables.leaderboard["model_id"])
    body = section[:section.index('<script type="application/json"')]
    assert body.count("<tr") == PAGE_ROWS + 1  # header + one page
    assert "tables/leaderboard.parquet" in section


def test_provenance_is_summarised(big):
    tree, tables, _, html = big
    section = html[html.index('<section id="provenance">'):html.index('<section id="definitions">')]
    n_merged = int((tables.wide["role"] == "merged").sum())
    assert f"{n_merged:,} entries (in tables/provenance.json)" in section
    assert len(section) < 20_000  # the user's report had a 1.26 MB provenance cell
    merged_ids = tables.leaderboard["model_id"]
    assert not any(m in section for m in merged_ids[:50])
    assert len(html) < 2_500_000
