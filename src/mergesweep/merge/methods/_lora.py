"""Low-rank kernels shared by the LoRA-native methods (``lora_lego``, ``rmm``, ``knots``).

Everything here works on the factors of one module (one base weight ``[out, in]``) of each expert:
a :data:`Factors` triple ``(B [out, r], A [r, in], scaling)`` with ``ΔW = scaling · B @ A`` (PEFT's
layout; ``scaling = lora_alpha / r``), or ``None`` for an expert that does not adapt the module
(its ``ΔW`` is 0). Computation is float32 (float64 where a Gram matrix or an SVD decides the
result); nothing forms a dense ``[out, in]`` matrix unless the caller asks for one
(:func:`delta`). This module imports torch: method modules import it inside their kernels.

The *core space* (:func:`core_space`): with the experts' scaled factors concatenated,
``B_cat = [s_1 B_1 | ... | s_n B_n]`` (``out x R``, ``R = sum_i r_i``) and ``A_cat = [A_1; ...; A_n]``
(``R x in``), and thin QR factorisations ``B_cat = Q_b R_b``, ``A_cat^T = Q_a R_a``, every update is

    ΔW_i = Q_b S_i Q_a^T,      S_i = R_b E_i R_a^T   (``p x q``, ``p, q <= R``)

with ``E_i`` selecting expert i's block. ``Q_b``, ``Q_a`` have orthonormal columns, so inner
products, SVDs and linear combinations of the ``ΔW_i`` are those of the small ``S_i``: RMM's Gram
matrix and KnOTS' joint SVD cost ``O(R^2 (out + in))``, never ``O(out · in)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

#: one expert's factors for one module: (B [out, r], A [r, in], scaling)
Factors = tuple  # (torch.Tensor, torch.Tensor, float)

__all__ = [
    "Factors", "delta", "sum_delta", "msus", "assemble", "kmeans", "lora_lego", "LegoResult",
    "core_space", "CoreSpace", "rmm", "RmmModule", "rmm_reconstruct", "knots", "KnotsResult",
    "dense_factors", "compress",
]


# ---------------------------------------------------------------------------------------------
# basics
# ---------------------------------------------------------------------------------------------
def _check(f: Factors, where: str = "factors") -> tuple[torch.Tensor, torch.Tensor, float]:
    b, a, s = f
    if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"{where}: B {list(b.shape)} and A {list(a.shape)} are not [out, r] x [r, in]")
    return b.float(), a.float(), float(s)


def delta(f: Factors) -> torch.Tensor:
    """``ΔW = scaling · B @ A`` (float32, dense ``[out, in]``)."""
    b, a, s = _check(f)
    return (b @ a).mul_(s)


def sum_delta(factors: Sequence[Optional[Factors]], shape: tuple[int, int] | None = None) -> torch.Tensor:
    """``sum_i ΔW_i`` (the task-arithmetic sum with weight 1); ``shape`` when every entry is None."""
    out = None
    for f in factors:
        if f is None:
            continue
        d = delta(f)
        out = d if out is None else out.add_(d)
    if out is None:
        if shape is None:
            raise ValueError("sum_delta: no factors and no shape")
        return torch.zeros(shape)
    return out


def msus(factors: Sequence[Optional[Factors]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The minimal semantic units (LoRA-LEGO) of some adapters: their rank-1 pairs ``(b_j, a_j)``,
    with each adapter's scaling folded in symmetrically (``sqrt|s| b_j``, ``sign(s) sqrt|s| a_j``),
    concatenated: ``(B_cat [out, N], A_cat [N, in])``, ``N = sum_i r_i``, so that
    ``B_cat @ A_cat = sum_i ΔW_i`` (concatenation = summation)."""
    bs, as_ = [], []
    for f in factors:
        if f is None:
            continue
        b, a, s = _check(f)
        root = math.sqrt(abs(s))
        bs.append(b * root)
        as_.append(a * (root if s >= 0 else -root))
    if not bs:
        raise ValueError("msus: no adapter adapts this module")
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)


def assemble(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``ΔW`` of MSUs ``(B [out, N], A [N, in])`` (scaling already folded in)."""
    return b.float() @ a.float()


def dense_factors(t: torch.Tensor, rtol: float = 1e-6) -> Factors | None:
    """A dense matrix as balanced low-rank factors from its SVD (``B = U sqrt(S)``, ``A = sqrt(S) V^T``,
    singular values below ``rtol · s_max`` dropped), scaling 1; ``None`` for a zero matrix. Used by
    the methods' per-tensor (dense) form, which the registry's property tests exercise."""
    t = t.float()
    if t.numel() == 0 or not bool(t.any()):
        return None
    u, s, vh = torch.linalg.svd(t.double(), full_matrices=False)
    keep = s > s[0] * rtol
    root = s[keep].sqrt()
    return (u[:, keep] * root).float(), (root[:, None] * vh[keep]).float(), 1.0


def compress(m: torch.Tensor, rtol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors ``(X [p, k], Y [k, q])`` of a small matrix with ``X @ Y = m`` to its
    numerical rank ``k`` (singular values below ``rtol · s_max`` dropped; ``k = 0`` for zero)."""
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return m.new_zeros(m.shape[0], 0).float(), m.new_zeros(0, m.shape[1]).float()
    keep = s > s[0] * rtol
    root = s[keep].sqrt()
    return (u[:, keep] * root).float(), (root[:, None] * vh[keep]).float()


# ---------------------------------------------------------------------------------------------
# LoRA-LEGO: k-means over MSUs, dual reweighting
# ---------------------------------------------------------------------------------------------
def kmeans(x: torch.Tensor, k: int, max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Deterministic k-means (Lloyd) of the rows of ``x`` ``[N, D]`` into ``k <= N`` clusters.

    Initialisation is farthest-first (a deterministic k-means++): the row of largest norm, then
    repeatedly the row farthest from the centres chosen so far (first index on ties). The result
    depends on the set of rows, not on their order (up to exact ties), and on no seed. An empty
    cluster is re-seeded with the row farthest from its centre. Distances in float64. Returns
    ``(labels [N] int64, centres [k, D] float32, iterations)``.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans: k = {k} for {n} points")
    xd = x.double()
    sq = (xd * xd).sum(1)
    first = int(torch.argmax(sq))
    chosen = [first]
    mind = (sq - 2 * xd @ xd[first] + sq[first]).clamp_min_(0)
    for _ in range(1, k):
        j = int(torch.argmax(mind))
        chosen.append(j)
        mind = torch.minimum(mind, (sq - 2 * xd @ xd[j] + sq[j]).clamp_min_(0))
    centres = xd[chosen].clone()
    labels = torch.full((n,), -1, dtype=torch.int64)
    it = 0
    for it in range(1, max_iter + 1):
        d = (sq[:, None] - 2 * xd @ centres.T + (centres * centres).sum(1)[None, :]).clamp_min_(0)
        new = torch.argmin(d, dim=1)
        counts = torch.bincount(new, minlength=k)
        for c in torch.nonzero(counts == 0).flatten().tolist():  # re-seed empty clusters
            far = int(torch.argmax(d[torch.arange(n), new]))
            new[far] = c
            d[far, :] = 0
            counts = torch.bincount(new, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, new, xd)
        centres = sums / counts[:, None].double()
        if torch.equal(new, labels):
            break
        labels = new
    return labels, centres.float(), it


@dataclass
class LegoResult:
    """A merged module: ``(B [out, k], A [k, in])`` with every scale folded in (``ΔW = B @ A``)."""

    b: torch.Tensor
    a: torch.Tensor
    clusters: int
    units: int
    iterations: int
    output_scale: float


REWEIGHTS = ("dual", "parameter", "output", "none")


def lora_lego(factors: Sequence[Optional[Factors]], k: int | None = None, reweight: str = "dual",
              max_iter: int = 100) -> LegoResult:
    """LoRA-LEGO on one module (see :mod:`mergesweep.merge.methods.lora_lego` for the formulas).

    ``k``: the number of clusters = the merged rank (None: the largest rank among the adapters);
    ``k >= N`` (the total number of MSUs) keeps every MSU as its own cluster, so with no
    reweighting the merge is exactly ``sum_i ΔW_i``. ``reweight``: ``dual`` (both), ``parameter``
    (each centroid rescaled to the mean norm of its members), ``output`` (the merged update scaled
    by ``sqrt(r_mean / k)``), ``none``."""
    if reweight not in REWEIGHTS:
        raise ValueError(f"reweight: {reweight!r} is not one of {', '.join(REWEIGHTS)}")
    present = [f for f in factors if f is not None]
    ranks = [int(f[0].shape[1]) for f in present]
    b_cat, a_cat = msus(present)
    out_dim, n_units = b_cat.shape
    k = max(ranks) if k is None else int(k)
    units = torch.cat([b_cat.T, a_cat], dim=1)  # [N, out + in]: MSU j = (b_j, a_j) as one vector
    if k >= n_units:
        labels, centres, iters = torch.arange(n_units), units.clone(), 0
        k = n_units
    else:
        labels, centres, iters = kmeans(units, k, max_iter)
    if reweight in ("dual", "parameter"):
        norms = units.double().norm(dim=1)
        mean_norm = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, norms)
        mean_norm /= torch.bincount(labels, minlength=k).double()
        cn = centres.double().norm(dim=1)
        rho = torch.where(cn > 0, mean_norm / cn.clamp_min(1e-300), torch.ones_like(cn)).float()
        centres = centres * rho[:, None]
    scale = math.sqrt(sum(ranks) / len(ranks) / k) if reweight in ("dual", "output") else 1.0
    b = centres[:, :out_dim].T.contiguous()
    a = centres[:, out_dim:].contiguous()
    if scale != 1.0:
        b = b * scale
    return LegoResult(b, a, k, n_units, iters, scale)


# ---------------------------------------------------------------------------------------------
# the core space of a module's updates
# ---------------------------------------------------------------------------------------------
@dataclass
class CoreSpace:
    """``ΔW_i = Q_b @ cores[i] @ Q_a^T`` for every expert (zero core for ``None``)."""

    q_b: torch.Tensor  # [out, p] float64, orthonormal columns
    q_a: torch.Tensor  # [in, q] float64, orthonormal columns
    cores: list        # per expert: [p, q] float64

    @property
    def shape(self) -> tuple[int, int]:
        return self.q_b.shape[0], self.q_a.shape[0]


def core_space(factors: Sequence[Optional[Factors]]) -> CoreSpace | None:
    """The shared orthonormal bases and per-expert cores of a module (None: no expert adapts it)."""
    present = [(i, _check(f, f"expert {i}")) for i, f in enumerate(factors) if f is not None]
    if not present:
        return None
    b_cat = torch.cat([b.double() * s for _, (b, _, s) in present], dim=1)  # [out, R]
    a_cat = torch.cat([a.double() for _, (_, a, _) in present], dim=0)     # [R, in]
    q_b, r_b = torch.linalg.qr(b_cat, mode="reduced")      # [out, p], [p, R]
    q_a, r_a = torch.linalg.qr(a_cat.T, mode="reduced")    # [in, q], [q, R]
    cores: list = [None] * len(factors)
    start = 0
    for i, (b, _, _) in present:
        r = b.shape[1]
        cores[i] = r_b[:, start:start + r] @ r_a[:, start:start + r].T
        start += r
    zero = torch.zeros(q_b.shape[1], q_a.shape[1], dtype=torch.float64)
    cores = [c if c is not None else zero for c in cores]
    return CoreSpace(q_b, q_a, cores)


# ---------------------------------------------------------------------------------------------
# RMM: a closed-form basis of m components + per-task coefficients
# ---------------------------------------------------------------------------------------------
@dataclass
class RmmModule:
    """One module's RMM basis in factor form: component ``j`` is ``Φ_j = B @ cores[j] @ A``
    (``||Φ_j||_F = 1``, ``<Φ_j, Φ_l> = 0``) and task ``k``'s update is reconstructed as
    ``sum_j coefficients[k, j] Φ_j``."""

    b: torch.Tensor             # [out, p] float32 (orthonormal columns)
    a: torch.Tensor             # [q, in] float32 (orthonormal rows)
    cores: torch.Tensor         # [m, p, q] float32
    coefficients: torch.Tensor  # [n, m] float32
    sq_norms: torch.Tensor      # [n] float64: ||ΔW_k||_F^2
    sq_errors: torch.Tensor     # [n] float64: ||ΔW_k - reconstruction_k||_F^2


def rmm(factors: Sequence[Optional[Factors]], m: int, rtol: float = 1e-10) -> RmmModule | None:
    """The RMM basis of one module for ``n = len(factors)`` tasks (see
    :mod:`mergesweep.merge.methods.rmm`): the top ``m`` eigenvectors ``v_j`` (eigenvalues
    ``λ_j``) of the Gram matrix ``G_kl = <ΔW_k, ΔW_l>_F`` give ``Φ_j = λ_j^-1/2 sum_k v_jk ΔW_k``
    and coefficients ``C_kj = <ΔW_k, Φ_j> = λ_j^1/2 v_jk``. Components with ``λ_j <= rtol · λ_max``
    are dropped (the updates span fewer than ``m`` dimensions). None when no task adapts it."""
    cs = core_space(factors)
    if cs is None:
        return None
    n = len(factors)
    flat = torch.stack([c.reshape(-1) for c in cs.cores])  # [n, p q] float64
    gram = flat @ flat.T
    lam, vec = torch.linalg.eigh(gram)
    order = torch.argsort(lam, descending=True)
    lam, vec = lam[order], vec[:, order]
    lam_max = float(lam[0]) if lam.numel() else 0.0
    keep = [j for j in range(min(m, n)) if lam_max > 0 and float(lam[j]) > rtol * lam_max]
    lam, vec = lam[keep], vec[:, keep]
    # fix the eigenvectors' signs (eigh's are arbitrary): the largest |entry| positive
    if vec.numel():
        idx = vec.abs().argmax(dim=0)
        vec = vec * torch.sign(vec[idx, torch.arange(vec.shape[1])])
    root = lam.sqrt()
    coeff = vec * root                                  # [n, m']
    coeff[gram.diagonal() == 0] = 0  # a task that does not adapt the module: exactly 0, not rounding noise
    basis = (vec / root).T @ flat                       # [m', p q]: orthonormal rows
    sq_norms = gram.diagonal().clone()
    sq_errors = (sq_norms - (coeff * coeff).sum(1)).clamp_min(0)
    p, q = cs.cores[0].shape
    return RmmModule(cs.q_b.float(), cs.q_a.T.float(), basis.reshape(-1, p, q).float(), coeff.float(),
                     sq_norms, sq_errors)


def rmm_reconstruct(module_b: torch.Tensor, module_a: torch.Tensor, cores: torch.Tensor,
                    coefficients: torch.Tensor, rtol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Task ``k``'s reconstructed update as LoRA factors ``(B [out, r], A [r, in])``, scaling 1,
    from a module's basis and that task's coefficient row ``[m]``: ``M = sum_j c_j cores[j]``,
    compressed to its numerical rank ``r`` (with ``m = n`` that is the expert's own rank)."""
    core = torch.einsum("j,jpq->pq", coefficients.double(), cores.double())
    x, y = compress(core, rtol)
    return (module_b.double() @ x.double()).float(), (y.double() @ module_a.double()).float()


# ---------------------------------------------------------------------------------------------
# KnOTS: joint SVD of the concatenated updates, a merge of the aligned coefficients
# ---------------------------------------------------------------------------------------------
KNOTS_METHODS = ("ties", "dare_ties", "task_arithmetic")


@dataclass
class KnotsResult:
    """The merged update ``ΔW = U @ C`` as factors: ``b = U`` ``[out, k]``, ``a = C`` ``[k, in]``."""

    b: torch.Tensor
    a: torch.Tensor
    rank: int


def knots_align(factors: Sequence[Optional[Factors]], rtol: float = 1e-10):
    """KnOTS' alignment of one module: ``[ΔW_1 | ... | ΔW_n] = U diag(s) [V_1^T | ... | V_n^T]``
    (concatenated along the input dimension), returned as ``(U [out, k] float32, [C_1 .. C_n])``
    with the per-task coefficients ``C_i = diag(s) V_i^T`` ``[k, in]`` (float32), so that
    ``ΔW_i = U @ C_i``; singular values ``<= rtol · s_max`` are dropped. None when no expert
    adapts the module."""
    cs = core_space(factors)
    if cs is None:
        return None
    joint = torch.cat(cs.cores, dim=1)  # [p, n q]
    u, s, vh = torch.linalg.svd(joint, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return torch.zeros(cs.shape[0], 0), [torch.zeros(0, cs.shape[1]) for _ in factors]
    keep = s > s[0] * rtol
    u, s, vh = u[:, keep], s[keep], vh[keep]
    q = cs.q_a.shape[1]
    big_u = (cs.q_b @ u).float()
    # an expert that does not adapt the module has exactly zero coefficients (not rounding noise,
    # which TIES would count as agreeing entries)
    coeffs = [((s[:, None] * vh[:, i * q:(i + 1) * q]) @ cs.q_a.T).float() if f is not None
              else torch.zeros(u.shape[1], cs.shape[1]) for i, f in enumerate(factors)]
    return big_u, coeffs


def knots(factors: Sequence[Optional[Factors]], method: str = "ties", density: float = 0.2, lam: float = 1.0,
          seed: int = 0, name: str = "tensor") -> KnotsResult | None:
    """KnOTS on one module (see :mod:`mergesweep.merge.methods.knots`): align, then merge the
    coefficients ``C_i`` with ``method`` and return ``U @ C_merged`` as factors."""
    if method not in KNOTS_METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(KNOTS_METHODS)}")
    aligned = knots_align(factors)
    if aligned is None:
        return None
    u, coeffs = aligned
    if u.shape[1] == 0:
        return KnotsResult(u, coeffs[0], 0)
    merged = merge_coefficients(coeffs, method, density, lam, seed, name)
    return KnotsResult(u, merged, u.shape[1])


def merge_coefficients(coeffs: Sequence[torch.Tensor], method: str, density: float, lam: float, seed: int,
                       name: str) -> torch.Tensor:
    """A merge of aligned coefficient matrices, entry by entry (the project's TIES/DARE parts):

    * ``task_arithmetic``: ``lambda sum_i C_i``;
    * ``ties``: each ``C_i`` trimmed to its top ``density`` entries by magnitude, sign
      ``gamma = sign(sum_i C_i')``, the mean of the entries agreeing with ``gamma``, times lambda;
    * ``dare_ties``: each entry of ``C_i`` kept with probability ``density`` (rescaled by
      ``1/density``; masks seeded by ``(seed, module, expert)``), then TIES' election and mean
      without trimming (KnOTS-DARE-TIES, the authors' ``topK: 100``).
    """
    from mergesweep.merge.context import seeded_generator
    from mergesweep.merge.methods import _parts

    zero = torch.zeros_like(coeffs[0])
    n = len(coeffs)
    if method == "task_arithmetic":
        return _parts.combine_task_vectors(zero, list(coeffs), [1.0] * n, lam, False)
    if method == "ties":
        thresholds = [_parts.magnitude_threshold(c, zero, density) for c in coeffs]
        maskers = [_parts.threshold_masker(t) for t in thresholds]
        return _parts.combine_task_vectors(zero, list(coeffs), [1.0] * n, lam, True, maskers, elect=True)
    maskers = [_parts.dare_masker(c.shape, density, seeded_generator(seed, name, i), c.device)
               for i, c in enumerate(coeffs)]
    return _parts.combine_task_vectors(zero, list(coeffs), [1.0] * n, lam, True, maskers, elect=True)


# ---------------------------------------------------------------------------------------------
# the per-tensor (dense) form of the methods
# ---------------------------------------------------------------------------------------------
def dense_merge(base: torch.Tensor, experts: Sequence[torch.Tensor], module_delta) -> torch.Tensor:
    """``base + module_delta(factors, shape)`` for dense tensors: each task vector
    ``tau_i = theta_i - theta_base``, viewed as a matrix ``[shape[0], -1]`` (a vector as one row),
    becomes LoRA factors by its SVD (:func:`dense_factors`; None when zero) and
    ``module_delta(factors, (rows, cols))`` returns the merged update ``[rows, cols]``.

    The engine never calls it for these methods (their experts are adapters:
    :mod:`mergesweep.merge.lora_merge`); it is the ``MethodSpec.merge`` the registry's property
    tests (identities, identical inputs, order invariance) run on random tensors, through the same
    kernels as the adapters' merge."""
    shape = tuple(base.shape)
    rows = shape[0] if base.dim() >= 2 else 1
    cols = base.numel() // rows if rows else 0
    factors = [dense_factors((e - base).reshape(rows, cols)) for e in experts]
    if all(f is None for f in factors):
        return base.clone()
    d = module_delta(factors, (rows, cols))
    return base + d.reshape(shape).to(base.dtype)


def dense_method_merge(module_merge, base: torch.Tensor, experts: Sequence[torch.Tensor], params: dict, ctx):
    """``MethodSpec.merge`` of a LoRA-native method whose ``module_merge(factors, params, name)``
    returns merged factors ``(.b, .a)``: :func:`dense_merge` with ``ΔW = b @ a`` (the registry's
    property tests only; the engine merges adapters)."""

    def delta(factors, shape):
        r = module_merge(factors, params, ctx.name)
        return r.b @ r.a

    return dense_merge(base, experts, delta)
