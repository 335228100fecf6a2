"""A suite that failed for every model (a task that cannot build, the same for all) is a failure
shown in the tables, never a crash of the leaderboard: found by the end-to-end run of real lm-eval
suites, where the leaderboard's figures assumed every held-out suite had scores."""

import json
import sys

import pandas as pd

from helpers_pipeline import REPO, run_cli

sys.path.insert(0, str(REPO / "benchmarks"))
from synth_evals import HELDOUT, generate  # noqa: E402


def test_leaderboard_survives_a_suite_that_failed_everywhere(tmp_path):
    tree = generate(tmp_path / "tree", 40, n_experts=3, tasks=2, error_rate=0.0)
    failed = sorted((tmp_path / "tree" / "evals").glob(f"*/{HELDOUT}.json"))
    assert len(failed) == 40
    for f in failed:
        doc = json.loads(f.read_text())
        doc.update(status="error", results=[], error="SplitError: task x: too few examples")
        f.write_text(json.dumps(doc))
    scores = tmp_path / "scores.parquet"
    agg = run_cli("aggregate", "--evals-dir", str(tmp_path / "tree" / "evals"), "--models", str(tree.models_file),
                  "--provenance", str(tree.provenance), "--out", str(scores))
    assert agg.returncode == 0, agg.stderr[-2000:]
    lb = run_cli("leaderboard", "--scores", str(scores), "--out-dir", str(tmp_path / "out"))
    assert lb.returncode == 0, lb.stderr[-3000:]
    fails = pd.read_parquet(scores)
    assert set(fails.loc[fails["suite"] == HELDOUT, "status"]) == {"error"}
    board = pd.read_parquet(tmp_path / "out" / "tables" / "leaderboard.parquet")
    assert (board["failed_suites"] == HELDOUT).all() and (board["status"] == "error").all()
    html = (tmp_path / "out" / "report" / "report.html").read_text()
    assert "too few examples" in html
