"""PLeaS: merge two models (from different bases) by partial permutation matching and least squares.

Two models A (expert 0) and B (expert 1) of one architecture, trained from different
initialisations, are merged in two steps (Nasery, Hayase, Koh, Oh 2025):

1. **Permutations and partial matching.** B is moved into A's basis by the alignment package
   (:mod:`mergesweep.align`; ``matching: activation`` correlates both models' activations on the
   calibration data, ``weight`` uses weight matching): one permutation ``P_res`` of the residual
   stream, per layer the attention heads (GQA-respecting), value dimensions and MLP units. Every
   group except the MLP units is merged completely. For the MLP of each layer, with ``I`` units per
   model, a merged width ``m = round(width * I)`` and the correlation ``c_k`` of A's unit ``k`` with
   its matched unit of B (Pearson, over the calibration tokens)::

       n_sep   = floor(budget_ratio * m / (1 + budget_ratio))   units kept from each model
       n_merge = m - 2 n_sep                                    merged pairs
       merged  = the n_merge pairs of highest c_k
       sep_X   = of X's other units, the n_sep of largest  rms(x_u) * ||W_down,X[:, u]||

   and the merged layer's units are ``[merged pairs, A's separate units, B's separate units]``.
   Initial weights (the authors' partial merge): every tensor the average of A and ``P(B)``;
   gate/up rows of a merged pair the pair's average, of a separate unit its model's own; down_proj
   columns of a merged pair the average, of a separate unit half its model's own.

2. **Least squares, layer by layer.** Block by block (:class:`mergesweep.stats.blocks.BlockRunner`),
   every linear layer ``W`` of the merged model, in the order q/k/v, o, gate/up, down (each stage
   sees the stages fitted before it), is refitted on the calibration tokens of both experts::

       W* = argmin_W  sum_{X in {A, B}} || Z_M W^T - F_X ||^2  +  lam ||W - W_0||^2
          = W_0 + [(G + lam I)^+ (Z_M^T F - G W_0^T)]^T,   G = Z_M^T Z_M,  F = (F_A + F_B) / 2

   where ``Z_M`` are the *merged* model's inputs to that layer (computed with everything fitted so
   far), ``F_X`` the layer's outputs in model X on X's own inputs, permuted into the merged basis
   (for gate/up: the merged pairs' outputs and each model's separate units' outputs), ``W_0`` the
   initial weights above and ``lam = ridge * mean(diag(G))``. The sum over the two models equals
   one least squares against their average ``F``. An untied ``lm_head`` is fitted the same way to
   the average of the two models' logits; a tied one stays the averaged embedding. Biases are
   fitted with a constant input column.

``width`` 1 with ``budget_ratio`` 0 keeps the architecture (Git Re-Basin permutation plus least
squares); a smaller width returns ``config_updates = {"intermediate_size": m}`` and tensors of the
new shapes. ``result.info`` records, per layer, the relative least-squares residuals
``||Z_M W^T - F||^2 / ||F||^2`` before (``W_0``) and after the fit, the number of merged pairs and
separate units, the fraction of units matched and the mean correlation of the merged pairs.

Paper: Nasery, Hayase, Koh, Oh, "PLeaS: Merging Models with Permutations and Least Squares",
CVPR 2025 (arXiv:2407.02447); code: github.com/SewoongLab/PLeaS-Merging.

Deviations from the authors' code (ResNets, ``pleas/methods/partial_matching.py`` and
``pleas/methods/pleas_merging.py``):

* **Closed-form least squares on the merged model's inputs.** The authors minimise the same
  per-layer squared error by Adam (lr 5e-4, cosine schedule, 400 steps), for all layers at once,
  with inputs built from the *source* models' activations (``[(x_A + x_B)/2 on merged units, x_A,
  x_B on separate units]``); here each layer is solved exactly (ridge towards the partial merge,
  which stands in for the authors' early stopping from that initialisation) on the inputs the
  merged model actually sees (the paper: "the approximation error between the features of the
  merged model and the permuted features of the original models").
* **Width at most the inputs'.** The authors' budget ratio ``r`` keeps all unmerged units, a
  layer of ``(1 + r) I`` units (wider than either model). Here ``width <= 1``: with
  ``budget_ratio`` ``r`` the same split is scaled to ``m`` units, and the units that do not fit are
  dropped (merged pairs by correlation, as the authors; separate units by output energy, our
  choice), the least squares compensating. ``budget_ratio`` is one number for every MLP layer (the
  authors choose per-layer ratios under a FLOPs budget with a Gurobi QP or by depth).
* **Only the MLP width is partial.** The residual stream, heads and value dimensions are merged
  completely (a wider residual stream would change ``hidden_size`` and every norm), so the
  authors' masked least squares (no weights from A-only to B-only units) reduces to plain least
  squares: no layer here maps separate units to separate units.
* **Matching costs.** Activation matching uses Pearson correlations (mergesweep's alignment
  package) where the authors' default is the negative Euclidean distance between activation
  vectors; merged pairs are those of highest correlation (the authors: matched cost at or above
  the ``r``-quantile).
* **Embeddings and norms** are averaged after the permutation (they are not linear layers; the
  authors' ResNets re-estimate BatchNorm statistics instead). Activation matching runs on the CPU.

``seed`` seeds torch's generator and weight matching's visiting order; activation matching, the
selection and the least squares have no random step.
"""

from __future__ import annotations

from mergesweep.errors import ConfigError, MergeError
from mergesweep.merge.spec import MethodSpec, Param


def _kernel(base, experts, p, ctx):
    raise MergeError(f"tensor '{getattr(ctx, 'name', '?')}': pleas merges whole models (forward passes over "
                     "calibration data); it has no per-tensor kernel")


def _validate(params: dict, n_experts: int, has_base: bool) -> None:
    if n_experts != 2:
        raise ConfigError(f"experts: method 'pleas' takes 2 experts, got {n_experts}")


def _merge_model(inputs):
    from mergesweep.merge.methods._pleas import pleas_merge

    return pleas_merge(inputs)


SPEC = MethodSpec(
    name="pleas",
    summary="two models from different bases: partial permutation matching, then layer-wise least squares "
            "(optionally to a narrower MLP)",
    paper="Nasery et al. 2025, PLeaS: Merging Models with Permutations and Least Squares (arXiv:2407.02447)",
    params=(
        Param("width", "float", 1.0, "merged MLP width as a fraction of the inputs' intermediate_size",
              low=0.0, high=1.0, low_open=True),
        Param("budget_ratio", "float", 0.0,
              "partial matching: share of each MLP layer's units kept separately from each model rather than "
              "merged (the authors' budget ratio; 0 merges every kept unit, 1 merges none)", low=0.0, high=1.0),
        Param("matching", "str", "activation", "how B is permuted onto A (mergesweep.align)",
              choices=("activation", "weight")),
        Param("ridge", "float", 1e-3,
              "least-squares regulariser towards the partial merge, relative to the mean diagonal of the Gram "
              "matrix (0: pseudo-inverse)", low=0.0),
        Param("seed", "int", 0, "seeds torch and weight matching's visiting order", low=0),
    ),
    merge=_kernel,
    base="unused",
    min_experts=2,
    max_experts=2,
    validate=_validate,
    deviations="closed-form per-layer least squares on the merged model's inputs (authors: Adam on source-model "
               "inputs); width at most the inputs' (units that do not fit are dropped); only the MLP width is "
               "partial; Pearson correlations for matching; embeddings and norms averaged",
    doc=__doc__,
    formula="permute B onto A, merge the `n_merge` best-correlated MLP pairs (keep `n_sep` units of each), then per "
            "linear layer `W = argmin sum_X ||Z_M W^T - F_X||^2 + lam ||W - W_0||^2`",
    order_invariant=False,  # A's basis is kept; ties and the unit selection depend on the order
    identities=(),
    merge_model=_merge_model,
)
