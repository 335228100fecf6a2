"""KnOTS: align the LoRA updates with one SVD, then merge them in the shared basis.

Per module (a base weight ``W [out, in]``) with the experts' updates ``ΔW_i = s_i B_i A_i``
(``ΔW_i = 0`` for an expert that does not adapt the module):

    align     [ΔW_1 | ΔW_2 | ... | ΔW_n] = U diag(s) [V_1^T | V_2^T | ... | V_n^T]   (concatenated along in)
              C_i = diag(s) V_i^T   [k, in]          task i's coefficients in the shared basis U: ΔW_i = U C_i
    merge     C   = lambda * merge(C_1, ..., C_n)    entry by entry, with ``method``:
                    ties            trim each C_i to its top ``density`` entries by magnitude, elect
                                    gamma = sign(sum_i C_i), mean of the entries agreeing with gamma
                    dare_ties       keep each entry with probability ``density`` (rescaled 1/density,
                                    masks seeded by dare_seed, module, expert), then TIES without trimming
                    task_arithmetic sum_i C_i (= U^T sum_i ΔW_i: plain task arithmetic)
    merged    ΔW  = U C, written as a rank-k adapter (B = U, A = C, scaling 1), k = rank of the concatenation

With one expert, ``method: task_arithmetic`` (or ``ties`` with ``density: 1``) returns its update.

Paper: Stoica, Ramesh, Ecsedi, Choshen, Hoffman, "Model merging with SVD to tie the KnOTS",
ICLR 2025 (arXiv:2410.19735); the authors' code (github.com/gstoica27/KnOTS, ``task_merger.py``:
``SVDMerger``) concatenates the task updates along the input dimension (``concat_across_output``),
takes the SVD in float64, keeps ``s > 1e-5`` and merges ``diag(s) V_i`` with TIES or DARE-TIES
(DARE on the coefficients, then TIES with ``topK: 100``), with a disjoint mean and a scaling
coefficient (our ``lambda``).

Departures: the SVD is computed in the core space of the experts' factors
(:func:`mergesweep.merge.methods._lora.core_space`: the same singular values and vectors, never an
``out x n·in`` matrix); singular values below ``1e-10 s_max`` are dropped (relative; the authors'
threshold is absolute ``1e-5``); TIES ranks magnitudes per module (the authors rank over all layers
of the model at once: their representation is the whole model's flattened coefficients), like the
project's ``ties`` with ``scope: tensor``; a sum that is exactly 0 elects ``+`` (the authors: the
sign of the total). DARE uses the project's masks (a seed per module and expert). ``dare_seed`` is
only read by ``dare_ties``.

The per-tensor ``merge`` below is this method on dense task vectors (the registry's property tests);
the engine merges adapters (:mod:`mergesweep.merge.lora_merge`) and refuses dense experts.
"""

from __future__ import annotations

from mergesweep.merge.methods._common import lambda_param
from mergesweep.merge.spec import Identity, MethodSpec, Param


def module_merge(factors, params: dict, name: str = "tensor"):
    """The merged factors of one module (a :class:`~mergesweep.merge.methods._lora.KnotsResult`)."""
    from mergesweep.merge.methods import _lora

    return _lora.knots(factors, params["method"], params["density"], params["lambda"], params["dare_seed"], name)


def _merge(base, experts, p, ctx):
    from mergesweep.merge.methods._lora import dense_method_merge

    return dense_method_merge(module_merge, base, experts, p, ctx)


SPEC = MethodSpec(
    name="knots",
    summary="LoRA-native: one SVD of the concatenated updates aligns them in a shared basis; TIES/DARE merge "
            "of the aligned coefficients (KnOTS)",
    paper="Stoica et al. 2025, Model merging with SVD to tie the KnOTS (ICLR 2025, arXiv:2410.19735)",
    params=(
        Param("method", "str", "ties", "merge of the aligned coefficients", choices=("ties", "dare_ties",
                                                                                     "task_arithmetic")),
        Param("density", "float", 0.2, "ties: fraction of each task's coefficients kept (top by magnitude); "
              "dare_ties: keep probability", low=0.0, high=1.0),
        lambda_param(),
        Param("dare_seed", "int", 0, "seed of the DARE masks (method: dare_ties), combined with module and expert",
              low=0),
    ),
    merge=_merge,
    merge_adapters=module_merge,
    base="required",
    min_experts=1,
    doc=__doc__,
    formula="`[ΔW_1..ΔW_n] = U S [V_1^T..V_n^T]`; `ΔW = lambda U merge(S V_1^T, .., S V_n^T)` with TIES, DARE-TIES "
            "or a sum; a rank-k adapter",
    # permuting the experts permutes the blocks of V only (ties, task_arithmetic; dare_ties' masks follow
    # the expert index)
    order_invariant=True,
    identities=(
        Identity({"method": "task_arithmetic"}, "expert", 1, atol=1e-5),
        Identity({"density": 1.0}, "expert", 1, atol=1e-5),
        Identity({"lambda": 0.0}, "base", 3),
    ),
    deviations="SVD in the core space of the factors; relative singular-value cut (1e-10 s_max); TIES magnitudes "
               "ranked per module (the authors: over the whole model); dare_ties' masks from the project's seeded "
               "generator; experts must be LoRA adapters",
    mergekit="",
)
