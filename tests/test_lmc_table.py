"""LMC results -> table: barrier reduction computed, malformed files named."""

import json

import pytest

from mergesweep.aggregate.lmc import lmc_rows
from mergesweep.errors import MergesweepError


def test_rows_and_reduction(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps({"model_a_id": "base", "model_b_id": "e1", "perm_method": "weight_matching",
                             "alphas": [0, 0.5, 1], "barrier": 1.25, "barrier_aligned": 0.75}))
    q = tmp_path / "b.json"
    q.write_text(json.dumps({"model_a_id": "base", "model_b_id": "e2", "alphas": [0, 1], "barrier": 0.5}))
    df = lmc_rows([p, q])
    assert df.loc[0, "barrier_reduction"] == pytest.approx(0.5)
    assert df.loc[0, "points"] == 3 and df.loc[1, "model_id"] == "e2"
    assert df.loc[1, "barrier_reduction"] is None or df.loc[1, "barrier_reduction"] != df.loc[1, "barrier_reduction"]


def test_malformed_file_is_named(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"alphas": []}))
    with pytest.raises(MergesweepError, match="x.json: no 'barrier'"):
        lmc_rows([p])
