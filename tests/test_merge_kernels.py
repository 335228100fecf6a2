"""Merge kernels on small tensors: hand-computed values, identities, sparsity/rescaling properties."""

from __future__ import annotations

import math

import pytest
import torch

from mergesweep.errors import ConfigError
from mergesweep.merge.context import TensorContext, seeded_generator
from mergesweep.merge.methods import REGISTRY
from mergesweep.merge.methods._parts import dare_drop, magprune, magprune_probabilities
from mergesweep.merge.methods.breadcrumbs import breadcrumbs, breadcrumbs_mask
from mergesweep.merge.methods.consensus import consensus
from mergesweep.merge.methods.dare_linear import dare_linear
from mergesweep.merge.methods.dare_ties import dare_ties
from mergesweep.merge.methods.della import della
from mergesweep.merge.methods.layer_swap import layer_index, parse_ranges, source_of
from mergesweep.merge.methods.linear import linear
from mergesweep.merge.methods.model_stock import model_stock
from mergesweep.merge.methods.pcb import pcb
from mergesweep.merge.methods.slerp import slerp
from mergesweep.merge.methods.task_arithmetic import task_arithmetic
from mergesweep.merge.methods.ties import ties
from mergesweep.merge.methods.tsv import tsv
from mergesweep.merge.select import CHUNK, StreamingKth, count_for_fraction, kth_smallest, topk_mask
from mergesweep.merge.spec import resolve_params

T = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """The CPU is shared: one torch thread for these tests (tests/conftest.py)."""


def gens(n, seed=0, name="w"):
    return [seeded_generator(seed, name, i) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# hand-computed examples
# ---------------------------------------------------------------------------------------------
def test_linear_hand():
    a, b = T(1, 2), T(3, 6)
    assert torch.equal(linear([a, b], [1, 3]), T(2.5, 5))
    assert torch.equal(linear([a, b], [1, 3], normalize=False), T(10, 20))


def test_task_arithmetic_hand():
    base = T(1, 1, 1)
    e1, e2 = T(2, 0, 1), T(1, 3, 1)  # tau1 = [1,-1,0], tau2 = [0,2,0]
    torch.testing.assert_close(task_arithmetic(base, [e1, e2], [1, 0.5], lam=2.0), T(3, 1, 1))
    torch.testing.assert_close(task_arithmetic(base, [e1, e2], [1, 0.5], lam=2.0, normalize=True), T(7 / 3, 1, 1))


TIES_TAUS = (T(3, -1, 0.5, -4, 2), T(-2, 2, 1, -1, -3), T(1, 1.5, -5, 2, 0.25))


def test_ties_hand():
    # density 0.6 of 5 -> keep 3 per expert:
    #   t1 = [3,0,0,-4,2]  t2 = [-2,2,0,0,-3]  t3 = [0,1.5,-5,2,0]
    #   sum = [1,3.5,-5,-2,-1] -> signs [+,+,-,-,-]
    #   disjoint mean = [3, (2+1.5)/2, -5, -4, -3]
    base = torch.ones(5)
    experts = [base + t for t in TIES_TAUS]
    out = ties(base, experts, [1, 1, 1], [0.6] * 3)
    torch.testing.assert_close(out, base + T(3, 1.75, -5, -4, -3))
    out = ties(base, experts, [1, 1, 1], [0.6] * 3, normalize=False)
    torch.testing.assert_close(out, base + T(3, 3.5, -5, -4, -3))
    out = ties(base, experts, [1, 1, 1], [0.6] * 3, lam=0.5)
    torch.testing.assert_close(out, base + 0.5 * T(3, 1.75, -5, -4, -3))


def test_ties_weighted_hand():
    # weights [1,2,1]: s = [3,0,0,-4,2], [-4,4,0,0,-6], [0,1.5,-5,2,0]; sum = [-1,5.5,-5,-2,-4]
    # signs [-,+,-,-,-]; agreeing: idx0 e2 (-4/2), idx1 e2,e3 ((4+1.5)/3), idx2 e3 (-5/1),
    # idx3 e1 (-4/1), idx4 e2 (-6/2)
    base = torch.zeros(5)
    out = ties(base, list(TIES_TAUS), [1, 2, 1], [0.6] * 3)
    torch.testing.assert_close(out, T(-2, 5.5 / 3, -5, -4, -3))


def test_ties_density1_is_disjoint_mean_task_arithmetic():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 8, generator=g)
    experts = [base + torch.randn(64, 8, generator=g) for _ in range(3)]
    taus = torch.stack([e - base for e in experts])
    sign = torch.where(taus.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(taus) == sign).float()
    disjoint_mean = (taus * agree).sum(0) / agree.sum(0).clamp_min(1)
    torch.testing.assert_close(ties(base, experts, [1] * 3, [1.0] * 3), base + disjoint_mean)


def test_dare_drop_rate_zero_is_task_arithmetic():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(100, generator=g)
    experts = [base + torch.randn(100, generator=g) for _ in range(2)]
    ta = task_arithmetic(base, experts, [0.7, 0.3], lam=1.5)
    out = dare_linear(base, experts, [0.7, 0.3], [1.0, 1.0], gens(2), lam=1.5)
    assert torch.equal(out, ta)  # the same parts: bit for bit


def test_breadcrumbs_hand():
    tau = T(0.1, -0.9, 0.5, 0.3, -0.7, 0.2, 0.05, 0.6, -0.4, 0.8)
    # gamma 0.1 -> drop the single largest (|-0.9|); density 0.5 -> keep the next five
    mask = breadcrumbs_mask(tau, 0.5, 0.1)
    assert mask.tolist() == [False, False, True, False, True, False, False, True, True, True]
    out = breadcrumbs(torch.zeros(10), [tau], [2.0], [0.5], [0.1], lam=1.0)
    torch.testing.assert_close(out, 2 * T(0, 0, 0.5, 0, -0.7, 0, 0, 0.6, -0.4, 0.8))


def test_slerp_hand():
    v0, v1 = T(1, 0), T(0, 1)
    h = math.sqrt(0.5)
    torch.testing.assert_close(slerp(v0, v1, 0.5), T(h, h))
    torch.testing.assert_close(slerp(v0, v1, 1 / 3), T(math.cos(math.pi / 6), 0.5))
    # parallel vectors: linear interpolation
    torch.testing.assert_close(slerp(T(1, 2), T(2, 4), 0.25), T(1.25, 2.5))


def test_slerp_endpoints_exact():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    assert torch.equal(slerp(a, b, 0.0), a)
    assert torch.equal(slerp(a, b, 1.0), b)


def test_model_stock_hand():
    base = torch.zeros(2)
    # orthogonal task vectors: cos = 0 -> t = 0 -> the base
    torch.testing.assert_close(model_stock(base, [T(1, 0), T(0, 1)]), base)
    # cos = 1/sqrt(2): t = 2c/(1+c) = 2*sqrt(2) - 2; average = [1, 0.5]
    t = 2 * math.sqrt(2) - 2
    torch.testing.assert_close(model_stock(base, [T(1, 1), T(1, 0)]), T(t, 0.5 * t))
    # filter-wise: row 0 has cos 1 (t = 1), row 1 orthogonal (t = 0)
    out = model_stock(torch.zeros(2, 2), [T(1, 1, 1, 0).reshape(2, 2), T(2, 2, 0, 1).reshape(2, 2)], filter_wise=True)
    torch.testing.assert_close(out, T(1.5, 1.5, 0, 0).reshape(2, 2))


def test_consensus_hand():
    base = torch.zeros(4)
    taus = [T(1, 0.1, 0, 2), T(1, 0, 0.1, -2), T(0.5, 0, 0, 0.1)]
    # tau_MTL = [2.5, 0.1, 0.1, 0.1]; TALL masks (lambda 0.5): [T,T,F,T], [T,F,T,T], [F,F,F,T]
    # votes [2,1,1,3] -> k=2 keeps entries 0 and 3
    out = consensus(base, taus, [1, 1, 1], [0.5] * 3, k=2, lam=1.0)
    torch.testing.assert_close(out, T(2.5, 0, 0, 0.1))
    out = consensus(base, taus, [1, 1, 1], [0.5] * 3, k=1, lam=2.0)
    torch.testing.assert_close(out, 2 * T(2.5, 0.1, 0.1, 0.1))


def test_tsv_hand_orthogonalisation():
    # Delta1 = e1 e1^T, Delta2 = u2 e2^T with u2 = (1,1)/sqrt(2): U = [e1 u2] is not orthogonal.
    # Its polar factor is the rotation by -22.5 degrees, V = I, S = I, so the merge is that rotation.
    h = math.sqrt(0.5)
    d1 = T(1, 0, 0, 0).reshape(2, 2)
    d2 = T(0, h, 0, h).reshape(2, 2)
    out = tsv(torch.zeros(2, 2), [d1, d2], sv_reduction=0.5)
    c, s = math.cos(math.pi / 8), math.sin(math.pi / 8)
    torch.testing.assert_close(out, T(c, s, -s, c).reshape(2, 2), atol=1e-6, rtol=0)


def test_tsv_orthogonal_tasks_add_and_vectors_average():
    e = torch.eye(4)
    d1 = 3 * torch.outer(e[0], e[1])
    d2 = 2 * torch.outer(e[2], e[3])
    torch.testing.assert_close(tsv(torch.zeros(4, 4), [d1, d2], sv_reduction=0.25), d1 + d2, atol=1e-6, rtol=0)
    torch.testing.assert_close(tsv(torch.ones(3), [T(2, 2, 2), T(0, 2, 4)], lam=1.0), T(1, 2, 3))


def test_pcb_single_expert_hand():
    # one expert, no clamping: scores are monotone in |d|, the lowest-scoring entry gets weight 0
    d = T(0.3, -0.1, 0.2, 0.05)
    out = pcb(torch.zeros(4), [d], [1.0], clamp_ratio=0.0)
    torch.testing.assert_close(out, T(0.3, -0.1, 0.2, 0.0))


def test_pcb_two_experts_hand():
    # d1 = [1, 0.5], d2 = [-1, 0.5], sum = [0, 1]; no clamping (lo = min, hi = max per expert)
    # intra_1 = exp(2 * ((|d|-0.5)/0.5)^2) = [e^2, 1]; inter_1 = tanh(d1 * sum) = [0, tanh .5]
    # scores_1 = [0, tanh .5], same for expert 2; density 1 -> q = min = 0, s = [0, 1]
    # merged entry 1 = (0.5 + 0.5) / 2 = 0.5; entry 0 has no weight -> 0
    out = pcb(torch.zeros(2), [T(1, 0.5), T(-1, 0.5)], [1.0, 1.0], clamp_ratio=0.0)
    torch.testing.assert_close(out, T(0.0, 0.5))


def test_layer_swap_sources():
    p = {"layers": ["", "0-1,5", "3"], "embeddings_from": 2}
    assert parse_ranges("0-2, 7") == {0, 1, 2, 7}
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("model.embed_tokens.weight") is None
    assert [source_of(f"model.layers.{i}.mlp.up_proj.weight", p, 3) for i in range(6)] == [1, 1, 0, 2, 0, 1]
    assert source_of("model.norm.weight", p, 3) == 2


# ---------------------------------------------------------------------------------------------
# identities
# ---------------------------------------------------------------------------------------------
def _rand(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


ONE_EXPERT = {
    "linear": lambda b, e: linear([e], [1.0]),
    "task_arithmetic": lambda b, e: task_arithmetic(b, [e], [1.0]),
    "ties": lambda b, e: ties(b, [e], [1.0], [1.0]),
    "dare_linear": lambda b, e: dare_linear(b, [e], [1.0], [1.0], gens(1)),
    "dare_ties": lambda b, e: dare_ties(b, [e], [1.0], [1.0], gens(1), normalize=True),
    "della": lambda b, e: della(b, [e], [1.0], [1.0], [0.0], gens(1)),
    "breadcrumbs": lambda b, e: breadcrumbs(b, [e], [1.0], [1.0], [0.0]),
    "model_stock": lambda b, e: model_stock(b, [e]),
    "consensus": lambda b, e: consensus(b, [e], [1.0], [0.4], k=1),
    "tsv": lambda b, e: tsv(b, [e], sv_reduction=1.0),
    "slerp": lambda b, e: slerp(b, e, 1.0),
}


@pytest.mark.parametrize("method", sorted(ONE_EXPERT))
def test_one_expert_with_weight_one_reproduces_it(method):
    base, expert = _rand(3, 24, 16), _rand(4, 24, 16)
    tol = 2e-5 if method == "tsv" else 2e-6  # tsv goes through two float32 SVDs
    torch.testing.assert_close(ONE_EXPERT[method](base, expert), expert, atol=tol, rtol=1e-5)


IDENTICAL = {
    **{k: v for k, v in ONE_EXPERT.items()},
    "ties_sparse": lambda b, e: ties(b, [e, e], [1, 1], [0.2, 0.2]),
    "dare_sparse": lambda b, e: dare_linear(b, [e, e], [1, 1], [0.3, 0.3], gens(2)),
    "della_sparse": lambda b, e: della(b, [e, e], [1, 1], [0.5, 0.5], [0.1, 0.1], gens(2)),
    "pcb": lambda b, e: pcb(b, [e, e], [0.1, 0.1]),
    "model_stock_3": lambda b, e: model_stock(b, [e, e, e]),
    "linear_3": lambda b, e: linear([e, e, e], [1, 2, 3]),
    "slerp_mid": lambda b, e: slerp(b, e, 0.3),
    "tsv_2": lambda b, e: tsv(b, [e, e]),
}


@pytest.mark.parametrize("method", sorted(IDENTICAL))
def test_identical_inputs_reproduce_the_input(method):
    x = _rand(5, 24, 16)
    # exact for most; weighted averages may round in the last bit
    torch.testing.assert_close(IDENTICAL[method](x, x.clone()), x, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# sparsity and rescaling properties
# ---------------------------------------------------------------------------------------------
def test_ties_trim_keeps_exactly_k_largest():
    base = torch.zeros(10_000)
    e = _rand(6, 10_000)
    out = ties(base, [e], [1.0], [0.2])
    kept = out != 0
    assert int(kept.sum()) == 2000
    assert float(e.abs()[kept].min()) >= float(e.abs()[~kept].max())
    assert torch.equal(out[kept], e[kept])  # one expert: the kept values are unchanged


def test_dare_drop_and_rescale_properties():
    d = _rand(7, 200_000)
    out = dare_drop(d.clone(), 0.3, seeded_generator(0, "t", 0))
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.3) < 0.005
    torch.testing.assert_close(out[kept], d[kept] / 0.3)
    assert abs(float(out.sum() - d.sum())) / float(d.abs().sum()) < 0.01  # unbiased in expectation
    same = dare_drop(d.clone(), 0.3, seeded_generator(0, "t", 0))
    assert torch.equal(out, same)
    other = dare_drop(d.clone(), 0.3, seeded_generator(1, "t", 0))
    assert not torch.equal(out, other)
    assert not torch.equal(out, dare_drop(d.clone(), 0.3, seeded_generator(0, "t", 1)))
    assert torch.equal(dare_drop(d.clone(), 0.0, seeded_generator(0, "t", 0)), torch.zeros_like(d))
    no_rescale = dare_drop(d.clone(), 0.3, seeded_generator(0, "t", 0), rescale=False)
    assert torch.equal(no_rescale[kept], d[kept])


def test_della_probabilities_hand_and_sampling():
    row = T(0.1, -0.4, 0.3, 0.2)  # magnitude ranks 0, 3, 2, 1
    p = magprune_probabilities(row.reshape(1, 4), 0.5, 0.1)
    torch.testing.assert_close(p, T(0.4, 0.6, 0.4 + 0.2 * 2 / 3, 0.4 + 0.2 / 3).reshape(1, 4))
    rows = row.repeat(50_000, 1)
    out = magprune(rows, 0.5, 0.1, seeded_generator(0, "t", 0))
    kept = out != 0
    torch.testing.assert_close(kept.float().mean(0), p[0], atol=0.01, rtol=0)
    torch.testing.assert_close(out[kept], (rows / p)[kept])  # each survivor rescaled by 1/p_j
    assert abs(float(kept.float().mean()) - 0.5) < 0.01


def test_breadcrumbs_counts():
    d = _rand(8, 5000)
    mask = breadcrumbs_mask(d, 0.6, 0.05)
    assert int(mask.sum()) == 3000
    mags = d.abs()
    assert float(mags[mask].max()) < float(torch.sort(mags, descending=True).values[249])


def test_pcb_keeps_density_fraction():
    d = _rand(9, 1000)
    out = pcb(torch.zeros(1000), [d], [0.1], clamp_ratio=0.0)
    # scores above the value of ascending rank floor(0.9 * 1000) = 900 survive: 99 entries
    assert int((out != 0).sum()) == 99
    kept = out != 0
    torch.testing.assert_close(out[kept], d[kept])
    assert float(d.abs()[kept].min()) > float(d.abs()[~kept].max())


# ---------------------------------------------------------------------------------------------
# the task-vector family: composed kernels against a plain whole-tensor reference
# ---------------------------------------------------------------------------------------------
def _reference_family(name, base, experts, p, ctx):
    """Straightforward whole-tensor implementation of the task-vector family (independent of
    the block-wise parts): sparsify, rescale, elect, combine, filter, theta_0 + lambda tau."""
    spec = REGISTRY[name]
    sparsify = spec.composition["sparsify"].split(":")[0].split(" ")[0]
    taus = []
    for i, e in enumerate(experts):
        t = e - base
        mag = t.abs()
        desc = torch.sort(mag.reshape(-1), descending=True).values
        n = t.numel()
        if sparsify == "magnitude":
            k = count_for_fraction(p["density"][i], n)
            t = t * (mag >= desc[k - 1]) if 0 < k < n else (t * 0 if k == 0 else t)
        elif sparsify == "breadcrumbs":
            n_top = count_for_fraction(p["gamma"][i], n)
            n_keep = min(count_for_fraction(p["density"][i], n), n - n_top)
            high = desc[n_top - 1] if n_top else math.inf
            t = t * ((mag >= desc[n_top + n_keep - 1]) & (mag < high))
        elif sparsify == "DARE":
            d = p["density"][i]
            keep = torch.rand(t.shape, generator=ctx.generator(i)) < d
            t = t * keep / (d if p["rescale"] else 1.0)
        elif sparsify == "DELLA":
            d, eps = p["density"][i], p["epsilon"][i]
            rows = mag.reshape(t.shape[0], -1) if t.dim() > 1 else mag.reshape(1, -1)
            ranks = torch.argsort(torch.argsort(rows, dim=1, stable=True), dim=1).float()
            prob = (d - eps + 2 * eps * ranks / (rows.shape[1] - 1)).reshape(t.shape)
            keep = torch.rand(t.shape, generator=ctx.generator(i)) < prob
            t = t * keep / (prob if p["rescale"] else 1.0)
        taus.append(t)
    w = torch.tensor(p["weight"]).reshape(-1, *([1] * base.dim()))
    s = torch.stack(taus) * w
    normalize = p.get("normalize", False)
    if spec.composition["sign election"] != "none":
        gamma = torch.where(s.sum(0) >= 0, 1.0, -1.0)
        agree = (torch.sign(s) == gamma).float()
        tau = (s * agree).sum(0)
        if normalize:
            den = (w * agree).sum(0)
            tau = tau / torch.where(den == 0, 1.0, den)
    else:
        tau = s.sum(0) / (float(w.sum()) if normalize else 1.0)
    if "filter" in spec.composition and p["k"] > 0:
        votes = sum((t.abs() > lam * (tau - t).abs()).int() for t, lam in zip(taus, p["mask_lambda"]))
        tau = tau * (votes >= p["k"])
    return base + p["lambda"] * tau


FAMILY_PARAMS = {
    "task_arithmetic": {},
    "ties": {"density": [0.3, 0.5, 0.7]},
    "dare_linear": {"density": [0.3, 0.5, 0.7], "seed": 3},
    "dare_ties": {"density": [0.3, 0.5, 0.7], "seed": 3},
    "della": {"density": [0.3, 0.5, 0.7], "epsilon": [0.1, 0.2, 0.25], "seed": 3},
    "della_linear": {"density": [0.3, 0.5, 0.7], "epsilon": [0.1, 0.2, 0.25], "seed": 3},
    "breadcrumbs": {"density": [0.3, 0.5, 0.7], "gamma": [0.01, 0.05, 0.1]},
    "consensus": {"mask_lambda": [0.3, 0.4, 0.5]},
}


@pytest.mark.parametrize("name", sorted(FAMILY_PARAMS))
def test_family_matches_the_whole_tensor_reference(name):
    spec = REGISTRY[name]
    assert spec.composition is not None  # built by task_vector_method
    # more elements than one block, so the block-wise kernels cross a block boundary
    shape = (CHUNK // 512 + 8, 512)
    base = _rand(30, *shape)
    experts = [base + 0.1 * _rand(31 + i, *shape) for i in range(3)]
    has_normalize = any(p.name == "normalize" for p in spec.params)
    for extra in ({}, {"weight": [1.0, -0.4, 0.7], "lambda": 0.8}, {"weight": [0.6, 1.0, 1.4], "normalize": True}):
        if "normalize" in extra and not has_normalize:
            continue
        kp, _ = resolve_params(spec, {**FAMILY_PARAMS[name], **extra}, 3)
        ctx = TensorContext("model.layers.0.self_attn.q_proj.weight", 3, 0, 2, kp.get("seed", 0))
        got = spec.merge(base, experts, kp, ctx)
        want = _reference_family(name, base, experts, kp, ctx)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5, msg=f"{name} {extra}")


# ---------------------------------------------------------------------------------------------
# faithfulness fixes
# ---------------------------------------------------------------------------------------------
def test_consensus_tall_mask_is_strict_on_exact_values():
    # entry 0: tau = 1, 1 -> tau_MTL = 2, |tau_MTL - tau_i| = 1: with mask_lambda 1 both sides are
    # exactly 1, and the reference's strict > gives no vote (>= gave two votes and kept the entry);
    # entry 1: 1 > 0.5 votes, 0.5 > 1 does not; entry 2: 0.5 > 0.5 gives no vote
    base = torch.zeros(3)
    taus = [T(1, 1, 0.5), T(1, 0.5, 0.5)]
    assert torch.equal(consensus(base, taus, [1, 1], [1.0, 1.0], k=1), T(0, 1.5, 0))
    # mask_lambda 0.75: entry 0 has two votes (1 > 0.75), entry 1 one, entry 2 two (0.5 > 0.375)
    assert torch.equal(consensus(base, taus, [1, 1], [0.75, 0.75], k=2), T(2, 0, 1))
    # through the spec: an entry no expert changes gets no vote even at mask_lambda 0
    kp, _ = resolve_params(REGISTRY["consensus"], {"mask_lambda": 0.0, "k": 1}, 2)
    out = REGISTRY["consensus"].merge(base, [T(0, 1, 0), T(0, 0, 2)], kp, TensorContext("w", 2))
    assert torch.equal(out, T(0, 1, 2))


def test_breadcrumbs_ties_go_with_the_rank_they_tie():
    tau = T(3, -3, 2, -2, 2, 1, 1, 1, 0.5, 0.5)
    # gamma 0.1 -> n_top = 1: the largest magnitude is 3, tied: both 3s are removed as outliers;
    # density 0.2 -> n_keep = 2: the 3rd largest magnitude is 2, tied: all three 2s are kept
    mask = breadcrumbs_mask(tau, 0.2, 0.1)
    assert mask.tolist() == [False, False, True, True, True, False, False, False, False, False]
    out = breadcrumbs(torch.zeros(10), [tau], [1.0], [0.2], [0.1])
    assert torch.equal(out, tau * mask)
    # no outliers, density 0.6: the 6th largest is 1, tied with two more: 8 entries kept, not 6
    assert int(breadcrumbs_mask(tau, 0.6, 0.0).sum()) == 8
    # distinct magnitudes: exactly the rank rule
    assert int(breadcrumbs_mask(_rand(40, 1000), 0.3, 0.05).sum()) == 300


def test_normalize_after_sign_election_rejects_only_weights_that_can_divide_by_zero():
    ties_spec = REGISTRY["ties"]
    # [1, -1]: where the task vectors have opposite signs both experts agree with the elected
    # sign, and the sum of their weights - the divisor - is 0
    taus = [T(1.0, 2.0), T(-1.0, 3.0)]
    out = ties(torch.zeros(2), taus, [1.0, -1.0], [1.0, 1.0], normalize=False)
    # entry 0: s = (1, (-1)(-1)) = (1, 1): both agree, divisor 1 - 1 = 0; entry 1: s = (2, -3), only
    # expert 1 agrees with the elected minus
    assert torch.equal(out, T(2.0, -3.0))
    with pytest.raises(ConfigError, match=r"params\.weight: the weights of experts 0, 1 sum to 0"):
        resolve_params(ties_spec, {"weight": [1, -1]}, 2)
    with pytest.raises(ConfigError, match=r"experts 0, 2 sum to 0"):
        resolve_params(ties_spec, {"weight": [1, 0.5, -1]}, 3)
    with pytest.raises(ConfigError, match=r"experts 0, 1, 2 sum to 0"):
        resolve_params(ties_spec, {"weight": [0.5, 0.5, -1]}, 3)
    resolve_params(ties_spec, {"weight": [1, -1], "normalize": False}, 2)
    resolve_params(ties_spec, {"weight": [1, -0.5]}, 2)
    resolve_params(ties_spec, {"weight": [1, -0.4, 0.7]}, 3)
    resolve_params(ties_spec, {"weight": [2, 0, 1]}, 3)
    with pytest.raises(ConfigError, match="sum to 0"):
        resolve_params(REGISTRY["della"], {"weight": [1, -1]}, 2)
    resolve_params(REGISTRY["dare_ties"], {"weight": [1, -1]}, 2)  # normalize: false by default
    # the weighted-sum methods divide by the sum of all weights
    resolve_params(REGISTRY["task_arithmetic"], {"weight": [1, -0.5, -0.5]}, 3)
    with pytest.raises(ConfigError, match="the weights sum to 0"):
        resolve_params(REGISTRY["task_arithmetic"], {"weight": [1, -0.5, -0.5], "normalize": True}, 3)
    # accepted signed weights: the disjoint mean divides by the agreeing weights
    out = ties(torch.zeros(3), [T(1, 2, -1), T(-1, 3, 1)], [1.0, -0.5], [1.0, 1.0])
    # entry 0: both agree, (1 + 0.5) / 0.5; entry 1: sum 2 - 1.5 > 0, expert 0 alone: 2;
    # entry 2: sum -1 - 0.5 < 0, both agree, (-1 - 0.5) / 0.5
    torch.testing.assert_close(out, T(3.0, 2.0, -3.0))


def test_dare_ties_defaults_follow_mergekit():
    spec = REGISTRY["dare_ties"]
    assert spec.param("normalize").default is False
    base = torch.zeros(50)
    experts = [_rand(41, 50), _rand(42, 50)]
    kp, _ = resolve_params(spec, {}, 2)
    got = spec.merge(base, experts, kp, TensorContext("w", 2))
    assert torch.equal(got, dare_ties(base, experts, [1.0, 1.0], [0.5, 0.5], gens(2), normalize=False))


# ---------------------------------------------------------------------------------------------
# selection helpers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1000, 300_000])
def test_kth_smallest_exact(n):
    x = _rand(10, n)
    x[::7] = 0.5  # many duplicates
    srt = torch.sort(x).values
    for k in (0, 1, n // 3, n // 2, n - 2, n - 1):
        assert float(kth_smallest(x, k)) == float(srt[k])
    assert topk_mask(x.abs(), n) is None
    assert int(topk_mask(x.abs(), 0).sum()) == 0
    assert count_for_fraction(0.29, 100) == 29


def test_streaming_kth_matches_sort():
    chunks = [_rand(11, 5000) * 3, _rand(12, 17, 31), torch.tensor([0.0, -0.0, 1e-30, -1e30])]
    allv = torch.cat([c.reshape(-1) for c in chunks])
    srt = torch.sort(allv).values
    for k in (0, 3, 2500, allv.numel() - 1):
        acc = StreamingKth()
        for c in chunks:
            acc.add_pass1(c)
        acc.locate(k)
        for c in chunks:
            acc.add_pass2(c)
        assert acc.result() == float(srt[k])
    assert acc.max == float(allv.max()) and acc.min == float(allv.min())
