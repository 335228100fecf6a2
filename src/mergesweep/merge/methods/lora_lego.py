"""LoRA-LEGO: merge LoRA adapters by clustering their rank-wise units.

For one module (a base weight ``W [out, in]``) adapted by experts ``i = 1..n`` with
``ΔW_i = s_i B_i A_i`` (``s_i`` the adapter's scaling ``alpha / r``):

    MSUs      u = (sqrt(s_i) b_ij, sqrt(s_i) a_ij)      b_ij column j of B_i, a_ij row j of A_i
              (minimal semantic units: ΔW_i = sum_j b~_ij a~_ij^T, so permuting the units of an
              adapter leaves ΔW_i unchanged, and concatenating two adapters' units sums their ΔW)
    cluster   k-means of the N = sum_i r_i units (each the vector [b; a] of length out + in)
              into k clusters C_1..C_k, centroids c_l = (b_l, a_l) = mean of the units in C_l
    param.    c_l <- c_l * mean_{u in C_l} ||u|| / ||c_l||          (norm decay of averaging)
    output    ΔW  = sqrt(r_mean / k) * sum_l b_l a_l^T             (variance of k units vs r)
    merged    a rank-k adapter (B = sqrt(r_mean/k) [b_1..b_k], A = [a_1; ..; a_k], scaling 1)

``reweight`` picks the dual reweighting (``dual``: both steps, the paper's default), one of its
halves (``parameter``, ``output``) or none. ``rank`` is k (default: the largest rank among the
experts' adapters of that module, so the merged adapter is the size of one expert). With
``k >= N`` every unit is its own cluster and, with ``reweight: none``, the merge is exactly the sum
of the adapters (task arithmetic with weight 1). An expert that does not adapt a module brings no
units to it. ``dense: true`` also writes the dense model ``base + ΔW`` to ``<out>/dense``.

Paper: Zhao, Shen, Zhu, Li, Su, Wang, Kuang, Wu, "Merging LoRAs like Playing LEGO: Pushing the
Modularity of LoRA to Extremes Through Rank-Wise Clustering", ICLR 2025 (arXiv:2409.16167).

Departures and choices (the paper's exact reweighting constants could not be checked against its
full text from here; this is our reading of "parameter reweighting for norm decay" and "output
reweighting for variance expansion"):

* k-means is deterministic: farthest-first initialisation (the unit of largest norm, then the
  unit farthest from the chosen centres) and Lloyd iterations until the assignment is stable (at
  most 100); no seed, and the result does not depend on the order of the experts. The paper's
  k-means implementation (random k-means++ restarts) is not specified here.
* each adapter's scaling is folded into its units symmetrically (``sqrt(s)`` on ``b`` and ``a``), so
  adapters with different ``alpha / r`` are clustered on the update they make;
* units are clustered as they are: the sign/scale gauge of a unit (``(c b, a / c)``, ``c = -1``
  included) is not normalised, as in the paper;
* output reweighting multiplies the merged update by ``sqrt(r_mean / k)`` (``r_mean``: the mean rank
  of the adapters of that module; 1 when ``k = r``); parameter reweighting rescales each centroid
  (both halves) to the mean norm of its members, which multiplies its rank-1 update by the square
  of that ratio.

The per-tensor ``merge`` below is this method on dense task vectors (their SVD factors as the
adapters): the registry's property tests run it; the engine merges adapters
(:mod:`mergesweep.merge.lora_merge`) and refuses dense experts.
"""

from __future__ import annotations

from mergesweep.merge.spec import Identity, MethodSpec, Param


def module_merge(factors, params: dict, name: str = "tensor"):
    """The merged factors of one module (a :class:`~mergesweep.merge.methods._lora.LegoResult`)."""
    from mergesweep.merge.methods import _lora

    return _lora.lora_lego(factors, params["rank"], params["reweight"])


def _merge(base, experts, p, ctx):
    from mergesweep.merge.methods._lora import dense_method_merge

    return dense_method_merge(module_merge, base, experts, p, ctx)


SPEC = MethodSpec(
    name="lora_lego",
    summary="LoRA-native: k-means over the adapters' rank-1 units (MSUs), the k centroids form a rank-k "
            "adapter, dual reweighting of its scale",
    paper="Zhao et al. 2025, Merging LoRAs like Playing LEGO (ICLR 2025, arXiv:2409.16167)",
    params=(
        Param("rank", "int", None, "merged rank k = number of clusters (default: the largest rank of the experts' "
              "adapters, per module; >= the total rank keeps every unit)", low=1),
        Param("reweight", "str", "dual", "dual reweighting: parameter (centroid norms) and output (sqrt(r/k)) "
              "scaling, one of them, or none", choices=("dual", "parameter", "output", "none")),
        Param("dense", "bool", False, "also write the dense model base + ΔW under <out>/dense"),
    ),
    merge=_merge,
    merge_adapters=module_merge,
    base="required",
    min_experts=1,
    doc=__doc__,
    formula="k-means of the units `(b_ij, a_ij)` into `rank` clusters; centroids rescaled to their members' mean "
            "norm; `ΔW = sqrt(r/k) sum_l b_l a_l^T` as a rank-k adapter",
    # farthest-first initialisation and Lloyd's steps depend on the set of units, not their order
    order_invariant=True,
    identities=(Identity({}, "expert", 1, atol=1e-5), Identity({"reweight": "none"}, "expert", 1, atol=1e-5)),
    deviations="deterministic k-means (farthest-first initialisation, no seed); scalings folded into the units; "
               "dual reweighting as centroid norm = members' mean norm and output x sqrt(r_mean/k) (our reading "
               "of the paper); experts must be LoRA adapters",
    mergekit="",
)
