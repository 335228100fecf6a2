"""Golden tests of the aggregation on the hand-made fixture in tests/data/aggregate/.

Every expected number is derived by hand in the comments from the values written in
tests/data/aggregate/make_fixture.py (validation, test accuracy per model and suite):

    expert references (own suite)   validation  test
      arithmetic  expert-arithmetic    0.80     0.80
      reverse     expert-reverse       0.40     0.50
      dateformat  expert-dateformat    0.50     0.40
    base on capitals (held-out, acc)   0.60     0.50

Merges (arithmetic, reverse, dateformat; capitals acc):
    TA  l=0.5       val .40 .20 .25   test .40 .25 .20   capitals test .48
    TA  l=1.0       val .64 .32 .40   test .56 .40 .36   capitals test .40
    ties d=.2 l=.5  val .48 .24 .30   test .48 .30 .24   capitals test .47
    ties d=.2 l=1   val .72 .36 .45   test .64 .35 .32   capitals test .44
    ties d=.5 l=.5  val .56 .28 .35   test .72 .45 .36   capitals test .46
    ties d=.5 l=1   val .80 .20 .25   test .80 .25 .20   capitals test .42
    linear          val .40 .20 .25   test .32 .25 .24   capitals test .50
    dare d=.3       val .60 .30 .30   test .60 .40 .28   capitals test .43
    dare d=.5       val .72 ERR .45   test .72 ERR .36   capitals test .44  (reverse failed)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mergesweep.aggregate import analysis as A
from mergesweep.aggregate.leaderboard import compute_tables
from mergesweep.aggregate.scores import build_scores

EVALS = Path(__file__).parent / "data" / "aggregate" / "evals"


@pytest.fixture(scope="module")
def tables():
    return compute_tables(build_scores([EVALS]))


def row(t, method: str, **params) -> pd.Series:
    """The leaderboard row of the merge with exactly these scalar hyperparameters."""
    lb = t.leaderboard
    m = lb[lb["method"] == method]
    for k, v in params.items():
        m = m[m[f"hp_{k}"] == v]
    assert len(m) == 1, (method, params, len(m))
    return m.iloc[0]


# ------------------------------------------------------------------------------------ normalised


@pytest.mark.parametrize(
    "method, params, val, test",
    [
        # val: .64/.80=.8, .32/.40=.8, .40/.50=.8 ; test: .56/.80=.7, .40/.50=.8, .36/.40=.9
        ("task_arithmetic", {"lambda": 1.0}, (0.8, 0.8, 0.8), (0.7, 0.8, 0.9)),
        # val: .40/.80=.5, .20/.40=.5, .25/.50=.5 ; test: .40/.80=.5, .25/.50=.5, .20/.40=.5
        ("task_arithmetic", {"lambda": 0.5}, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        # val: .72/.8=.9, .36/.4=.9, .45/.5=.9 ; test: .64/.8=.8, .35/.5=.7, .32/.4=.8
        ("ties", {"density": 0.2, "lambda": 1.0}, (0.9, 0.9, 0.9), (0.8, 0.7, 0.8)),
        # val: .56/.8=.7, .28/.4=.7, .35/.5=.7 ; test: .72/.8=.9, .45/.5=.9, .36/.4=.9
        ("ties", {"density": 0.5, "lambda": 0.5}, (0.7, 0.7, 0.7), (0.9, 0.9, 0.9)),
        # val: .80/.8=1, .20/.4=.5, .25/.5=.5 ; test: .80/.8=1, .25/.5=.5, .20/.4=.5
        ("ties", {"density": 0.5, "lambda": 1.0}, (1.0, 0.5, 0.5), (1.0, 0.5, 0.5)),
        # val: .40/.8=.5, .2/.4=.5, .25/.5=.5 ; test: .32/.8=.4, .25/.5=.5, .24/.4=.6
        ("linear", {}, (0.5, 0.5, 0.5), (0.4, 0.5, 0.6)),
        # failed reverse -> NaN there, other domains kept: val .72/.8=.9, .45/.5=.9; test .9, .36/.4=.9
        ("dare_ties", {"density": 0.5}, (0.9, math.nan, 0.9), (0.9, math.nan, 0.9)),
    ],
)
def test_normalised_scores_per_domain(tables, method, params, val, test):
    r = row(tables, method, **params)
    for split, expected in (("val", val), ("test", test)):
        got = [r[f"norm_{split}_{d}"] for d in ("arithmetic", "reverse", "dateformat")]
        np.testing.assert_allclose(got, expected, rtol=1e-9, equal_nan=True)


def test_mean_normalised_scores(tables):
    lb = tables.leaderboard
    # means of the triples above; ties d=.2 l=1 test (.8+.7+.8)/3 = 2.3/3; ties d=.5 l=1 (1+.5+.5)/3 = 2/3
    expected = {
        ("task_arithmetic", "lambda=1"): (0.8, 0.8),
        ("task_arithmetic", "lambda=0.5"): (0.5, 0.5),
        ("ties", "density=0.2, lambda=0.5"): (0.6, 0.6),
        ("ties", "density=0.2, lambda=1"): (0.9, 2.3 / 3),
        ("ties", "density=0.5, lambda=0.5"): (0.7, 0.9),
        ("ties", "density=0.5, lambda=1"): (2 / 3, 2 / 3),
        ("linear", "normalize=true, weight=[1.0,1.0,1.0]"): (0.5, 0.5),
        # dare d=.3: val (.6/.8 + .3/.4 + .3/.5)/3 = (.75+.75+.6)/3 = .7 ; test (.75+.8+.7)/3 = .75
        ("dare_ties", "density=0.3, lambda=1, seed=0"): (0.7, 0.75),
        # a failed domain makes the mean missing: never averaged over fewer domains
        ("dare_ties", "density=0.5, lambda=1, seed=0"): (math.nan, math.nan),
    }
    from mergesweep.aggregate.leaderboard import params_label

    got = {(r["method"], params_label(r["params"])): (r["norm_val_mean"], r["norm_test_mean"])
           for _, r in lb.iterrows()}
    assert set(got) == set(expected)
    for k, (v, t) in expected.items():
        np.testing.assert_allclose(got[k], (v, t), rtol=1e-9, equal_nan=True, err_msg=str(k))


def test_expert_and_base_reference_normalisation(tables):
    w = tables.wide.set_index("model_id")
    # an expert on its own domain is exactly 1 with zero standard error (same measurement)
    assert w.at["expert-reverse", "norm_test_reverse"] == 1.0
    assert w.at["expert-reverse", "norm_test_reverse_stderr"] == 0.0
    # base test: arithmetic .10/.80 = .125, reverse .05/.50 = .1, dateformat .10/.40 = .25
    np.testing.assert_allclose(
        [w.at["base-smollm2-135m", f"norm_test_{d}"] for d in ("arithmetic", "reverse", "dateformat")],
        [0.125, 0.1, 0.25], rtol=1e-9)
    # cross-domain: expert-arithmetic on dateformat, test .10/.40 = .25
    assert w.at["expert-arithmetic", "norm_test_dateformat"] == pytest.approx(0.25)


def test_normalised_stderr_delta_method(tables):
    r = row(tables, "task_arithmetic", **{"lambda": 1.0})
    # merged: s=.56, se=sqrt(.56*.44/199)=0.035188 ; expert: s=.80, se=sqrt(.8*.2/199)=0.028355
    # se_norm = sqrt((0.035188/.8)^2 + (.56*0.028355/.64)^2) = sqrt(0.043985^2 + 0.024811^2) = 0.050500
    assert r["norm_test_arithmetic_stderr"] == pytest.approx(0.050500, abs=2e-6)
    # mean: sqrt(se_a^2 + se_r^2 + se_d^2)/3 with the three delta-method errors
    ses = [r[f"norm_test_{d}_stderr"] for d in ("arithmetic", "reverse", "dateformat")]
    assert r["norm_test_mean_stderr"] == pytest.approx(math.sqrt(sum(s * s for s in ses)) / 3)


# ------------------------------------------------------------------------------------ forgetting


def test_heldout_delta_against_base(tables):
    # capitals test acc minus base .50: TA l=1 .40 -> -.10 ; linear .50 -> 0 ; ties d=.2 l=1 .44 -> -.06
    assert row(tables, "task_arithmetic", **{"lambda": 1.0})["delta_test_capitals"] == pytest.approx(-0.10)
    assert row(tables, "linear")["delta_test_capitals"] == pytest.approx(0.0, abs=1e-12)
    assert row(tables, "ties", density=0.2, **{"lambda": 1.0})["delta_test_capitals"] == pytest.approx(-0.06)
    # validation: TA l=1 .52 - .60 = -.08
    assert row(tables, "task_arithmetic", **{"lambda": 1.0})["delta_val_capitals"] == pytest.approx(-0.08)
    # absolute held-out score kept as well
    assert row(tables, "ties", density=0.5, **{"lambda": 0.5})["abs_test_capitals"] == pytest.approx(0.46)
    # the failed merge still has its held-out change: .44 - .50
    assert row(tables, "dare_ties", density=0.5)["delta_test_capitals"] == pytest.approx(-0.06)
    # stderr: sqrt(se_m^2 + se_b^2), se = sqrt(p(1-p)/199): .40 -> .034727, .50 -> .035444
    assert row(tables, "task_arithmetic", **{"lambda": 1.0})["delta_test_capitals_stderr"] == pytest.approx(
        math.hypot(0.034727, 0.035444), abs=2e-6)


# ------------------------------------------------------------------------------------ selection


def test_selection_picks_best_validation_point(tables):
    sel = tables.selection.set_index("method")
    # TA: val means .5 (l=.5) vs .8 (l=1) -> l=1
    assert json.loads(sel.at["task_arithmetic", "params"]) == {"lambda": 1.0}
    # ties: val means .6, .9, .7, .667 -> d=.2 l=1 (.9), although d=.5 l=.5 is best on test (.9 > .767)
    assert json.loads(sel.at["ties", "params"]) == {"density": 0.2, "lambda": 1.0}
    assert sel.at["ties", "test_norm_mean"] == pytest.approx(2.3 / 3)
    # dare_ties: the d=.5 point (val .9 on its two valid domains) failed on reverse -> not eligible;
    # d=.3 (val .7) is selected
    assert json.loads(sel.at["dare_ties", "params"]) == {"density": 0.3, "lambda": 1.0, "seed": 0}
    assert (sel.at["dare_ties", "n_points"], sel.at["dare_ties", "n_eligible"], sel.at["dare_ties", "n_failed"]) == (2, 1, 1)
    # linear: its only point
    assert json.loads(sel.at["linear", "params"]) == {"normalize": True, "weight": [1.0, 1.0, 1.0]}
    assert sel["note"].isna().all()


def test_ranking_on_test_of_selected_points(tables):
    # selected test means: TA .8, ties .7667, dare .75, linear .5
    sel = tables.selection
    assert list(sel["method"]) == ["task_arithmetic", "ties", "dare_ties", "linear"]
    assert list(sel["rank"]) == [1, 2, 3, 4]
    np.testing.assert_allclose(sel["test_norm_mean"], [0.8, 2.3 / 3, 0.75, 0.5], rtol=1e-9)
    lb = tables.leaderboard
    assert lb["selected"].sum() == 4
    assert list(lb.loc[lb["selected"], "rank"]) == [1, 2, 3, 4]
    assert lb.loc[~lb["selected"], "rank"].isna().all()


def test_selection_never_reads_test_columns():
    # two points whose validation scores tie (ties broken by model id) and whose test scores differ:
    # changing test scores must not change the selection
    base = {"method": "m", "align": None, "base": "b", "experts": "[]"}
    cand = pd.DataFrame([
        {**base, "model_id": "m-2", "norm_val_mean": 0.7, "norm_test_mean": 0.9},
        {**base, "model_id": "m-1", "norm_val_mean": 0.7, "norm_test_mean": 0.1},
        {**base, "model_id": "m-3", "norm_val_mean": math.nan, "norm_test_mean": 1.0},
    ])
    s = A.select_points(cand)
    assert s.loc[0, "selected_model_id"] == "m-1"  # tie -> smallest id, test ignored
    assert (s.loc[0, "n_points"], s.loc[0, "n_eligible"]) == (3, 2)
    cand2 = cand.assign(norm_test_mean=[0.0, 0.0, 0.0])
    assert A.select_points(cand2).loc[0, "selected_model_id"] == "m-1"


def test_group_without_eligible_point_selects_nothing():
    cand = pd.DataFrame([{"method": "m", "align": None, "base": "b", "experts": "[]", "model_id": "x",
                          "norm_val_mean": math.nan}])
    s = A.select_points(cand)
    assert s.loc[0, "selected_model_id"] is None and s.loc[0, "n_eligible"] == 0


# ------------------------------------------------------------------------------------ Pareto


def _front(t, dx, dy, split="test") -> set[tuple[str, str]]:
    from mergesweep.aggregate.leaderboard import params_label

    p = t.pareto
    f = p[(p["domain_x"] == dx) & (p["domain_y"] == dy) & (p["split"] == split) & p["on_front"]]
    return {(r["method"], params_label(r["params"])) for _, r in f.iterrows()}


def test_pareto_fronts_test_split(tables):
    # (arithmetic, dateformat) test points: TA.5 (.5,.5) TA1 (.7,.9) ties.2/.5 (.6,.6) ties.2/1 (.8,.8)
    # ties.5/.5 (.9,.9) ties.5/1 (1,.5) linear (.4,.6) dare.3 (.75,.7) dare.5 (.9,.9)
    # -> (.9,.9) twice (identical points do not dominate each other) and (1,.5)
    assert _front(tables, "arithmetic", "dateformat") == {
        ("ties", "density=0.5, lambda=0.5"), ("dare_ties", "density=0.5, lambda=1, seed=0"),
        ("ties", "density=0.5, lambda=1")}
    # (arithmetic, reverse): dare.5 has no reverse score and is left out; (.9,.9) and (1,.5)
    assert _front(tables, "arithmetic", "reverse") == {
        ("ties", "density=0.5, lambda=0.5"), ("ties", "density=0.5, lambda=1")}
    # (dateformat, reverse): (.9,.9) dominates every other point (ties.5/1 is (.5,.5))
    assert _front(tables, "dateformat", "reverse") == {("ties", "density=0.5, lambda=0.5")}


def test_pareto_fronts_validation_split(tables):
    # (arithmetic, reverse) validation: TA1 (.8,.8) ties.2/1 (.9,.9) ties.5/1 (1,.5) ... -> (.9,.9), (1,.5)
    assert _front(tables, "arithmetic", "reverse", "validation") == {
        ("ties", "density=0.2, lambda=1"), ("ties", "density=0.5, lambda=1")}


def test_pareto_table_counts(tables):
    p = tables.pareto
    # 3 domain pairs x 2 splits; 9 merges, minus dare.5 in the two pairs with reverse
    counts = p.groupby(["domain_x", "domain_y", "split"]).size().to_dict()
    assert counts == {("arithmetic", "dateformat", "validation"): 9, ("arithmetic", "dateformat", "test"): 9,
                      ("arithmetic", "reverse", "validation"): 8, ("arithmetic", "reverse", "test"): 8,
                      ("dateformat", "reverse", "validation"): 8, ("dateformat", "reverse", "test"): 8}


@pytest.mark.parametrize(
    "x, y, expected",
    [
        ([1, 2, 3], [3, 2, 1], [True, True, True]),  # a strict trade-off: all on the front
        ([1, 2, 2], [1, 2, 2], [False, True, True]),  # duplicates both stay
        ([1, 2, 2], [1, 2, 1], [False, True, False]),  # (2,1) is weakly dominated by (2,2)
        ([np.nan, 0.5, 0.4], [9, 0.5, 0.4], [False, True, False]),  # NaN never on the front
        ([], [], []),
    ],
)
def test_pareto_front_function(x, y, expected):
    assert A.pareto_front(x, y).tolist() == expected


def test_sweeps_are_separated_by_expert_set_and_alignment():
    # two extra merges of only arithmetic+reverse (one aligned): their own sweeps, ranked apart,
    # their mean over their own two domains. ties d=.2 l=1 values: test norm arithmetic .8, reverse .7
    docs = [json.loads(p.read_text()) for p in sorted(EVALS.rglob("*.json"))]
    src = [d for d in docs if d["model_id"] == "ties-0800f6357a"]
    extra = []
    for mid, align in (("ties-pair", None), ("ties-pair-aligned", {"method": "weight_matching"})):
        for d in src:
            e = json.loads(json.dumps(d))
            e["model_id"] = e["model"]["model_id"] = mid
            e["model"]["experts"] = ["expert-arithmetic", "expert-reverse"]
            e["model"]["align"] = align
            extra.append(e)
    t = compute_tables(build_scores(docs + extra))
    lb = t.leaderboard.set_index("model_id")
    # (.8 + .7) / 2 = .75 over the pair's own domains; dateformat is still scored (.32/.4 = .8) but not averaged
    assert lb.at["ties-pair", "norm_test_mean"] == pytest.approx(0.75)
    assert lb.at["ties-pair", "norm_test_dateformat"] == pytest.approx(0.8)
    assert json.loads(lb.at["ties-pair", "domains"]) == ["arithmetic", "reverse"]
    assert lb.at["ties-pair-aligned", "method_label"] == "ties+weight_matching"
    assert lb.at["ties-pair", "sweep_label"] == "ties [arithmetic+reverse]"
    # six sweeps, each selects its single/best point; the pair sweeps tie for rank 1 of their task
    assert len(t.selection) == 6
    assert lb.at["ties-pair", "rank"] == 1 and lb.at["ties-pair-aligned", "rank"] == 1
    assert lb.at["task-arithmetic-72b23e1903", "rank"] == 1 and lb.at["ties-0800f6357a", "rank"] == 2
