"""Localize-and-Stitch: keep a sparse, localised part of each task vector; average where they overlap.

With tau_i = theta_i - theta_base over the *localised* tensors (every tensor but the input
embedding and the output head, which stay the base's), n their number of entries and
k = floor(sparsity n):

    localize  m_i   = [|tau_i| > t_i],  t_i the (k+1)-th largest |tau_i| over all localised tensors
                      (the k largest magnitudes of the whole model; none cut when k = n)
    stitch    theta = theta_base + sum_i m_i tau_i / max(1, sum_i m_i)

so an entry selected by one expert takes that expert's value, one selected by several takes the
mean of theirs, and one selected by none stays the base's.

``dataless: true`` (default) is the paper's dataless variant: the masks are the top-k masks
above; a streamed merge (two extra streaming passes find each expert's exact whole-model
threshold). ``dataless: false`` trains the masks on each expert's calibration data (a whole-model
merge): real-valued mask logits S_i start at +sigmoid_bias on the top-k entries and
-sigmoid_bias elsewhere; each of ``num_train_epochs`` epochs takes one gradient step over the
whole calibration set (the loss gradient averaged over the batches) on

    J(S_i) = loss_i(theta_base + sigmoid(S_i) * tau_i) + (l1_strength / learning_rate) sum sigmoid(S_i)
    S_i   <- S_i - learning_rate * (dloss/dtheta * tau_i) * sigmoid'(S_i) - l1_strength * sigmoid'(S_i)

(loss_i: mean next-token cross-entropy on expert i's calibration texts, padded positions
excluded; the calibration set is ``calibration_settings``: examples, max_length, batch_size), and
the mask is then binarised by rounding, m_i = [sigmoid(S_i) > 1/2] = [S_i > 0]. Stitching is
the same. Memory (data mode): the base model with one set of gradients, plus for the expert
being localised its task vector and mask logits, plus the stitch accumulators (sum of masked
task vectors, mask count): about seven float32 copies of the localised parameters.

Paper: He, Hu, Lin, Zhang, Zhao, "Localize-and-Stitch: Efficient Model Merging via Sparse Task
Arithmetic", TMLR 2025 (arXiv:2408.13656); code github.com/uiuctml/Localize-and-Stitch
(``localize_utils.py``: ``Localizer``, ``Stitcher``) and MergeBench's LLM port
(github.com/uiuctml/MergeBench ``merging/merging_methods/localize_utils.py``). Parameter names
and defaults are MergeBench's (``sparsity`` 0.1, ``sigmoid_bias`` 3, ``l1_strength`` 0,
``num_train_epochs`` 1, ``dataless``) except ``learning_rate``, the authors' 1e7 (see below).

Where this implementation departs from the code (each a choice, stated):

* Threshold: the authors keep ``|tau| >`` the k-th largest magnitude (k - 1 entries when the
  magnitudes are distinct), MergeBench ``>=`` it (k entries, but every entry tied with it; when
  it is 0, all the zeros of tau, which then count in the overlap average). Here ``>`` the
  (k+1)-th largest: exactly k entries with distinct magnitudes, never more, zeros of tau never
  selected unless sparsity is 1.
* Localised tensors: the authors localise the encoder layers only; MergeBench every parameter
  without ``embed`` in its name, and then leaves ``lm_head`` at the base while counting it in k.
  Here every tensor but the embedding and the head (the final norm is localised, as in
  MergeBench), and k counts exactly those.
* Stitching: the authors' ``Stitcher.get_average_masks`` (weights m_i / sum_j m_j, the formula
  above). MergeBench's copy of it adds only the last expert's overlap (an indentation slip),
  so with three or more experts its weights are not an average; not reproduced.
* The L1 term: the paper's objective penalises ||sigmoid(S)||_1, whose gradient step is
  ``- l1_strength * sigmoid'(S)``; the authors' and MergeBench's code apply
  ``+ l1_strength * sign(S) sigmoid'(S)`` (pushing S away from 0, not towards sparsity). The
  paper's objective is followed (``l1_strength: 0``, MergeBench's default, is unaffected).
* Gradient: the mean over the calibration batches at a fixed theta (the authors' code).
  MergeBench sums the gradients over the optimiser steps of an SFT trainer that also updates
  the weights while the gradients are collected; its ``lr`` (1e8) thus scales a sum over many
  steps, so this implementation's default is the authors' 1e7 for the mean gradient.
* The mask logits are binarised by rounding (the authors' code), not by a top-k: training may
  change the kept fraction (recorded in the model record's ``method_info``).
"""

from __future__ import annotations

from mergesweep.errors import MergeError
from mergesweep.merge.methods._common import log
from mergesweep.merge.spec import Identity, MethodSpec, Param, StatRequest

_KEY = "localize"


def _localised(name: str) -> bool:
    from mergesweep.merge.names import is_embedding, is_lm_head

    return not (is_embedding(name) or is_lm_head(name))


def _statistics(p: dict, n: int) -> list[StatRequest]:
    if not p["dataless"]:
        return []
    sparsity = p["sparsity"]

    def rank(count: int, i: int) -> int:
        from mergesweep.merge.methods._localize import threshold_rank

        return threshold_rank(sparsity, count)

    return [StatRequest(_KEY, "kth", 0, rank)]


def _stat_values(stage, base, experts, p, ctx):
    if not _localised(ctx.name):
        return {_KEY: [None] * len(experts)}
    return {_KEY: [(e - base).abs_() for e in experts]}


def _inputs_for(name: str, p: dict, n: int):
    return range(n) if _localised(name) else ()


def _merge(base, experts, p, ctx):
    if not _localised(ctx.name):
        return base.clone()
    from mergesweep.merge.methods._localize import stitch_tensor

    thresholds = ctx.stats.get(_KEY)
    if thresholds is None:
        raise MergeError(f"tensor '{ctx.name}': localize_stitch needs the whole-model top-k thresholds "
                         "(the engine's statistics pass) and got none")
    return stitch_tensor(base, experts, thresholds)


def _merge_model(inputs):
    from mergesweep.merge.methods._localize import merge_model_data

    return merge_model_data(inputs)


def _validate(p: dict, n: int, has_base: bool) -> None:
    if p["sparsity"] == 0 and (p["dataless"] or p["num_train_epochs"] == 0):
        log.warning("params.sparsity: 0 keeps no task-vector entry, so localize_stitch returns the base")


SPEC = MethodSpec(
    name="localize_stitch",
    summary="keep each expert's whole-model top-k (or trained) sparse task vector; average where masks overlap",
    paper="He et al. 2024, Localize-and-Stitch (TMLR 2025, arXiv:2408.13656)",
    formula="`m_i` = top `sparsity` of `|tau_i|` over the model (or trained on calibration data: `dataless: false`); "
            "`theta_0 + sum_i m_i tau_i / max(1, sum_i m_i)`",
    doc=__doc__,
    params=(
        Param("sparsity", "float", 0.1, "fraction k/n of each expert's localised task-vector entries kept (top-k by "
              "magnitude over the whole model; the trained mask's starting point)", low=0.0, high=1.0),
        Param("dataless", "bool", True, "true: the top-k masks (streamed); false: masks trained on each expert's "
              "calibration data (a whole-model merge)"),
        Param("sigmoid_bias", "float", 3.0, "data mode: initial mask logits +/- sigmoid_bias", low=0.0,
              low_open=True),
        Param("learning_rate", "float", 1e7, "data mode: step size on the mask logits (the weight gradients are "
              "tiny: 1e7 is the authors')", low=0.0, low_open=True),
        Param("l1_strength", "float", 0.0, "data mode: L1 penalty on sigmoid(S) (per step: l1_strength sigmoid'(S))",
              low=0.0),
        Param("num_train_epochs", "int", 1, "data mode: full-batch gradient steps on the masks (0: the top-k masks)",
              low=0),
    ),
    merge=_merge,
    base="required",
    statistics=_statistics,
    stat_values=_stat_values,
    inputs_for=_inputs_for,
    validate=_validate,
    deviations="threshold `>` the (k+1)-th largest (exactly k kept); embeddings and head stay the base's; the "
               "paper's L1 sign (the authors' code pushes S away from 0); gradient averaged over batches; masks "
               "binarised by rounding",
    order_invariant=True,
    identities=(Identity({"sparsity": 1.0}, "expert", 1, atol=2e-6), Identity({"sparsity": 0.0}, "base", 3)),
    merge_model=_merge_model,
    whole_model=lambda p: not p["dataless"],
)
