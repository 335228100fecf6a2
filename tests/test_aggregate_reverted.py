"""Reversible merges (RMM) in the aggregation: a task reverted from a reversible merge (role
``reverted``) is evaluated on its own domain only (``model_suites`` of evaluation_models.json),
compared with the expert it reverts in ``tables/reversible.parquet``, ``leaderboard.md`` and the
report, and never taken for a merged model or a reference."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from mergesweep.aggregate import analysis as A
from mergesweep.aggregate.leaderboard import REVERSIBLE_COLUMNS, compute_tables
from mergesweep.aggregate.scores import EvalFileError, build_scores, eval_files_of, read_models_list
from mergesweep.aggregate.views import REVERSIBLE_TITLE, fmt
from mergesweep.cli import main
from mergesweep.ids import reverted_model_id
from mergesweep.layout import Layout
from mergesweep.record import ModelRecord

BASE = "base-tiny"
EXPERTS = {"expert-arithmetic": "arithmetic", "expert-reverse": "reverse"}
SKILLS = ["arithmetic", "reverse"]
HELDOUT = "capitals"
SUITES = [*SKILLS, HELDOUT]
MERGED = "task-arithmetic-0123456789"
#: two reversible merges of the two experts (listed reverse first: the table orders by task name)
RMM = {"rmm-aaaaaaaaaa": {"components": 1}, "rmm-bbbbbbbbbb": {"components": 3}}
#: the components each uses: RMM caps them at the number of experts (2)
USED = {"rmm-aaaaaaaaaa": 1, "rmm-bbbbbbbbbb": 2}
RMM_EXPERTS = ["expert-reverse", "expert-arithmetic"]
SPLITS = ("validation", "test")
N = 200

#: (model, suite, split) -> the values of the suite's two lm-eval tasks (multiples of 1/N)
VALUES: dict[tuple[str, str, str], list[float]] = {}


def _values(model: str, suite: str, split: str) -> list[float]:
    """Fixed, distinct task values per (model, suite, split)."""
    h = sum(map(ord, f"{model}|{suite}|{split}"))
    level = {"base": 0.2, "expert": 0.85, "merged": 0.6, "reverted": 0.7}[_role(model)]
    if _role(model) == "expert" and EXPERTS[model] != suite:
        level = 0.25
    return [round((level + ((h + 7 * t) % 11 - 5) / 100) * N) / N for t in range(2)]


def _role(model: str) -> str:
    if model == BASE:
        return "base"
    if model in EXPERTS:
        return "expert"
    return "merged" if model == MERGED else "reverted"


def _se(v: float) -> float:
    return round(math.sqrt(v * (1 - v) / (N - 1)), 6)


def _records() -> dict[str, ModelRecord]:
    recs = {BASE: ModelRecord(model_id=BASE, role="base", stage="pretrain", uid=f"{BASE}@1",
                              fingerprint="f" * 16, source={"type": "pretrain"})}
    for name, d in EXPERTS.items():
        recs[name] = ModelRecord(model_id=name, role="expert", stage="finetune", uid=f"{name}@1",
                                 fingerprint=name[-4:] * 4, domain=d, base=BASE, source={"type": "finetune"})
    recs[MERGED] = ModelRecord(model_id=MERGED, role="merged", stage="merge", uid=MERGED, fingerprint="m" * 16,
                               method="task_arithmetic", params={"lambda": 1.0}, base=BASE,
                               experts=list(EXPERTS), source={"type": "merge"}, runtime_s=9.0,
                               peak_rss_mb=1000.0, extra={"align": None})
    for merge, params in RMM.items():
        for expert in RMM_EXPERTS:
            rid = reverted_model_id(merge, expert)
            recs[rid] = ModelRecord(model_id=rid, role="reverted", stage="revert", uid=rid, fingerprint="r" * 16,
                                    method="rmm", params=params, base=BASE, experts=list(RMM_EXPERTS),
                                    domain=EXPERTS[expert],
                                    source={"type": "revert", "merge": merge, "task": expert})
    return recs


def _doc(rec: ModelRecord, suite: str) -> dict:
    """An evaluation JSON as `mergesweep evaluate` writes it (two lm-eval tasks per split)."""
    results = []
    for split in SPLITS:
        vals = _values(rec.model_id, suite, split)
        VALUES[(rec.model_id, suite, split)] = vals
        for t, v in enumerate(vals):
            results.append({"task": suite, "lm_eval_task": f"ms_{suite}_{t}_{split}", "metric": "acc",
                            "filter": "none", "split": split, "value": v, "stderr": _se(v), "n": N})
    return {"model_id": rec.model_id, "suite": suite, "status": "ok", "error": None, "model": rec.to_dict(),
            "results": results, "device": "cpu", "runtime_s": 3.0, "peak_rss_mb": 500.0,
            "versions": {"lm_eval": "0.4.13"}}


def write_tree(root: Path) -> tuple[Path, Path]:
    """``root/evals/<model>/<suite>.json`` (a reverted model on its domain only) and
    ``root/evaluation_models.json`` with ``model_suites``."""
    recs = _records()
    model_suites = {}
    for mid, rec in recs.items():
        suites = [rec.domain] if rec.role == "reverted" else SUITES
        if rec.role == "reverted":
            model_suites[mid] = suites
        for q in suites:
            p = root / "evals" / mid / f"{q}.json"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(_doc(rec, q), indent=2, sort_keys=True))
    listed = root / "evaluation_models.json"
    listed.write_text(json.dumps({"models": list(recs), "suites": SUITES, "model_suites": model_suites}))
    return root / "evals", listed


def suite_score(model: str, suite: str, split: str) -> tuple[float, float]:
    """The suite score and its stderr from the JSON values: the tasks' mean, sqrt(sum se²) / T."""
    vals = VALUES[(model, suite, split)]
    return sum(vals) / len(vals), math.sqrt(sum(_se(v) ** 2 for v in vals)) / len(vals)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rmm")
    evals, listed = write_tree(root)
    scores = root / "tables" / "scores.parquet"
    assert main(["aggregate", "--evals-dir", str(evals), "--models", str(listed), "--out", str(scores)]) == 0
    assert main(["leaderboard", "--scores", str(scores), "--out-dir", str(root)]) == 0
    return root


def test_reversible_table_is_reverted_over_expert(run):
    rev = pd.read_parquet(Layout(results=str(run)).leaderboard_outputs()["reversible"])
    assert list(rev.columns) == REVERSIBLE_COLUMNS
    # one row per reverted model, by merge then task
    expected = [(m, e) for m in sorted(RMM) for e in sorted(RMM_EXPERTS)]
    assert list(zip(rev["merge_id"], rev["task"])) == expected
    assert list(rev["model_id"]) == [reverted_model_id(m, e) for m, e in expected]
    for r in rev.to_dict("records"):
        d = EXPERTS[r["task"]]
        assert r["domain"] == d and r["expert_model_id"] == r["task"] and r["method"] == "rmm"
        assert json.loads(r["params"]) == RMM[r["merge_id"]]
        assert r["n_components"] == USED[r["merge_id"]]
        assert r["status"] == "ok"
        for split, tag in (("validation", "val"), ("test", "test")):
            s, se = suite_score(r["model_id"], d, split)
            e, ee = suite_score(r["task"], d, split)
            assert r[f"reverted_{tag}"] == pytest.approx(s, abs=1e-12)
            assert r[f"reverted_{tag}_stderr"] == pytest.approx(se, abs=1e-12)
            assert r[f"expert_{tag}"] == pytest.approx(e, abs=1e-12)
            assert r[f"expert_{tag}_stderr"] == pytest.approx(ee, abs=1e-12)
            assert r[f"norm_{tag}"] == pytest.approx(s / e, abs=1e-12)
            assert r[f"norm_{tag}_stderr"] == pytest.approx(math.hypot(se / e, s * ee / e**2), abs=1e-12)


def test_reverted_models_are_neither_merges_nor_references(run):
    tables = Layout(results=str(run)).leaderboard_outputs()
    lb = pd.read_parquet(tables["leaderboard"])
    assert list(lb["model_id"]) == [MERGED]  # the reverted models are not merged models
    sel = pd.read_parquet(tables["selection"])
    assert list(sel["selected_model_id"]) == [MERGED] and list(sel["method"]) == ["task_arithmetic"]
    pareto = pd.read_parquet(tables["pareto"])
    assert set(pareto["model_id"]) == {MERGED}
    scores = pd.read_parquet(run / "tables" / "scores.parquet")
    reverted = scores[scores["role"] == "reverted"]
    assert reverted["model_id"].nunique() == 4 and (reverted["suite"] == reverted["domain"]).all()
    # roles in the order of mergesweep.record.ROLES: the reverted rows last
    assert list(dict.fromkeys(scores["role"])) == ["base", "expert", "merged", "reverted"]
    t = compute_tables(build_scores([run / "evals"]))
    assert set(t.references["role"]) == {"base", "expert"} and len(t.references) == 3
    # evaluated on their domain only, as planned: not a missing evaluation anywhere else
    assert t.failures.empty
    # a reverted model covers its own domain: its mean normalised score is its domain's
    w = t.wide.set_index("model_id")
    rid = reverted_model_id("rmm-aaaaaaaaaa", "expert-reverse")
    assert json.loads(w.at[rid, "domains"]) == ["reverse"]
    assert w.at[rid, "norm_test_mean"] == pytest.approx(w.at[rid, "norm_test_reverse"])


def test_markdown_and_report_show_the_reversible_section(run):
    md = (run / "leaderboard.md").read_text()
    assert f"## {REVERSIBLE_TITLE}" in md
    assert "4 reverted" in md
    section = md.split(f"## {REVERSIBLE_TITLE}")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| rmm-")]
    assert len(rows) == 4
    for line, (m, e) in zip(rows, [(m, e) for m in sorted(RMM) for e in sorted(RMM_EXPERTS)]):
        d = EXPERTS[e]
        s, se = suite_score(reverted_model_id(m, e), d, "test")
        x, xe = suite_score(e, d, "test")
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == m and cells[3] == e and cells[4] == d
        assert cells[1] == f"components={RMM[m]['components']}" and cells[2] == str(USED[m])
        assert cells[5] == f"{fmt(s)} ± {fmt(se)}" and cells[6] == f"{fmt(x)} ± {fmt(xe)}"
        assert cells[7] == f"{fmt(s / x)} ± {fmt(math.hypot(se / x, s * xe / x**2))}"
        assert cells[-1] == reverted_model_id(m, e)
    # the reverted models are in no leaderboard row
    lead = md.split("## Leaderboard")[1].split("\n## ")[0]
    assert "rmm-" not in lead
    html = (run / "report" / "report.html").read_text()
    part = html.split('<section id="reversible">')[1].split("</section>")[0]
    assert REVERSIBLE_TITLE in part and part.split("<tbody>")[1].count("<tr>") == 4
    assert 'href="#reversible"' in html and "reverted tasks" in html
    for m, e in [(m, e) for m in RMM for e in RMM_EXPERTS]:
        s, _ = suite_score(reverted_model_id(m, e), EXPERTS[e], "test")
        x, _ = suite_score(e, EXPERTS[e], "test")
        assert f">{reverted_model_id(m, e)}<" in part and f">{fmt(s / x)}<" in part


def test_run_without_reverted_models_has_an_empty_table(tmp_path):
    evals, _ = write_tree(tmp_path)
    files = [p for p in evals.rglob("*.json") if _role(p.parent.name) != "reverted"]
    t = compute_tables(build_scores(files))
    assert t.reversible.empty and list(t.reversible.columns) == REVERSIBLE_COLUMNS
    scores = tmp_path / "scores.parquet"
    assert main(["aggregate", "--evals", *map(str, files), "--out", str(scores)]) == 0
    assert main(["leaderboard", "--scores", str(scores), "--out-dir", str(tmp_path / "out")]) == 0
    rev = pd.read_parquet(tmp_path / "out" / "tables" / "reversible.parquet")
    assert rev.empty and list(rev.columns) == REVERSIBLE_COLUMNS
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "Reversible merges" not in md and "reverted" not in md
    assert 'id="reversible"' not in (tmp_path / "out" / "report" / "report.html").read_text()


def test_a_reverted_model_is_normalised_by_the_expert_it_reverts():
    """Two experts of one domain in the reversible merge: each reverted task is compared with its
    own expert, not the merge's first expert of that domain."""
    recs = _records()
    twin = ModelRecord(model_id="expert-arithmetic-b", role="expert", stage="finetune", uid="b@1",
                       fingerprint="b" * 16, domain="arithmetic", base=BASE, source={"type": "finetune"})
    experts = ["expert-arithmetic-b", "expert-arithmetic"]
    rid = reverted_model_id("rmm-cccccccccc", "expert-arithmetic")
    rev = ModelRecord(model_id=rid, role="reverted", stage="revert", uid=rid, method="rmm",
                      params={"components": 2}, base=BASE, experts=experts, domain="arithmetic",
                      source={"type": "revert", "merge": "rmm-cccccccccc", "task": "expert-arithmetic"})
    docs = [_doc(recs["expert-arithmetic"], "arithmetic"), _doc(rev, "arithmetic")]
    twin_doc = _doc(twin, "arithmetic")
    for r in twin_doc["results"]:
        r["value"] = 0.5  # far from expert-arithmetic's scores
    t = compute_tables(build_scores([*docs, twin_doc]))
    (row,) = t.reversible.to_dict("records")
    assert row["expert_model_id"] == "expert-arithmetic"
    s, _ = suite_score(rid, "arithmetic", "test")
    e, _ = suite_score("expert-arithmetic", "arithmetic", "test")
    assert row["norm_test"] == pytest.approx(s / e, abs=1e-12)
    models = A.models_table(build_scores([*docs, twin_doc]))
    assert A.expert_for(models.loc[rid], "arithmetic", models) == "expert-arithmetic"


# ----------------------------------------------------------------- evaluation_models.json


def test_model_suites_reads_exactly_those_suites(tmp_path):
    evals, listed = write_tree(tmp_path)
    ml = read_models_list(listed)
    rid = reverted_model_id("rmm-aaaaaaaaaa", "expert-reverse")
    assert ml.model_suites[rid] == ["reverse"] and ml.suites == SUITES
    files = eval_files_of(evals, *ml)
    assert [f for f in files if f.parent.name == rid] == [evals / rid / "reverse.json"]
    assert len(files) == 4 * len(SUITES) + 4
    # without model_suites a reverted model is expected on every suite: its other suites are missing
    first = evals / reverted_model_id("rmm-aaaaaaaaaa", "expert-reverse") / "arithmetic.json"
    with pytest.raises(EvalFileError, match=re.escape(f"{first}: evaluation of a listed model not found (and 7 more)")):
        eval_files_of(evals, ml.models, ml.suites)


def test_a_missing_reverted_evaluation_is_named(tmp_path, caplog):
    evals, listed = write_tree(tmp_path)
    rid = reverted_model_id("rmm-bbbbbbbbbb", "expert-arithmetic")
    gone = evals / rid / "arithmetic.json"
    gone.unlink()
    with pytest.raises(EvalFileError, match=re.escape(f"{gone}: evaluation of a listed model not found")):
        eval_files_of(evals, *read_models_list(listed))
    out = tmp_path / "scores.parquet"
    assert main(["aggregate", "--evals-dir", str(evals), "--models", str(listed), "--out", str(out)]) == 1
    assert str(gone) in caplog.text and not out.exists()


@pytest.mark.parametrize("model_suites, message", [
    ({"rmm-ffffffffff--expert-reverse": ["reverse"]},
     "key 'model_suites' names model 'rmm-ffffffffff--expert-reverse', which key 'models' does not list"),
    ({"expert-reverse": ["sorting"]}, "key 'model_suites.expert-reverse' names suite 'sorting', which key "
                                      "'suites' does not list"),
    ({"expert-reverse": "reverse"}, "key 'model_suites' must map model ids to lists of non-empty suite names"),
    (["expert-reverse"], "key 'model_suites' must map model ids to lists of non-empty suite names"),
    ({"expert-reverse": [""]}, "key 'model_suites' must map model ids to lists of non-empty suite names"),
    ({"expert-reverse": []}, "key 'model_suites.expert-reverse' lists no suite"),
    ({"expert-reverse": ["reverse", "reverse"]}, "key 'model_suites.expert-reverse' lists a suite twice"),
])
def test_bad_model_suites_is_named(tmp_path, model_suites, message):
    p = tmp_path / "evaluation_models.json"
    p.write_text(json.dumps({"models": [BASE, "expert-reverse"], "suites": SUITES, "model_suites": model_suites}))
    with pytest.raises(EvalFileError, match=re.escape(f"{p}: {message}")):
        read_models_list(p)


def test_a_failed_reverted_evaluation_is_an_error_row(tmp_path):
    evals, _ = write_tree(tmp_path)
    rid = reverted_model_id("rmm-aaaaaaaaaa", "expert-reverse")
    p = evals / rid / "reverse.json"
    doc = json.loads(p.read_text())
    doc.update(status="error", results=[], error="RuntimeError: revert produced NaN weights")
    p.write_text(json.dumps(doc))
    t = compute_tables(build_scores([evals]))
    rev = t.reversible.set_index("model_id")
    assert rev.at[rid, "status"] == "error" and rev.at[rid, "failed_suites"] == "reverse"
    assert math.isnan(rev.at[rid, "norm_test"]) and rev.at[rid, "expert_model_id"] == "expert-reverse"
    assert list(t.failures["model_id"]) == [rid]  # its failure, and nothing missing
    from mergesweep.aggregate.markdown import render_markdown

    line = next(l for l in render_markdown(t).splitlines() if l.endswith(f"| {rid} |"))
    x, xe = suite_score("expert-reverse", "reverse", "test")
    assert line.count("_error_") == 3 and f"| {fmt(x)} ± {fmt(xe)} |" in line  # the expert's score stands


def test_merge_and_task_from_the_id_when_the_record_has_no_revert_source():
    """A reverted record without ``source`` (``{"type": "revert", ...}``) is still placed by its id,
    ``<merge id>--<expert name>`` (ids.reverted_model_id), and compared with that expert."""
    recs = _records()
    rid = reverted_model_id("rmm-dddddddddd", "expert-reverse")
    rev = ModelRecord(model_id=rid, role="reverted", stage="revert", uid=rid, method="rmm",
                      params={"components": 2}, base=BASE, experts=list(RMM_EXPERTS), domain="reverse")
    docs = [_doc(recs[e], EXPERTS[e]) for e in EXPERTS] + [_doc(rev, "reverse")]
    (row,) = compute_tables(build_scores(docs)).reversible.to_dict("records")
    assert (row["merge_id"], row["task"], row["expert_model_id"]) == ("rmm-dddddddddd", "expert-reverse",
                                                                     "expert-reverse")
    s, _ = suite_score(rid, "reverse", "test")
    e, _ = suite_score("expert-reverse", "reverse", "test")
    assert row["norm_test"] == pytest.approx(s / e, abs=1e-12)
    assert A.revert_source(None, "not-a-reverted-id") == (None, None)
