"""Grids, the merge YAML, and the ``mergesweep merge`` / ``mergesweep methods`` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers_merge import make_family, read_state
from mergesweep.cli import main
from mergesweep.errors import ConfigError
from mergesweep.merge.config import load_merge_yaml
from mergesweep.merge.grid import expand_grid
from mergesweep.merge.methods import REGISTRY

REQUIRED_METHODS = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "della", "breadcrumbs",
                    "slerp", "model_stock", "consensus", "tsv", "pcb", "layer_swap"}


def test_expand_grid_cartesian_product_in_key_order():
    points = expand_grid({"density": [0.2, 0.5], "lambda": [0.5, 1.0], "normalize": True})
    assert points == [
        {"density": 0.2, "lambda": 0.5, "normalize": True},
        {"density": 0.2, "lambda": 1.0, "normalize": True},
        {"density": 0.5, "lambda": 0.5, "normalize": True},
        {"density": 0.5, "lambda": 1.0, "normalize": True},
    ]


def test_expand_grid_per_expert_values_are_not_axes():
    params = {"weight": {"per_expert": [1.0, 0.5]}, "density": {"math": 0.3, "code": 0.7}, "lambda": [1, 2]}
    points = expand_grid(params)
    assert len(points) == 2
    assert all(p["weight"] == {"per_expert": [1.0, 0.5]} and p["density"] == {"math": 0.3, "code": 0.7} for p in points)
    # a per-expert axis is a list of per-expert values
    axis = expand_grid({"weight": [{"per_expert": [1, 0]}, {"per_expert": [0, 1]}]})
    assert axis == [{"weight": {"per_expert": [1, 0]}}, {"weight": {"per_expert": [0, 1]}}]
    assert expand_grid({}) == [{}] and expand_grid(None) == [{}]
    with pytest.raises(ConfigError, match="params.density: an empty list"):
        expand_grid({"density": []})


def test_registry_has_every_required_method_with_documented_specs():
    assert REQUIRED_METHODS <= set(REGISTRY)
    for name, spec in REGISTRY.items():
        assert spec.name == name
        assert "arXiv" in spec.paper or "1985" in spec.paper, name
        assert spec.doc and "Paper" in spec.doc, name  # formula + citation in the module docstring
        assert spec.base in ("required", "optional", "unused")
        for p in spec.params:
            if p.default is not None:
                p.check(p.default, f"{name}.{p.name}")  # defaults are valid


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("cfgfam"), 2)


def _write(path: Path, doc) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def test_load_merge_yaml_fills_defaults(family, tmp_path):
    base, experts = family
    cfg = load_merge_yaml(_write(tmp_path / "m.yaml", {
        "method": "ties", "base": str(base), "experts": [str(e) for e in experts],
        "params": {"density": {"expert1": 0.4}}}))
    assert cfg["method"] == "ties" and cfg["device"] == "auto" and cfg["vocab_policy"] == "error"
    assert cfg["shard_size"] == "2GB" and cfg["dtype"] is None and cfg["align"] is None


@pytest.mark.parametrize(
    "doc,pattern",
    [
        ({"base": "B", "experts": ["E"]}, r"method: missing"),
        ({"method": "soup", "experts": ["E"]}, r"method: unknown merge method 'soup'"),
        ({"method": "ties", "base": "B", "experts": "E"}, r"experts: expected a non-empty list"),
        ({"method": "ties", "base": "B", "experts": ["E", "E"], "params": {"density": 2}}, r"params\.density: 2"),
        ({"method": "ties", "base": "B", "experts": ["E"], "param": {}}, r"param: unknown key"),
        ({"method": "ties", "base": "B", "experts": ["E"], "dtype": "fp8"}, r"dtype: 'fp8'"),
        ({"method": "ties", "base": "B", "experts": ["E"], "vocab_policy": "pad"}, r"vocab_policy: 'pad'"),
        ({"method": "ties", "base": "B", "experts": ["E"], "shard_size": "big"}, r"shard_size: "),
        ({"method": "ties", "base": "B", "experts": ["E"], "params": {"density": {"nobody": 0.1}}},
         r"params\.density: 'nobody' is not an expert name"),
        ({"method": "ties", "base": "/nonexistent/x", "experts": ["E"]}, r"base: checkpoint directory /nonexistent/x"),
    ],
)
def test_load_merge_yaml_errors_name_the_key(family, tmp_path, doc, pattern):
    base, experts = family
    doc = json.loads(json.dumps(doc).replace('"B"', json.dumps(str(base))).replace('"E"', json.dumps(str(experts[0]))))
    with pytest.raises(ConfigError, match=pattern):
        load_merge_yaml(_write(tmp_path / "m.yaml", doc))


def test_cli_merge_runs_from_yaml(family, tmp_path, capsys):
    base, experts = family
    cfg = _write(tmp_path / "m.yaml", {
        "method": "task_arithmetic", "base": str(base), "experts": [str(e) for e in experts],
        "params": {"weight": [0.5, 0.5], "lambda": 2.0}, "dtype": "float32"})
    assert main(["merge", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["method"] == "task_arithmetic" and printed["params"]["weight"] == [0.5, 0.5]
    got, b = read_state(tmp_path / "out"), read_state(base)
    es = [read_state(e) for e in experts]
    k = "model.layers.2.mlp.down_proj.weight"
    want = b[k] + 2.0 * (0.5 * (es[0][k] - b[k]) + 0.5 * (es[1][k] - b[k]))
    assert got[k].sub(want).abs().max() < 1e-6


def test_cli_merge_error_is_one_line_and_exit_1(family, tmp_path, capsys):
    base, experts = family
    cfg = _write(tmp_path / "m.yaml", {"method": "ties", "base": str(base), "experts": [str(experts[0])],
                                        "params": {"density": -1}})
    assert main(["merge", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "params.density: -1.0 is out of range [0, 1]" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_methods_lists_registry(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in REQUIRED_METHODS:
        assert f"\n{name}  -  " in "\n" + out
    assert "density" in out and "arXiv:2306.01708" in out
    assert main(["methods", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    ties = next(m for m in listed if m["name"] == "ties")
    assert {"name": "density", "type": "float", "default": 0.2, "range": "[0, 1]", "per_expert": True} \
        .items() <= next(p for p in ties["params"] if p["name"] == "density").items()
    assert main(["methods", "tsv"]) == 0
    assert "Procrustes" in capsys.readouterr().out
