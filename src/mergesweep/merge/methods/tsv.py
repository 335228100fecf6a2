"""TSV-M: merge with task singular vectors, decorrelated by orthogonal Procrustes.

For every 2-D tensor (a layer matrix) with T experts and task matrices Delta_i = theta_i - theta_base:

    Delta_i ~ U_i[:, :k] diag(s_i[:k]) V_i[:, :k]^T       k = max(1, floor(sv_reduction * min(m, n)))
    U = [U_1,k | ... | U_T,k],  S = diag(s_1,k, ..., s_T,k),  V = [V_1,k | ... | V_T,k]
    U_perp = P_U Q_U^T  where U = P_U Sigma Q_U^T   (nearest matrix with orthonormal columns)
    V_perp = P_V Q_V^T  likewise
    theta  = theta_base + lambda * U_perp S V_perp^T

Tensors that are not matrices (norms, biases) take the mean task vector:
``theta = theta_base + lambda * mean_i Delta_i``. ``sv_reduction`` defaults to 1/T, the paper's
choice (each task keeps a 1/T share of the rank).

Paper: Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodola, "Task Singular Vectors:
Reducing Task Interference in Model Merging", CVPR 2025 (arXiv:2412.00081).

Applies to every 2-D tensor, embeddings and lm_head included (the paper's ViT/LLM code treats
all matrices alike); the SVD of a vocabulary-sized matrix dominates the run time.
"""

from __future__ import annotations

from typing import Sequence

from mergesweep.merge.methods._common import lambda_param
from mergesweep.merge.spec import Identity, MethodSpec, Param


def _orthogonalize(x):
    """Polar factor of ``x`` (m x r): the closest matrix with orthonormal columns (Procrustes)."""
    import torch

    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def tsv_matrix(deltas: Sequence, sv_reduction: float):
    """The TSV-M merged task matrix of same-shaped 2-D task matrices."""
    import torch

    from mergesweep.merge.select import count_for_fraction

    m, n = deltas[0].shape
    k = max(1, count_for_fraction(sv_reduction, min(m, n)))
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k, :].T)
    u_perp = _orthogonalize(torch.cat(us, dim=1))
    v_perp = _orthogonalize(torch.cat(vs, dim=1))
    s = torch.cat(ss)
    return (u_perp * s) @ v_perp.T


def tsv(base, experts: Sequence, sv_reduction: float | None = None, lam: float = 1.0):
    """TSV-M on one float32 tensor (the kernel behind ``SPEC``)."""
    import torch

    deltas = [e - base for e in experts]
    if base.dim() == 2 and min(base.shape) > 0:
        merged = tsv_matrix(deltas, sv_reduction if sv_reduction is not None else 1.0 / len(experts))
    else:
        merged = torch.stack(deltas).mean(0)
    del deltas
    return merged.mul_(lam).add_(base)


def _merge(base, experts, p, ctx):
    return tsv(base, experts, p["sv_reduction"], p["lambda"])


SPEC = MethodSpec(
    name="tsv",
    summary="task singular vectors: per-matrix low-rank task updates, orthogonalised and summed (TSV-M)",
    paper="Gargiulo et al. 2025, Task Singular Vectors (arXiv:2412.00081)",
    params=(
        Param("sv_reduction", "float", None, "fraction of each task's singular components kept (default 1/T)",
              low=0.0, high=1.0, low_open=True),
        lambda_param(),
    ),
    merge=_merge,
    base="required",
    doc=__doc__,
    formula="per matrix: top `sv_reduction` singular triplets of each task, `U`, `V` orthogonalised (Procrustes), "
            "`theta_0 + lambda U_perp S V_perp^T`; vectors averaged",
    # permuting the experts permutes the columns of U, V and the entries of S alike, and the polar
    # factor of U P is polar(U) P: the product is unchanged
    order_invariant=True,
    identities=(Identity({"sv_reduction": 1.0}, "expert", 1, atol=2e-5), Identity({"lambda": 0.0}, "base", 3)),
    deviations="applied to every 2-D tensor, embeddings and `lm_head` included",
)
