"""Property tests over the whole merge-method registry, driven by each spec's declarations.

Every method (a module in ``mergesweep/merge/methods``) must declare a formula, whether it is
order-invariant and at least one identity point; the tests then check, for every method: its
identity points, identical inputs, order invariance (when declared), output shape/dtype,
finiteness, deterministic seeds, documented parameters with valid defaults - and that importing
the registry and resolving parameters loads no torch, and that docs/merge.md's generated tables
are current.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergesweep.cli import main
from mergesweep.errors import ConfigError
from mergesweep.merge import cli_methods
from mergesweep.merge.context import TensorContext
from mergesweep.merge.methods import REGISTRY, method_modules
from mergesweep.merge.spec import Identity, MethodSpec, Param, resolve_params

ROOT = Path(__file__).resolve().parents[1]
NAMES = sorted(REGISTRY)
TENSOR = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """The CPU is shared: one torch thread for these tests (tests/conftest.py)."""


# ---------------------------------------------------------------------------------------------
# helpers: run a spec on tensors the way the engine does (one tensor = the whole model)
# ---------------------------------------------------------------------------------------------
def example_inputs(spec: MethodSpec) -> tuple[int, bool]:
    """(number of experts, has base) at which the defaults validate: the most experts (up to 3),
    with a base when the method takes one."""
    bases = {"required": [True], "optional": [True, False], "unused": [False]}[spec.base]
    for has_base in bases:
        for n in (3, 2, 1):
            if n < spec.min_experts or (spec.max_experts is not None and n > spec.max_experts):
                continue
            try:
                resolve_params(spec, {}, n, has_base=has_base)
            except ConfigError:
                continue
            return n, has_base
    raise AssertionError(f"{spec.name}: the defaults validate for no number of experts (1-3)")


def _stats(spec, kp, base, experts, ctx) -> dict:
    """Whole-model statistics of a one-tensor model, by sorting (the engine streams them)."""
    reqs = spec.requests(kp, len(experts))
    for stage in sorted({r.stage for r in reqs}):
        values = spec.stat_values(stage, base, [e.clone() for e in experts], kp, ctx)
        for r in (r for r in reqs if r.stage == stage):
            out = []
            for i, v in enumerate(values[r.key]):
                flat = v.reshape(-1)
                if r.kind == "sum":
                    out.append(float(flat.sum(dtype=torch.float64)))
                elif r.kind == "max":
                    out.append(float(flat.max()))
                elif r.kind == "min":
                    out.append(float(flat.min()))
                else:
                    rank = r.rank(flat.numel(), i)
                    out.append(math.inf if rank >= flat.numel() else -math.inf if rank < 0
                               else float(torch.sort(flat).values[rank]))
            ctx.stats[r.key] = out
    return ctx.stats


def synthetic_expert_stats(kinds, experts) -> dict:
    """Per-expert statistics as the stats stage gives them, drawn from each expert's own values
    (so they travel with the expert when the experts are permuted): a positive-definite Gram
    matrix of the input dimension for a matrix (None otherwise), a positive Fisher."""
    out: dict = {}
    for kind in kinds:
        vals, counts = [], []
        for e in experts:
            g = torch.Generator().manual_seed(int(abs(float(e.double().sum())) * 1e6) % (2**31))
            if kind == "gram":
                if e.dim() != 2:
                    vals.append(None)
                    counts.append(None)
                    continue
                x = torch.randn(3 * e.shape[1], e.shape[1], generator=g)
                vals.append(x.T @ x)
                counts.append(torch.tensor([float(x.shape[0])]))
            else:
                vals.append(torch.rand(e.shape, generator=g) ** 2 + 0.05)
        out[kind] = vals
        if kind == "gram":
            out["gram_count"] = counts
    return out


def whole_model_only(spec: MethodSpec, params: dict | None = None, n: int | None = None) -> bool:
    """Whether these parameters merge through ``merge_model`` (forward passes on calibration
    data): such merges are tested in their own files, not here on one tensor."""
    n = n or example_inputs(spec)[0]
    kp, _ = resolve_params(spec, params or {}, n, has_base=spec.base != "unused")
    return spec.uses_whole_model(kp)


def skip_whole_model(name: str) -> None:
    if whole_model_only(REGISTRY[name]):
        pytest.skip(f"{name} merges whole models on calibration data (tests/ has its own tests)")


def run_merge(spec: MethodSpec, base, experts, params: dict | None = None, name: str = TENSOR):
    n = len(experts)
    kp, _ = resolve_params(spec, params or {}, n, has_base=base is not None)
    ctx = TensorContext(name, n, 1, 4, int(kp.get("seed", 0) or 0), {}, torch.device("cpu"))
    ctx.expert_stats = synthetic_expert_stats(spec.stats_kinds(kp), experts)
    if spec.statistics:
        _stats(spec, kp, base, experts, ctx)
    return spec.merge(None if spec.base == "unused" else base, [e.clone() for e in experts], kp, ctx)


def rand(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def family(n: int, shape=(24, 16), seed: int = 0):
    base = rand(seed, *shape)
    return base, [base + rand(seed + 1 + i, *shape) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# declarations
# ---------------------------------------------------------------------------------------------
def check_declarations(spec: MethodSpec) -> None:
    """What every registered method must declare (raises AssertionError naming what is missing)."""
    name = spec.name
    assert spec.summary and spec.paper, f"{name}: summary and paper"
    assert spec.formula, f"{name}: declare formula= (one line for the methods table)"
    assert spec.doc and "Paper" in spec.doc, f"{name}: the module docstring states formula and paper"
    assert isinstance(spec.order_invariant, bool), f"{name}: declare order_invariant=True/False"
    # a whole-model method that takes two different models (PLeaS) has no parameter point returning
    # one of them; its own tests check that merging a model with itself returns it
    assert spec.identities or (whole_model_only(spec) and spec.min_experts >= 2), \
        f"{name}: declare at least one Identity (a point returning the base or the expert)"
    assert spec.base in ("required", "optional", "unused"), name
    for p in spec.params:
        assert p.help, f"{name}.{p.name}: document the parameter (help=)"
        assert p.kind in ("float", "int", "bool", "str"), f"{name}.{p.name}: kind {p.kind!r}"
        if p.default is not None:
            p.check(p.default, f"{name}.{p.name}")  # the default is in its own range
    example_inputs(spec)  # the defaults validate for some inputs
    for ident in spec.identities:
        assert isinstance(ident, Identity), name
        assert not (ident.returns == "base" and spec.base == "unused"), f"{name}: no base to return"
        has_base = spec.base != "unused"
        spec.check_inputs(ident.n_experts, has_base)
        resolve_params(spec, dict(ident.params), ident.n_experts, has_base=has_base)


@pytest.mark.parametrize("name", NAMES)
def test_every_method_declares_what_the_registry_tests_need(name):
    check_declarations(REGISTRY[name])
    json.dumps(cli_methods.describe(REGISTRY[name]))  # machine-readable


def test_a_method_without_declarations_fails_the_registry_test():
    bare = MethodSpec(name="bare", summary="s", paper="p (arXiv:0000.00000)", doc="Paper: p",
                      params=(Param("t", "float", 0.5, "position"),), merge=lambda b, e, p, c: b)
    with pytest.raises(AssertionError, match="formula"):
        check_declarations(bare)
    with pytest.raises(AssertionError, match="order_invariant"):
        check_declarations(MethodSpec(**{**bare.__dict__, "formula": "b"}))
    with pytest.raises(AssertionError, match="Identity"):
        check_declarations(MethodSpec(**{**bare.__dict__, "formula": "b", "order_invariant": True}))
    undocumented = (Param("t", "float", 0.5, ""),)
    with pytest.raises(AssertionError, match="document"):
        check_declarations(MethodSpec(**{**bare.__dict__, "formula": "b", "order_invariant": True,
                                         "identities": (Identity({}, "base"),), "params": undocumented}))


def test_registry_is_every_public_module_of_the_package():
    assert method_modules() == NAMES
    assert not [n for n in NAMES if n.startswith("_")]


def test_registry_and_parameter_resolution_import_no_torch():
    # what building the workflow plan does (resolve every method's parameters), plus the statistics
    # requests, the JSON description and the docs tables
    code = (
        "import json, sys\n"
        "from mergesweep.merge.methods import REGISTRY\n"
        "from mergesweep.merge.spec import resolve_params\n"
        "from mergesweep.merge import cli_methods\n"
        "resolved = []\n"
        "for spec in REGISTRY.values():\n"
        "    has_base = spec.base != 'unused'\n"
        "    for n in (1, 2, 3):\n"
        "        try:\n"
        "            kp, _ = resolve_params(spec, {}, n, has_base=has_base)\n"
        "        except Exception:\n"
        "            continue\n"
        "        spec.requests(kp, n)\n"
        "        resolved.append(spec.name)\n"
        "        break\n"
        "    for ident in spec.identities:\n"
        "        resolve_params(spec, dict(ident.params), ident.n_experts, has_base=has_base)\n"
        "cli_methods.markdown(REGISTRY.values()); [cli_methods.describe(s) for s in REGISTRY.values()]\n"
        "assert resolved == list(REGISTRY), resolved\n"
        "print(json.dumps(sorted(m for m in ('torch', 'numpy', 'safetensors', 'transformers') if m in sys.modules)))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [], res.stdout


# ---------------------------------------------------------------------------------------------
# properties of every method
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_identity_points(name):
    spec = REGISTRY[name]
    for shape in [(24, 16), (37,)]:
        for ident in spec.identities:
            if whole_model_only(spec, dict(ident.params), ident.n_experts):
                continue
            base, experts = family(ident.n_experts, shape, seed=3)
            out = run_merge(spec, base if spec.base != "unused" else None, experts, dict(ident.params))
            want = base if ident.returns == "base" else experts[0]
            if ident.atol == 0:
                assert torch.equal(out, want), f"{name} {ident.describe()} {shape}"
            else:
                torch.testing.assert_close(out, want, atol=ident.atol, rtol=0, msg=f"{name} {ident.describe()}")


@pytest.mark.parametrize("name", NAMES)
def test_identical_inputs_return_them(name):
    spec = REGISTRY[name]
    skip_whole_model(name)
    n, has_base = example_inputs(spec)
    x = rand(5, 24, 16)
    out = run_merge(spec, x if has_base else None, [x.clone() for _ in range(n)])
    torch.testing.assert_close(out, x, atol=1e-6, rtol=1e-6)


def _spread(p: Param, v: float) -> list:
    """Three distinct valid values around a per-expert parameter's default."""
    vals = [v * 0.8, v, v * 1.1] if v else [0.0, 0.05, 0.1]
    lo = -math.inf if p.low is None else p.low
    hi = math.inf if p.high is None else p.high
    vals = [min(max(x, lo), hi) for x in vals]
    return [int(round(x)) for x in vals] if p.kind == "int" else vals


def varied_params(spec: MethodSpec, n: int, has_base: bool) -> dict:
    """Per-expert numeric parameters set to distinct values (each kept only if it validates)."""
    params: dict = {}
    for p in spec.params:
        if not p.per_expert or p.kind not in ("float", "int") or p.default is None:
            continue
        vals = _spread(p, p.default)[:n]
        trial = {**params, p.name: vals}
        try:
            resolve_params(spec, trial, n, has_base=has_base)
        except ConfigError:
            continue
        params = trial
    return params


@pytest.mark.parametrize("name", NAMES)
def test_order_invariance_as_declared(name):
    spec = REGISTRY[name]
    skip_whole_model(name)
    n, has_base = example_inputs(spec)
    base, experts = family(n, (24, 16), seed=11)
    base = base if has_base else None
    params = varied_params(spec, n, has_base)
    if any(p.per_expert and p.kind == "float" for p in spec.params):
        assert params, f"{name}: no per-expert parameter could be varied"
    perm = list(range(n))[::-1]
    out = run_merge(spec, base, experts, params)
    permuted = {k: [v[i] for i in perm] for k, v in params.items()}
    out_p = run_merge(spec, base, [experts[i] for i in perm], permuted)
    if spec.order_invariant:
        tol = 1e-4 if name == "tsv" else 1e-5
        torch.testing.assert_close(out_p, out, atol=tol, rtol=tol)
    elif any(p.name == "seed" for p in spec.params):
        assert not torch.equal(out_p, out), f"{name}: masks follow the expert index"


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_finite_and_deterministic(name):
    spec = REGISTRY[name]
    skip_whole_model(name)
    n, has_base = example_inputs(spec)
    for shape in [(24, 16), (37,), (6, 4, 5)]:
        base, experts = family(n, shape, seed=21)
        base = base if has_base else None
        out = run_merge(spec, base, experts)
        assert out.shape == torch.Size(shape) and out.dtype == torch.float32, name
        assert torch.isfinite(out).all(), name
        assert torch.equal(run_merge(spec, base, experts), out), f"{name}: not deterministic"
        if any(p.name == "seed" for p in spec.params):
            assert torch.equal(run_merge(spec, base, experts, {"seed": 5}),
                               run_merge(spec, base, experts, {"seed": 5}))
            assert not torch.equal(run_merge(spec, base, experts, {"seed": 5}), out), f"{name}: seed ignored"


# ---------------------------------------------------------------------------------------------
# the CLI and the generated documentation
# ---------------------------------------------------------------------------------------------
def test_methods_json_is_complete(capsys):
    assert main(["methods", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listed] == list(REGISTRY)
    for m in listed:
        for key in ("name", "summary", "paper", "formula", "base", "experts", "order_invariant", "deviations",
                    "mergekit", "identities", "params"):
            assert key in m, (m["name"], key)
        assert isinstance(m["order_invariant"], bool)
        for p in m["params"]:
            assert {"name", "kind", "default", "range", "per_expert", "help"} <= set(p)
    dare_ties = next(m for m in listed if m["name"] == "dare_ties")
    assert next(p for p in dare_ties["params"] if p["name"] == "normalize")["default"] is False  # as mergekit
    assert dare_ties["composition"]["sign election"].startswith("TIES")


def test_docs_tables_are_generated_from_the_registry(tmp_path, capsys):
    doc = ROOT / "docs" / "merge.md"
    want = cli_methods.markdown(REGISTRY.values())
    assert cli_methods.generated_block(doc.read_text()) == want, (
        "docs/merge.md is out of date: run `mergesweep methods --update-doc docs/merge.md`")
    assert main(["methods", "--markdown"]) == 0
    assert capsys.readouterr().out == want
    stale = tmp_path / "merge.md"
    stale.write_text(f"intro\n{cli_methods.BEGIN_MARKER}\nold\n{cli_methods.END_MARKER}\noutro\n")
    assert main(["methods", "--update-doc", str(stale)]) == 0
    assert stale.read_text() == f"intro\n{want}outro\n"


def test_density_zero_warns_that_the_expert_is_ignored(caplog):
    spec = REGISTRY["ties"]
    with caplog.at_level(logging.WARNING, logger="mergesweep.merge.methods"):
        resolve_params(spec, {"density": 0.0}, 2)
    assert "returns the base unchanged" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mergesweep.merge.methods"):
        resolve_params(REGISTRY["dare_linear"], {"density": [0.5, 0.0]}, 2)
        resolve_params(REGISTRY["ties"], {"density": 0.3}, 2)
    assert caplog.text.count("density") == 1 and "expert(s) 1" in caplog.text and "'dare_linear'" in caplog.text
    base, experts = family(2, (10, 10))
    assert torch.equal(run_merge(spec, base, experts, {"density": 0.0}), base)  # what the warning says
