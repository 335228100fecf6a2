"""Linear / model soup: a weighted average of the experts' weights.

    theta = sum_i w_i * theta_i / sum_i w_i        (normalize: true, the default)
    theta = sum_i w_i * theta_i                    (normalize: false)

Paper: Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", ICML 2022 (arXiv:2203.05482). The base model, if
given, is not averaged in (list it as an expert to include it); it supplies config and tokenizer.
"""

from __future__ import annotations

from typing import Sequence

from mergesweep.merge.methods._common import check_total_weight, normalize_param, weight_param
from mergesweep.merge.spec import Identity, MethodSpec


def linear(experts: Sequence, weights: Sequence[float], normalize: bool = True):
    """Weighted average (or weighted sum) of same-shaped float32 tensors."""
    from mergesweep.merge.methods._parts import weighted_sum

    return weighted_sum(experts, weights, normalize)


def _merge(base, experts, p, ctx):
    return linear(experts, p["weight"], p["normalize"])


SPEC = MethodSpec(
    name="linear",
    summary="weighted average of the experts (model soup)",
    paper="Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
    params=(weight_param(help="per-expert weight of the model"), normalize_param(True, "divide by the sum of the weights")),
    merge=_merge,
    base="unused",
    min_experts=1,
    validate=check_total_weight,
    doc=__doc__,
    formula="`sum_i w_i theta_i / sum_i w_i` (`normalize: false`: no division)",
    order_invariant=True,
    identities=(Identity({}, "expert", 1), Identity({"weight": [1.0, 0.0, 0.0]}, "expert", 3)),
    mergekit="`normalize: true` with weights summing to 0 is an error (mergekit divides by 0); `weight` "
             "defaults to 1",
)
