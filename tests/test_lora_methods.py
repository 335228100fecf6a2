"""The LoRA-native kernels (mergesweep.merge.methods._lora) on random adapters: the MSU
properties of LoRA-LEGO, RMM's closed form against an independent SVD, KnOTS' alignment and its
TIES merge against an independent dense computation (numpy, float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergesweep.merge.methods import REGISTRY, _lora
from mergesweep.merge.spec import resolve_params

OUT, IN = 20, 14


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """The CPU is shared: one torch thread (tests/conftest.py)."""


def adapter(seed: int, r: int, scaling: float = 0.5, out: int = OUT, inn: int = IN):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, r, generator=g), torch.randn(r, inn, generator=g), scaling


def np_delta(f) -> np.ndarray:
    b, a, s = f
    return s * (b.double().numpy() @ a.double().numpy())


def close(x, y, tol=1e-5):
    x = x.double().numpy() if isinstance(x, torch.Tensor) else x
    scale = max(1.0, float(np.abs(y).max()))
    np.testing.assert_allclose(x, y, atol=tol * scale, rtol=0)


# ---------------------------------------------------------------------------------------------
# LoRA-LEGO: minimal semantic units
# ---------------------------------------------------------------------------------------------
def test_permuting_the_rank1_units_leaves_the_update_unchanged():
    b, a, s = adapter(1, 6, 0.75)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(2))
    bu, au = _lora.msus([(b, a, s)])
    bp, ap = _lora.msus([(b[:, perm], a[perm], s)])
    close(_lora.assemble(bp, ap), np_delta((b, a, s)))
    close(_lora.assemble(bp, ap), _lora.assemble(bu, au).double().numpy())
    # the merge sees a set of units: the permuted adapter merges to the same update
    m1 = _lora.lora_lego([(b, a, s)], k=3)
    m2 = _lora.lora_lego([(b[:, perm], a[perm], s)], k=3)
    close(m1.b @ m1.a, (m2.b @ m2.a).double().numpy())


def test_concatenating_two_adapters_units_sums_their_updates():
    f1, f2 = adapter(3, 4, 0.5), adapter(4, 7, 2.0)  # different ranks and scalings (folded in)
    b, a = _lora.msus([f1, f2])
    assert b.shape == (OUT, 11) and a.shape == (11, IN)
    close(_lora.assemble(b, a), np_delta(f1) + np_delta(f2))
    # a negative scaling keeps its sign
    f3 = adapter(5, 2, -1.5)
    b, a = _lora.msus([f1, f3])
    close(_lora.assemble(b, a), np_delta(f1) + np_delta(f3))


def test_k_equal_to_the_total_rank_without_reweighting_is_the_sum():
    fs = [adapter(10, 3), adapter(11, 5, 1.0), None, adapter(12, 4, 0.25)]
    want = sum(np_delta(f) for f in fs if f is not None)
    for k in (12, 20):  # the total rank, and more
        m = _lora.lora_lego(fs, k=k, reweight="none")
        assert m.clusters == 12 and m.b.shape == (OUT, 12)
        close(m.b @ m.a, want)
    # with reweighting the sum is scaled by sqrt(r_mean / k) (parameter reweighting: singletons, 1)
    m = _lora.lora_lego(fs, k=12, reweight="dual")
    close(m.b @ m.a, math.sqrt(4 / 12) * want)


def _planted(seed: int):
    """Three adapters whose 9 units form 3 well-separated groups (one unit of each group per
    adapter): the clusters k-means must find, and their members."""
    g = torch.Generator().manual_seed(seed)
    centres = 5 * torch.randn(3, OUT + IN, generator=g)
    fs, groups = [], {0: [], 1: [], 2: []}
    for i in range(3):
        units = centres + 0.05 * torch.randn(3, OUT + IN, generator=g)
        order = torch.randperm(3, generator=g)
        units = units[order]
        fs.append((units[:, :OUT].T.contiguous(), units[:, OUT:].contiguous(), 1.0))
        for j, c in enumerate(order.tolist()):
            groups[c].append(units[j].double().numpy())
    return fs, groups


def test_lora_lego_clusters_planted_units_and_reweights_as_documented():
    fs, groups = _planted(7)
    want = {"none": 0, "parameter": 0, "output": 0, "dual": 0}
    for members in groups.values():
        members = np.stack(members)
        c = members.mean(0)
        rho = np.linalg.norm(members, axis=1).mean() / np.linalg.norm(c)
        outer = np.outer(c[:OUT], c[OUT:])
        want["none"] = want["none"] + outer
        want["parameter"] = want["parameter"] + rho ** 2 * outer
    want["output"] = want["none"] * math.sqrt(3 / 3)
    want["dual"] = want["parameter"] * math.sqrt(3 / 3)
    for rw, w in want.items():
        m = _lora.lora_lego(fs, k=3, reweight=rw)
        assert m.clusters == 3 and m.units == 9
        close(m.b @ m.a, w)
    # k = 2 < r: output reweighting sqrt(r_mean / k) = sqrt(3 / 2)
    m_none = _lora.lora_lego(fs, k=2, reweight="none")
    m_out = _lora.lora_lego(fs, k=2, reweight="output")
    close(m_out.b @ m_out.a, math.sqrt(3 / 2) * (m_none.b @ m_none.a).double().numpy())
    assert m_out.output_scale == pytest.approx(math.sqrt(1.5))


def test_kmeans_is_deterministic_and_independent_of_the_order_of_the_points():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    labels, centres, _ = _lora.kmeans(x, 5)
    perm = torch.randperm(40, generator=g)
    labels_p, centres_p, _ = _lora.kmeans(x[perm], 5)
    part = {frozenset(torch.nonzero(labels == c).flatten().tolist()) for c in range(5)}
    part_p = {frozenset(perm[torch.nonzero(labels_p == c).flatten()].tolist()) for c in range(5)}
    assert part == part_p
    assert torch.equal(_lora.kmeans(x, 5)[0], labels)
    # Lloyd's fixed point: every centre is the mean of its points, every point nearest its centre
    for c in range(5):
        torch.testing.assert_close(centres[c], x[labels == c].mean(0), atol=1e-5, rtol=0)
    d = torch.cdist(x.double(), centres.double())
    assert torch.equal(d.argmin(1), labels)


def test_lora_lego_is_independent_of_the_order_of_the_experts():
    fs = [adapter(20 + i, 4, 0.5 + 0.25 * i) for i in range(3)]
    m = _lora.lora_lego(fs, k=5)
    mp = _lora.lora_lego(fs[::-1], k=5)
    close(mp.b @ mp.a, (m.b @ m.a).double().numpy())


# ---------------------------------------------------------------------------------------------
# RMM
# ---------------------------------------------------------------------------------------------
def _rmm_tasks():
    # heterogeneous ranks and scalings; one expert does not adapt the module (its update is 0)
    return [adapter(30, 4, 0.5), adapter(31, 2, 2.0), None, adapter(33, 6, 1.0)]


def _reverted(mod, k):
    b, a = _lora.rmm_reconstruct(mod.b, mod.a, mod.cores, mod.coefficients[k])
    return b.double().numpy() @ a.double().numpy()


def test_rmm_with_as_many_components_as_experts_reverts_every_expert():
    fs = _rmm_tasks()
    mod = _lora.rmm(fs, len(fs))
    for k, f in enumerate(fs):
        want = np_delta(f) if f is not None else np.zeros((OUT, IN))
        close(_reverted(mod, k), want)
    # a reverted adapter has the expert's own rank
    b, _ = _lora.rmm_reconstruct(mod.b, mod.a, mod.cores, mod.coefficients[1])
    assert b.shape[1] == 2
    np.testing.assert_allclose(mod.sq_errors.numpy(), 0, atol=1e-9 * float(mod.sq_norms.max()))


@pytest.mark.parametrize("m", [1, 2])
def test_rmm_with_fewer_components_is_the_best_rank_m_approximation(m):
    fs = _rmm_tasks()
    deltas = [np_delta(f) if f is not None else np.zeros((OUT, IN)) for f in fs]
    stacked = np.stack([d.ravel() for d in deltas])          # n x (out in), computed independently
    u, s, vt = np.linalg.svd(stacked, full_matrices=False)
    best = (u[:, :m] * s[:m]) @ vt[:m]                         # Eckart-Young: the best rank-m
    best_err = ((stacked - best) ** 2).sum(1)
    mod = _lora.rmm(fs, m)
    assert mod.coefficients.shape == (4, m) and mod.cores.shape[0] == m
    errs = np.array([((_reverted(mod, k) - deltas[k]) ** 2).sum() for k in range(4)])
    scale = (stacked ** 2).sum()
    # no larger than the best rank-m approximation's error, task by task (and so equal to it)
    assert (errs <= best_err + 1e-6 * scale).all(), (errs, best_err)
    np.testing.assert_allclose(errs, best_err, atol=1e-6 * scale)
    np.testing.assert_allclose(errs.sum(), (s[m:] ** 2).sum(), rtol=1e-5)
    np.testing.assert_allclose(mod.sq_errors.numpy(), best_err, atol=1e-6 * scale)
    # the basis is orthonormal in the Frobenius inner product
    phis = np.stack([(mod.b.double().numpy() @ c.double().numpy() @ mod.a.double().numpy()).ravel()
                     for c in mod.cores])
    np.testing.assert_allclose(phis @ phis.T, np.eye(m), atol=1e-5)


def test_rmm_of_identical_or_absent_updates():
    f = adapter(40, 3)
    mod = _lora.rmm([f, f, f], 3)  # one direction: one component is kept
    assert mod.coefficients.shape == (3, 1)
    for k in range(3):
        close(_reverted(mod, k), np_delta(f))
    assert _lora.rmm([None, None], 2) is None


# ---------------------------------------------------------------------------------------------
# KnOTS
# ---------------------------------------------------------------------------------------------
def _knots_tasks():
    return [adapter(50, 4, 0.5), adapter(51, 3, 2.0), adapter(52, 5, 1.0)]


def test_knots_aligned_coefficients_reconstruct_every_update():
    fs = _knots_tasks()
    u, cs = _lora.knots_align(fs)
    assert u.shape == (OUT, 12) and all(c.shape == (12, IN) for c in cs)  # the total rank 4 + 3 + 5
    np.testing.assert_allclose(u.double().numpy().T @ u.double().numpy(), np.eye(u.shape[1]), atol=1e-5)
    for f, c in zip(fs, cs):
        close(u @ c, np_delta(f))
    # the singular values are those of the dense concatenation
    joint = np.concatenate([np_delta(f) for f in fs], axis=1)
    s = np.linalg.svd(joint, compute_uv=False)
    s_got = np.sort(np.array([np.linalg.norm(np.concatenate([c[j].double().numpy() for c in cs]))
                              for j in range(u.shape[1])]))[::-1]
    np.testing.assert_allclose(s_got, s[:u.shape[1]], rtol=1e-5)


def test_knots_with_one_task_returns_its_update():
    f = adapter(60, 4)
    for method, density in [("task_arithmetic", 0.2), ("ties", 1.0), ("dare_ties", 1.0)]:
        r = _lora.knots([f], method, density)
        assert r.rank == 4
        close(r.b @ r.a, np_delta(f))
    # an expert that does not adapt the module takes no part
    r = _lora.knots([None, f], "ties", 1.0)
    close(r.b @ r.a, np_delta(f))


def test_knots_task_arithmetic_is_the_sum():
    fs = _knots_tasks()
    r = _lora.knots(fs, "task_arithmetic", lam=0.7)
    close(r.b @ r.a, 0.7 * sum(np_delta(f) for f in fs))


def _np_ties(cs, density, lam):
    """TIES on whole matrices, written out (ties kept at the threshold, + where the sum is 0)."""
    kept = []
    for c in cs:
        k = math.floor(density * c.size + 1e-9)
        thr = np.sort(np.abs(c).ravel())[::-1][k - 1]
        kept.append(np.where(np.abs(c) >= thr, c, 0.0))
    kept = np.stack(kept)
    gamma = np.where(kept.sum(0) >= 0, 1.0, -1.0)
    agree = (np.sign(kept) == gamma)
    num = (kept * agree).sum(0)
    den = np.maximum(agree.sum(0), 1)
    return lam * num / den


def test_knots_ties_matches_an_independent_dense_computation():
    fs = _knots_tasks()
    deltas = [np_delta(f) for f in fs]
    u, s, vt = np.linalg.svd(np.concatenate(deltas, axis=1), full_matrices=False)
    keep = s > s[0] * 1e-10
    u, s, vt = u[:, keep], s[keep], vt[keep]
    cs = [s[:, None] * vt[:, i * IN:(i + 1) * IN] for i in range(3)]
    want = u @ _np_ties(cs, 0.3, 0.8)  # invariant to the SVD's sign choices
    r = _lora.knots(fs, "ties", 0.3, 0.8)
    close(r.b @ r.a, want, tol=1e-4)
    # order of the experts does not matter; DARE depends on its seed
    rp = _lora.knots(fs[::-1], "ties", 0.3, 0.8)
    close(rp.b @ rp.a, want, tol=1e-4)
    d1 = _lora.knots(fs, "dare_ties", 0.5, seed=1)
    d2 = _lora.knots(fs, "dare_ties", 0.5, seed=2)
    assert not torch.allclose(d1.b @ d1.a, d2.b @ d2.a)
    d1b = _lora.knots(fs, "dare_ties", 0.5, seed=1)
    assert torch.equal(d1.a, d1b.a)


# ---------------------------------------------------------------------------------------------
# the specs' module kernels (what the engine's adapter merge calls)
# ---------------------------------------------------------------------------------------------
def test_module_kernels_of_the_specs():
    fs = _knots_tasks()
    kp, _ = resolve_params(REGISTRY["lora_lego"], {"reweight": "none", "rank": 12}, 3)
    r = REGISTRY["lora_lego"].merge_adapters(fs, kp, "w")
    close(r.b @ r.a, sum(np_delta(f) for f in fs))
    kp, _ = resolve_params(REGISTRY["rmm"], {}, 3)
    mod = REGISTRY["rmm"].merge_adapters(fs, kp, "w")
    assert mod.coefficients.shape == (3, 2)  # default: 2 components
    kp, _ = resolve_params(REGISTRY["rmm"], {"components": 9}, 3)
    assert REGISTRY["rmm"].merge_adapters(fs, kp, "w").coefficients.shape == (3, 3)  # capped at n
    kp, _ = resolve_params(REGISTRY["knots"], {"method": "task_arithmetic"}, 3)
    r = REGISTRY["knots"].merge_adapters(fs, kp, "w")
    close(r.b @ r.a, sum(np_delta(f) for f in fs))
