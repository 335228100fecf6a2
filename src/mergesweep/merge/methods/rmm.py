"""RMM, Reversible Model Merging: a compact basis of m components plus per-task coefficients from
which every expert's update is recovered ("reverted"), instead of one merged model.

Per module (a base weight ``W [out, in]``; layer by layer, as the paper) with the experts' updates
``ΔW_k = s_k B_k A_k`` (``ΔW_k = 0`` for an expert that does not adapt the module), ``k = 1..n``:

    Gram        G_kl = <ΔW_k, ΔW_l>_F = s_k s_l tr((B_k^T B_l)(A_l A_k^T))
    eigen       G = V diag(λ) V^T,   λ_1 >= λ_2 >= ...,   m components (m = min(components, n))
    basis       Φ_j = λ_j^-1/2 sum_k V_kj ΔW_k              (orthonormal: <Φ_j, Φ_l> = δ_jl)
    coefficient C_kj = <ΔW_k, Φ_j> = λ_j^1/2 V_kj
    revert      ΔW^_k = sum_j C_kj Φ_j                      (the projection of ΔW_k onto span Φ)

This is the closed-form minimiser of ``sum_k ||ΔW_k - sum_j C_kj Φ_j||_F^2`` over m components
and coefficients: the best rank-m approximation (Eckart-Young) of the ``n x (out·in)`` matrix of
stacked ``vec(ΔW_k)``. With ``m = n`` every task is recovered exactly; with fewer, each task's
error ``||ΔW_k - ΔW^_k||^2 = G_kk - sum_j C_kj^2`` is the truncated SVD's. Everything is computed in
the core space of the experts' factors (:func:`mergesweep.merge.methods._lora.core_space`):
``Φ_j = Q_b K_j Q_a^T`` with ``Q_b [out, p]``, ``Q_a [in, q]`` orthonormal and ``K_j [p, q]``
small, so nothing of size ``out x in`` is formed and a reverted task is a LoRA adapter.

The merged artefact (a directory, not a model): ``rmm.safetensors`` with, per module ``<name>``
(the base weight's name), ``<name>.basis_B`` = ``Q_b``, ``<name>.basis_A`` = ``Q_a^T``,
``<name>.cores`` ``[m, p, q]`` and ``<name>.coefficients`` ``[n, m]`` (row k: task k); ``rmm.json``
with the tasks (expert names, in order), m, per-module shapes and each task's relative
reconstruction error ``sqrt(sum_modules err^2 / sum_modules ||ΔW_k||^2)``; the record. ``mergesweep
revert --merged DIR --task NAME --out DIR`` writes task NAME's adapter (:mod:`mergesweep.lora.revert`).

Paper: Alipour, Mohammadi Amiri, "Towards Reversible Model Merging For Low-rank Weights", 2025
(arXiv:2510.14163).

Departures: the closed form is applied to the updates ``ΔW_k`` (their Gram matrix), per module,
with per-module coefficients. As we read the paper's description, it applies the closed form to
the low-rank factors themselves (the r-dimensional vectors of each row of A / column of B across
tasks); a factor-level basis depends on each adapter's arbitrary factorisation (``B A = (B M)(M^-1 A)``,
and rank-1 units have no order shared across tasks), the ``ΔW`` form does not and is optimal for
the updates the models apply. Its cost: the basis is stored in the experts' core space, so the
artefact is about the size of the experts' adapters plus ``m`` small cores (no storage saving over
keeping the adapters; the saving the paper reports is against dense deltas). ``components`` defaults
to 2 (the abstract's "an equivalent of holding two models"), capped at the number of experts.

The per-tensor ``merge`` (the registry's property tests; the engine merges adapters) returns
``base + ΔW^_1``, the first expert's reverted update.
"""

from __future__ import annotations

from mergesweep.merge.spec import Identity, MethodSpec, Param


def components(params: dict, n_experts: int) -> int:
    """The number of basis components used for ``n_experts`` tasks."""
    return max(1, min(int(params["components"]), n_experts))


def module_merge(factors, params: dict, name: str = "tensor"):
    """One module's basis and coefficients (an :class:`~mergesweep.merge.methods._lora.RmmModule`)."""
    from mergesweep.merge.methods import _lora

    return _lora.rmm(factors, components(params, len(factors)))


def _merge(base, experts, p, ctx):
    from mergesweep.merge.methods import _lora

    def delta(factors, shape):
        mod = module_merge(factors, p, ctx.name)
        b, a = _lora.rmm_reconstruct(mod.b, mod.a, mod.cores, mod.coefficients[0])
        return b @ a

    return _lora.dense_merge(base, experts, delta)



SPEC = MethodSpec(
    name="rmm",
    summary="LoRA-native, reversible: per module a closed-form basis of m components and per-task coefficients "
            "(the best rank-m approximation of the stacked updates); each expert is reverted from it",
    paper="Alipour & Mohammadi Amiri 2025, Towards Reversible Model Merging For Low-rank Weights (arXiv:2510.14163)",
    params=(
        Param("components", "int", 2, "m, basis components per module (capped at the number of experts; "
              "m = n reverts every expert exactly)", low=1),
    ),
    merge=_merge,
    merge_adapters=module_merge,
    base="required",
    min_experts=1,
    doc=__doc__,
    formula="per module: top-m eigenvectors of `G_kl = <ΔW_k, ΔW_l>`, basis `Φ_j = λ_j^-1/2 sum_k V_kj ΔW_k`, "
            "coefficients `C_kj = λ_j^1/2 V_kj`; task k reverted as `sum_j C_kj Φ_j`",
    # the per-tensor form returns the first expert's reconstruction
    order_invariant=False,
    identities=(Identity({}, "expert", 1, atol=1e-5), Identity({"components": 3}, "expert", 3, atol=1e-5)),
    deviations="closed form on the updates ΔW (Gram matrix, per module) rather than on the factors; the basis is "
               "stored in the experts' core space (no storage saving over the adapters); the artefact is a basis, "
               "reverted per task with `mergesweep revert`; experts must be LoRA adapters",
    mergekit="",
    reversible=True,
)
