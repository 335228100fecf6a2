"""Data-aware merge kernels (``regmean``, ``fisher``) against closed forms computed independently.

The kernels are called directly with a :class:`TensorContext` whose ``expert_stats`` the tests
fill (what the engine reads from the stats stage's files): RegMean against the least-squares
solution of the stacked problem (numpy ``lstsq``), the per-feature weighted average (alpha 0),
the average (equal Grams), the documented regulariser on singular Grams; Fisher against direct
numpy computations (equal Fishers, a zero Fisher, the global normalisation, the floor).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergesweep.errors import ConfigError, MergeError
from mergesweep.merge.context import TensorContext
from mergesweep.merge.methods import fisher as fisher_mod
from mergesweep.merge.methods import regmean as regmean_mod
from mergesweep.merge.methods._regmean import regmean_solve
from mergesweep.merge.spec import resolve_params

NAME = "model.layers.0.mlp.down_proj.weight"
REGMEAN = regmean_mod.SPEC
FISHER = fisher_mod.SPEC


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """The CPU is shared: one torch thread (tests/conftest.py)."""


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def t32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def run(spec, experts, params=None, stats=None, base=None, name=NAME, ctx_stats=None):
    n = len(experts)
    kp, _ = resolve_params(spec, params or {}, n, has_base=base is not None)
    ctx = TensorContext(name, n, 0, 2, 0, dict(ctx_stats or {}), expert_stats=dict(stats or {}))
    return spec.merge(base, [e.clone() for e in experts], kp, ctx)


def toy(seed: int, n: int = 3, out_dim: int = 5, in_dim: int = 7, tokens=(40, 25, 60)):
    """Per expert: inputs X_i [N_i, in] (float32-representable) and weights W_i [out, in]."""
    r = rng(seed)
    xs = [r.standard_normal((tokens[i], in_dim)).astype(np.float32).astype(np.float64) for i in range(n)]
    ws = [r.standard_normal((out_dim, in_dim)).astype(np.float32).astype(np.float64) for _ in range(n)]
    return xs, ws


def gram_stats(xs):
    """What the stats stage stores: the token sum of x x^T and the token count."""
    return {"gram": [t32(x.T @ x) for x in xs], "gram_count": [torch.tensor([float(len(x))]) for x in xs]}


def shrink(g: np.ndarray, alpha: float) -> np.ndarray:
    return alpha * g + (1 - alpha) * np.diag(np.diag(g))


def regmean_reference(ws, grams, alpha, ridge=0.0):
    """numpy: W_bar + [sum_i (W_i - W_bar) G~_i] (S + rho I)^-1 over the live inputs (the
    documented regulariser); dead inputs (S[j, j] = 0) keep W_bar; rho = 0 uses the pseudo-inverse
    with the documented cutoff (eigenvalues <= max * n_live * 2^-23 are zero)."""
    gt = [shrink(g, alpha) for g in grams]
    s = sum(gt)
    w_bar = sum(ws) / len(ws)
    rhs = sum((w - w_bar) @ g for w, g in zip(ws, gt))
    live = np.diag(s) > 0
    s_l = s[np.ix_(live, live)]
    rho = ridge * np.diag(s_l).mean()
    a = s_l + rho * np.eye(len(s_l))
    inv = np.linalg.inv(a) if rho > 0 else np.linalg.pinv(a, rcond=len(a) * 2.0 ** -23, hermitian=True)
    out = w_bar.copy()
    out[:, live] += rhs[:, live] @ inv
    return out


# ---------------------------------------------------------------------------------------------
# RegMean
# ---------------------------------------------------------------------------------------------
def test_regmean_alpha1_is_the_least_squares_solution_of_the_stacked_problem():
    xs, ws = toy(0)
    # the kernel divides each Gram by its token count: min_W sum_i (1/N_i) ||X_i W^T - X_i W_i^T||^2
    a = np.vstack([x / np.sqrt(len(x)) for x in xs])
    b = np.vstack([x @ w.T / np.sqrt(len(x)) for x, w in zip(xs, ws)])
    want = np.linalg.lstsq(a, b, rcond=None)[0].T
    got = run(REGMEAN, [t32(w) for w in ws], {"reduce_non_diagonal_ratio": 1.0, "ridge": 0.0}, gram_stats(xs))
    assert got.dtype == torch.float32 and got.shape == (5, 7)
    np.testing.assert_allclose(got.numpy(), want, atol=2e-5, rtol=0)
    # the solution differs from the average (the test can fail) and the default ridge barely moves it
    assert np.abs(want - sum(ws) / 3).max() > 0.05
    got_default_ridge = run(REGMEAN, [t32(w) for w in ws], {"reduce_non_diagonal_ratio": 1.0}, gram_stats(xs))
    np.testing.assert_allclose(got_default_ridge.numpy(), want, atol=1e-4, rtol=0)


def test_regmean_without_counts_uses_the_token_sums():
    """counts=None: the unnormalised problem min_W sum_i ||X_i W^T - X_i W_i^T||^2."""
    xs, ws = toy(1)
    want = np.linalg.lstsq(np.vstack(xs), np.vstack([x @ w.T for x, w in zip(xs, ws)]), rcond=None)[0].T
    got = regmean_solve([t32(w) for w in ws], [t32(x.T @ x) for x in xs], 1.0, 0.0)
    np.testing.assert_allclose(got.numpy(), want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_regmean_with_equal_grams_is_the_average(alpha):
    xs, ws = toy(2)
    x = xs[0]
    stats = {"gram": [t32(x.T @ x)] * 3, "gram_count": [torch.tensor([40.0])] * 3}
    got = run(REGMEAN, [t32(w) for w in ws], {"reduce_non_diagonal_ratio": alpha}, stats)
    np.testing.assert_allclose(got.numpy(), sum(ws) / 3, atol=1e-5, rtol=0)


def test_regmean_alpha0_is_the_per_input_feature_weighted_average():
    xs, ws = toy(3)
    d = [np.diag(x.T @ x) / len(x) for x in xs]  # [in] per expert
    want = sum(w * di[None, :] for w, di in zip(ws, d)) / sum(d)[None, :]
    got = run(REGMEAN, [t32(w) for w in ws], {"reduce_non_diagonal_ratio": 0.0, "ridge": 0.0}, gram_stats(xs))
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("alpha,ridge", [(0.5, 0.0), (0.5, 1e-6), (0.9, 0.1)])
def test_regmean_matches_the_documented_formula(alpha, ridge):
    xs, ws = toy(4)
    grams = [x.T @ x / len(x) for x in xs]
    got = run(REGMEAN, [t32(w) for w in ws], {"reduce_non_diagonal_ratio": alpha, "ridge": ridge}, gram_stats(xs))
    want = regmean_reference(ws, grams, alpha, ridge)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5, rtol=0)
    if ridge == 0.0:  # the paper's form, without the average correction
        gt = [shrink(g, alpha) for g in grams]
        np.testing.assert_allclose(got.numpy(), sum(w @ g for w, g in zip(ws, gt)) @ np.linalg.inv(sum(gt)),
                                   atol=1e-5, rtol=0)
    if ridge == 0.1:  # a large ridge visibly pulls towards the average
        plain = regmean_reference(ws, grams, alpha, 0.0)
        assert np.abs(got.numpy() - plain).max() > 1e-3


@pytest.mark.parametrize("ridge", [0.0, 1e-6, 1e-2])
def test_regmean_singular_grams_are_finite_and_follow_the_regulariser(ridge):
    """Input 2 is dead for every expert (zero row and column), input 5 for expert 0 only, and the
    experts have fewer tokens than live inputs (rank-deficient Grams) at alpha = 1."""
    r = rng(5)
    in_dim, out_dim = 9, 4
    xs = []
    for i, n_tok in enumerate((2, 2, 2)):
        x = r.standard_normal((n_tok, in_dim)).astype(np.float32).astype(np.float64)
        x[:, 2] = 0.0
        if i == 0:
            x[:, 5] = 0.0
        xs.append(x)
    ws = [r.standard_normal((out_dim, in_dim)).astype(np.float32).astype(np.float64) for _ in range(3)]
    assert np.linalg.matrix_rank(sum(x.T @ x for x in xs)) < in_dim - 1  # singular even without the dead input
    # the Grams as the kernel sees them: float32 token sums, divided by the counts in float64
    grams = [t32(x.T @ x).numpy().astype(np.float64) / len(x) for x in xs]
    got = run(REGMEAN, [t32(w) for w in ws], {"reduce_non_diagonal_ratio": 1.0, "ridge": ridge}, gram_stats(xs))
    assert torch.isfinite(got).all()
    w_bar = sum(ws) / 3
    # the dead input keeps the experts' average
    np.testing.assert_allclose(got.numpy()[:, 2], w_bar[:, 2], atol=1e-6, rtol=0)
    np.testing.assert_allclose(got.numpy(), regmean_reference(ws, grams, 1.0, ridge), atol=1e-4, rtol=0)
    if ridge == 0.0:
        # exact RegMean where the data determine it: the normal equations W S = sum_i W_i G_i hold,
        # and in the null space of S the weights are the average's
        s = sum(grams)
        np.testing.assert_allclose(got.numpy() @ s, sum(w @ g for w, g in zip(ws, grams)), atol=1e-4, rtol=0)
        evals, evecs = np.linalg.eigh(s)
        null = evecs[:, evals <= evals.max() * in_dim * 2.0 ** -23]
        assert null.shape[1] >= 3  # the dead input and at least two directions no token spans
        np.testing.assert_allclose((got.numpy() - w_bar) @ null, 0.0, atol=1e-4)
        assert np.abs(w_bar @ null).max() > 0.1  # (not trivially 0)


def test_regmean_all_grams_zero_or_no_tokens_is_the_average():
    ws = [t32(rng(6).standard_normal((3, 4))) for _ in range(2)]
    zero = {"gram": [torch.zeros(4, 4)] * 2, "gram_count": [torch.tensor([0.0])] * 2}
    for params in ({}, {"ridge": 0.0, "reduce_non_diagonal_ratio": 1.0}):
        got = run(REGMEAN, ws, params, zero)
        torch.testing.assert_close(got, (ws[0] + ws[1]) / 2, atol=1e-7, rtol=0)


def test_regmean_one_expert_returns_it_bit_for_bit():
    xs, ws = toy(7, n=1, tokens=(3,))  # rank-deficient Gram
    w = t32(ws[0])
    for params in ({}, {"ridge": 0.0, "reduce_non_diagonal_ratio": 1.0}):
        assert torch.equal(run(REGMEAN, [w], params, gram_stats(xs)), w)


def test_regmean_fallback_for_tensors_without_grams():
    r = rng(8)
    base = t32(r.standard_normal(6))
    experts = [t32(r.standard_normal(6)) for _ in range(3)]
    e = np.stack([x.numpy() for x in experts]).astype(np.float64)
    avg = run(REGMEAN, experts)  # no statistics at all
    np.testing.assert_allclose(avg.numpy(), e.mean(0), atol=1e-6)
    none = run(REGMEAN, experts, stats={"gram": [None] * 3, "gram_count": [None] * 3})
    assert torch.equal(none, avg)
    ta = run(REGMEAN, experts, {"fallback": "task_arithmetic", "lambda": 0.3}, base=base)
    b = base.numpy().astype(np.float64)
    np.testing.assert_allclose(ta.numpy(), b + 0.3 * (e - b).sum(0), atol=1e-6)


def test_regmean_inconsistent_statistics_name_the_tensor():
    xs, ws = toy(9)
    stats = gram_stats(xs)
    stats["gram"][1] = None
    with pytest.raises(MergeError, match=f"'{NAME}'.*expert\\(s\\) 1"):
        run(REGMEAN, [t32(w) for w in ws], {}, stats)
    with pytest.raises(MergeError, match="'model.norm.weight'.*RegMean needs a linear weight"):
        run(REGMEAN, [torch.ones(7)] * 3, {}, gram_stats(xs), name="model.norm.weight")
    bad = gram_stats(xs)
    bad["gram"][2] = torch.full((7, 7), float("nan"))
    with pytest.raises(MergeError, match="expert 2's Gram matrix has non-finite"):
        run(REGMEAN, [t32(w) for w in ws], {}, bad)


def test_regmean_declarations():
    assert REGMEAN.base == "optional" and REGMEAN.stats_kinds(resolve_params(REGMEAN, {}, 2)[0]) == ("gram",)
    assert not REGMEAN.requests(resolve_params(REGMEAN, {}, 2)[0], 2)
    xs, ws = toy(10, n=3)
    for ident in REGMEAN.identities:  # with Gram statistics (the registry test runs them without)
        n = ident.n_experts
        experts = [t32(w) for w in ws[:n]]
        base = t32(rng(11).standard_normal((5, 7)))
        got = run(REGMEAN, experts, dict(ident.params), gram_stats(xs[:n]), base=base)
        want = experts[0] if ident.returns == "expert" else base
        torch.testing.assert_close(got, want, atol=ident.atol, rtol=0)


@pytest.mark.parametrize("params,has_base,key", [
    ({"reduce_non_diagonal_ratio": 1.5}, True, "params.reduce_non_diagonal_ratio"),
    ({"reduce_non_diagonal_ratio": -0.1}, True, "params.reduce_non_diagonal_ratio"),
    ({"ridge": -1e-3}, True, "params.ridge"),
    ({"fallback": "base"}, True, "params.fallback"),
    ({"fallback": "task_arithmetic"}, False, "params.fallback"),
])
def test_regmean_bad_params_name_the_key(params, has_base, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_params(REGMEAN, params, 2, has_base=has_base)


# ---------------------------------------------------------------------------------------------
# Fisher
# ---------------------------------------------------------------------------------------------
def fisher_toy(seed: int, n: int = 3, shape=(6, 5)):
    r = rng(seed)
    thetas = [t32(r.standard_normal(shape)) for _ in range(n)]
    fishers = [t32(r.uniform(0.5, 1.5, shape)) for _ in range(n)]
    return thetas, fishers


def as64(ts):
    return np.stack([t.numpy().astype(np.float64) for t in ts])


def test_fisher_with_equal_fishers_is_the_weighted_average():
    thetas, fishers = fisher_toy(20)
    stats = {"fisher_model": [fishers[0]] * 3}
    got = run(FISHER, thetas, {}, stats)
    np.testing.assert_allclose(got.numpy(), as64(thetas).mean(0), atol=1e-6, rtol=0)
    w = [0.2, 1.0, 0.5]
    got_w = run(FISHER, thetas, {"weight": w}, stats)
    want_w = np.tensordot(np.array(w), as64(thetas), 1) / sum(w)
    np.testing.assert_allclose(got_w.numpy(), want_w, atol=1e-6, rtol=0)


def test_fisher_matches_the_direct_formula_and_differs_from_the_average():
    thetas, fishers = fisher_toy(21)
    w = np.array([1.0, 0.5, 2.0])
    got = run(FISHER, thetas, {"weight": list(w), "fisher_target": "labels"}, {"fisher": fishers})
    f = np.maximum(as64(fishers), 1e-6) * w[:, None, None]
    want = (f * as64(thetas)).sum(0) / f.sum(0)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6, rtol=0)
    assert np.abs(want - as64(thetas).mean(0)).max() > 0.05


def test_fisher_zero_fisher_ignores_that_expert_up_to_the_floor():
    thetas, fishers = fisher_toy(22)
    fishers[1] = torch.zeros_like(fishers[1])
    got = run(FISHER, thetas, {}, {"fisher_model": fishers})
    without = run(FISHER, [thetas[0], thetas[2]], {}, {"fisher_model": [fishers[0], fishers[2]]})
    # expert 1 keeps weight eps / (F_0 + F_2 + eps) <= 1e-6: its influence is below 1e-5 here
    np.testing.assert_allclose(got.numpy(), without.numpy(), atol=1e-5, rtol=0)
    # a large floor gives it back weight: the test can tell
    floored = run(FISHER, thetas, {"minimal_fisher_weight": 1.0}, {"fisher_model": fishers})
    assert np.abs(floored.numpy() - without.numpy()).max() > 0.05


def test_fisher_entries_no_fisher_sees_take_the_weighted_average():
    thetas, fishers = fisher_toy(23)
    for f in fishers:
        f[0, :] = 0.0
    w = [1.0, 3.0, 0.5]
    got = run(FISHER, thetas, {"weight": w}, {"fisher_model": fishers})
    want_row = np.tensordot(np.array(w), as64(thetas)[:, 0, :], 1) / sum(w)
    np.testing.assert_allclose(got.numpy()[0], want_row, atol=1e-6, rtol=0)
    assert torch.isfinite(got).all()


def test_fisher_normalisation_against_a_direct_computation():
    """Two tensors of one model: the engine sums stat_values over both (StatRequest kind sum);
    each Fisher is divided by its expert's global L2 norm, then floored."""
    r = rng(24)
    shapes = {"a.weight": (4, 3), "b.weight": (5,)}
    thetas = {k: [t32(r.standard_normal(s)) for _ in range(2)] for k, s in shapes.items()}
    scale = [1.0, 1000.0]  # expert 1's Fisher is 1000x larger: without normalisation it dominates
    fishers = {k: [t32(r.uniform(0.0, 2.0, s) * scale[i]) for i in range(2)] for k, s in shapes.items()}
    fishers["a.weight"][0][0, 0] = 0.0  # an entry under the floor after normalisation
    params = {"normalize_fisher_weight": True, "minimal_fisher_weight": 1e-3}
    kp, _ = resolve_params(FISHER, params, 2)
    reqs = FISHER.requests(kp, 2)
    assert [(q.key, q.kind) for q in reqs] == [(fisher_mod.NORM_KEY, "sum")]
    sums = [0.0, 0.0]
    for k in shapes:
        ctx = TensorContext(k, 2, expert_stats={"fisher_model": fishers[k]})
        vals = FISHER.stat_values(0, None, thetas[k], kp, ctx)[fisher_mod.NORM_KEY]
        for i, v in enumerate(vals):
            sums[i] += float(v.sum(dtype=torch.float64))
    norms = [np.sqrt(sum((fishers[k][i].numpy().astype(np.float64) ** 2).sum() for k in shapes)) for i in range(2)]
    np.testing.assert_allclose(np.sqrt(sums), norms, rtol=1e-12)
    for k in shapes:
        got = run(FISHER, thetas[k], params, {"fisher_model": fishers[k]}, name=k,
                  ctx_stats={fisher_mod.NORM_KEY: sums})
        f = np.stack([np.maximum(fishers[k][i].numpy().astype(np.float64) / norms[i], 1e-3) for i in range(2)])
        want = (f * as64(thetas[k])).sum(0) / f.sum(0)
        np.testing.assert_allclose(got.numpy(), want, atol=1e-6, rtol=0)
        plain = run(FISHER, thetas[k], {"minimal_fisher_weight": 1e-3}, {"fisher_model": fishers[k]}, name=k)
        assert np.abs(plain.numpy() - want).max() > 0.05  # normalisation changes the result
    with pytest.raises(MergeError, match="whole-model Fisher norms"):
        run(FISHER, thetas["b.weight"], params, {"fisher_model": fishers["b.weight"]})


def test_fisher_without_statistics_and_inconsistent_statistics():
    thetas, fishers = fisher_toy(25)
    got = run(FISHER, thetas, {"weight": [1.0, 2.0, 1.0]})
    want = (as64(thetas) * np.array([1.0, 2.0, 1.0])[:, None, None]).sum(0) / 4
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6, rtol=0)
    with pytest.raises(MergeError, match=f"'{NAME}'.*expert\\(s\\) 0"):
        run(FISHER, thetas, {}, {"fisher_model": [None, fishers[1], fishers[2]]})
    fishers[2][1, 1] = float("inf")
    with pytest.raises(MergeError, match="expert 2's Fisher has non-finite"):
        run(FISHER, thetas, {}, {"fisher_model": fishers})


def test_fisher_declarations_and_identities_with_fishers():
    kp = resolve_params(FISHER, {}, 2)[0]
    assert FISHER.base == "unused" and FISHER.stats_kinds(kp) == ("fisher_model",)
    assert FISHER.stats_kinds(resolve_params(FISHER, {"fisher_target": "labels"}, 2)[0]) == ("fisher",)
    assert FISHER.requests(kp, 2) == []
    thetas, fishers = fisher_toy(26)
    for ident in FISHER.identities:
        n = ident.n_experts
        got = run(FISHER, thetas[:n], dict(ident.params), {"fisher_model": fishers[:n]})
        assert torch.equal(got, thetas[0]), ident.describe()


@pytest.mark.parametrize("params,key", [
    ({"weight": [0.0, 0.0]}, "params.weight"),
    ({"weight": [1.0, -1.0]}, r"params.weight\[1\]"),
    ({"minimal_fisher_weight": 0.0}, "params.minimal_fisher_weight"),
    ({"fisher_target": "empirical"}, "params.fisher_target"),
])
def test_fisher_bad_params_name_the_key(params, key):
    with pytest.raises(ConfigError, match=key):
        resolve_params(FISHER, params, 2, has_base=False)
