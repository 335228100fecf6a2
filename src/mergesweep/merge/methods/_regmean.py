"""The RegMean solve shared by ``regmean`` and ``regmean_plus_plus`` (no torch at import).

RegMean (Jin, Ren, Preotiuc-Pietro, Cheng, "Dataless Knowledge Fusion by Merging Weights of
Language Models", ICLR 2023, arXiv:2212.09849) merges one linear layer ``y = x W^T`` of ``n``
experts by the weights that best reproduce every expert's outputs on that expert's own inputs:

    min_W  sum_i || X_i W^T - X_i W_i^T ||^2      (X_i: expert i's inputs to the layer, one row a token)

In the paper's ``[in, out]`` convention the solution is ``W* = (sum_i G_i)^-1 sum_i G_i W_i`` with
``G_i = X_i^T X_i``; in torch's ``[out, in]`` layout (``G_i`` symmetric):

    W* = (sum_i W_i G~_i) (sum_i G~_i)^-1
    G~_i = alpha G_i + (1 - alpha) diag(G_i)          (alpha: reduce_non_diagonal_ratio)

``alpha`` shrinks the off-diagonal entries (``alpha = 1``: plain RegMean; ``alpha = 0``: a
per-input-feature weighted average, ``W*[:, j] = sum_i G_i[j, j] W_i[:, j] / sum_i G_i[j, j]``).

What this implementation adds or decides (every choice is the limit of the same formula):

* **Normalisation.** With ``counts`` each Gram is divided by its token count first
  (``G_i / N_i``: the mean of ``x x^T``), as the paper's released code and MergeBench do (their
  hooks keep a running mean over tokens), so an expert with more calibration tokens does not
  weigh more. ``counts=None`` uses the Grams as given.
* **Regulariser.** With ``W_bar = mean_i W_i`` and ``S = sum_i G~_i`` the solve is written as a
  correction of the average,

      W* = W_bar + [sum_i (W_i - W_bar) G~_i] (S + rho I)^-1,   rho = ridge * mean_j S[j, j]

  (the mean over the inputs with ``S[j, j] > 0``). This is the minimiser of
  ``sum_i ||(W - W_i) G~_i^(1/2)||^2 + rho ||W - W_bar||^2``: ``ridge = 0`` is RegMean exactly
  (algebraically the same as the formula above), and where the data say nothing (a null
  direction of ``S``) the weights stay at the experts' average instead of at 0 or at noise.
  ``rho`` is relative to the Grams' scale, so ``ridge`` is unitless.
* **Dead inputs.** An input feature no expert's data ever activated (``S[j, j] = 0``: then its
  whole row and column of every ``G~_i`` is 0) decouples from the others: its column is the
  average ``W_bar[:, j]`` and it is left out of the solve (the ``rho -> 0`` limit). All inputs
  dead (every Gram 0): the average.
* **Solve.** ``S`` and the right-hand side are accumulated in float64 (the Grams are float32
  sums over up to millions of tokens; float32 Cholesky of a matrix with condition number 1e6
  would keep about one digit) and, with ``rho > 0`` (then ``cond(S + rho I) <= in / ridge``
  roughly), solved by Cholesky (``torch.linalg.cholesky_ex``). With ``ridge = 0`` (``S`` may be
  rank-deficient: ``alpha = 1`` and fewer tokens than inputs), or if the factorisation fails (an
  ``S`` made slightly indefinite by the float32 rounding of its Grams), the solve uses the
  pseudo-inverse from the eigendecomposition of ``S + rho I`` (as MergeBench falls back to
  ``pinv``), with eigenvalues at or below ``max eigenvalue * n_live * 2^-23`` (``n_live``: the
  inputs left after the dead ones; ``2^-23``: the float32 resolution of the statistics) treated
  as zero: the ``rho -> 0`` limit above, the correction restricted to the
  directions the data determine. The result is checked finite (MergeError otherwise; it cannot
  happen with finite inputs).

Departures from MergeBench (``merging/merging_methods/regmean.py``): MergeBench inverts the
float32 ``S`` (``torch.inverse``, or ``torch.linalg.pinv`` when ``cond(S) > 1e8`` or a diagonal
entry is 0), which sends null directions to 0 rather than to the average; its hooks average over
padded positions too (ours count real tokens only: the stats stage masks padding).
"""

from __future__ import annotations

from typing import Sequence

from mergesweep.errors import ConfigError, MergeError
from mergesweep.merge.spec import Param

#: what tensors without Gram statistics get (embeddings, norms, biases...)
FALLBACKS = ("average", "task_arithmetic")


def regmean_params(alpha_default: float, alpha_help: str, fallback_help: str) -> tuple[Param, ...]:
    """The parameters RegMean and RegMean++ share (one definition: same names, ranges, defaults but
    the alpha default the papers' runs use)."""
    return (
        Param("reduce_non_diagonal_ratio", "float", alpha_default, alpha_help, low=0.0, high=1.0),
        Param("ridge", "float", 1e-6,
              "regulariser relative to the mean Gram diagonal: rho = ridge * mean diag(sum G~), pulls "
              "directions the data do not determine to the experts' average (0: exact RegMean, pseudo-inverse "
              "when singular)", low=0.0),
        Param("fallback", "str", "average", fallback_help, choices=FALLBACKS),
        Param("lambda", "float", 1.0, "scaling of the summed task vectors in fallback: task_arithmetic"),
    )


def validate_fallback(p: dict, n_experts: int, has_base: bool) -> None:
    """``fallback: task_arithmetic`` needs a base (ConfigError naming ``params.fallback``)."""
    if p["fallback"] == "task_arithmetic" and not has_base:
        raise ConfigError("params.fallback: 'task_arithmetic' adds task vectors to the base model, but no base "
                          "is given (give a base, or use fallback: average)")

#: float32 unit roundoff: the resolution of the Gram statistics (stored as float32)
_F32_EPS = 2.0 ** -23


def shrink_off_diagonal(gram, alpha: float):
    """``alpha G + (1 - alpha) diag(G)`` in place (the diagonal is unchanged); returns ``gram``."""
    d = gram.diagonal().clone()
    gram.mul_(float(alpha))
    gram.diagonal().copy_(d)
    return gram


def regmean_solve(weights: Sequence, grams: Sequence, alpha: float, ridge: float, counts=None, name: str = "tensor"):
    """RegMean-merged weight of one linear layer (float32 ``[out, in]``, on ``weights[0]``'s device).

    ``weights``: ``n`` tensors ``[out, in]`` (torch Linear layout, ``y = x W^T``); ``grams``: ``n``
    symmetric PSD tensors ``[in, in]``, ``G_i = sum over tokens of x x^T`` of expert i's inputs to
    this layer; ``alpha`` in ``[0, 1]``: ``reduce_non_diagonal_ratio``; ``ridge >= 0``: the
    relative regulariser; ``counts``: ``None`` or ``n`` token counts (numbers or one-element
    tensors) dividing the Grams (a count of 0 means no data: that Gram is taken as 0). ``name``
    only labels errors. See the module docstring for the formula, the regulariser and the
    fallbacks.
    """
    import torch

    n = len(weights)
    if n == 0 or len(grams) != n:
        raise ValueError(f"regmean_solve: {n} weights and {len(grams)} Gram matrices")
    if counts is not None and len(counts) != n:
        raise ValueError(f"regmean_solve: {n} weights and {len(counts)} counts")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"regmean_solve: alpha {alpha!r} is not in [0, 1]")
    if not float(ridge) >= 0.0:
        raise ValueError(f"regmean_solve: ridge {ridge!r} is negative")
    w0 = weights[0]
    if w0.dim() != 2:
        raise MergeError(f"tensor '{name}': RegMean needs a 2-D weight [out, in], got shape {list(w0.shape)}")
    out_dim, in_dim = w0.shape
    device = w0.device
    f64 = torch.float64
    for i, (w, g) in enumerate(zip(weights, grams)):
        if tuple(w.shape) != (out_dim, in_dim):
            raise MergeError(f"tensor '{name}': expert {i} has shape {list(w.shape)}, expert 0 {[out_dim, in_dim]}")
        if tuple(g.shape) != (in_dim, in_dim):
            raise MergeError(f"tensor '{name}': expert {i}'s Gram matrix has shape {list(g.shape)}, "
                             f"the weight needs [{in_dim}, {in_dim}]")

    w_bar = torch.zeros((out_dim, in_dim), dtype=f64, device=device)
    for w in weights:
        w_bar.add_(w.to(device=device, dtype=f64))
    w_bar.div_(n)

    s = torch.zeros((in_dim, in_dim), dtype=f64, device=device)
    rhs = torch.zeros((out_dim, in_dim), dtype=f64, device=device)  # sum_i (W_i - W_bar) G~_i
    for i, (w, g) in enumerate(zip(weights, grams)):
        scale = 1.0
        if counts is not None:
            c = counts[i]
            c = float(c.reshape(-1)[0]) if hasattr(c, "reshape") else float(c)
            if not c > 0.0:
                continue  # no tokens: no information from this expert
            scale = 1.0 / c
        gt = g.to(device=device, dtype=f64)
        if not torch.isfinite(gt).all():
            raise MergeError(f"tensor '{name}': expert {i}'s Gram matrix has non-finite values")
        gt = (gt + gt.T).mul_(0.5 * scale)  # exactly symmetric (a float32 sum need not be)
        shrink_off_diagonal(gt, alpha)
        s.add_(gt)
        rhs.addmm_(w.to(device=device, dtype=f64) - w_bar, gt)
        del gt

    diag = s.diagonal()
    live = diag > 0
    n_live = int(live.sum())
    if n_live == 0:
        return w_bar.to(torch.float32)
    if n_live < in_dim:
        idx = live.nonzero().squeeze(1)
        s_l = s.index_select(0, idx).index_select(1, idx)
        rhs_l = rhs.index_select(1, idx)
    else:
        idx, s_l, rhs_l = None, s, rhs
    del s
    rho = float(ridge) * float(s_l.diagonal().mean())
    if rho > 0:
        s_l.diagonal().add_(rho)

    corr = _solve_spd(s_l, rhs_l, cholesky=rho > 0)  # rhs_l S_l^-1, [out, n_live]
    if not torch.isfinite(corr).all():
        raise MergeError(f"tensor '{name}': the RegMean solve gave non-finite values (ridge {ridge!r})")
    if idx is None:
        out = w_bar.add_(corr)
    else:
        out = w_bar
        out.index_add_(1, idx, corr)
    return out.to(torch.float32)


def _solve_spd(s, rhs, cholesky: bool = True):
    """``rhs s^-1`` for symmetric PSD ``s`` (float64): Cholesky (when ``cholesky``; a failed
    factorisation falls through), else the eigen pseudo-inverse with the float32 cutoff."""
    import torch

    if cholesky:
        chol, info = torch.linalg.cholesky_ex(s)
        if int(info) == 0:
            # s X = rhs^T  ->  X^T = rhs s^-1 (s symmetric)
            x = torch.cholesky_solve(rhs.T.contiguous(), chol)
            if torch.isfinite(x).all():
                return x.T
        del chol
    evals, evecs = torch.linalg.eigh(s)
    cutoff = float(evals.max()) * s.shape[0] * _F32_EPS
    keep = evals > cutoff
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
    # rhs V diag(1/lambda) V^T
    return ((rhs @ evecs) * inv) @ evecs.T
