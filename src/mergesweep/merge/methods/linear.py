"""Linear / model soup: a weighted average of the experts' weights.

    theta = sum_i w_i * theta_i / sum_i w_i        (normalize: true, the default)
    theta = sum_i w_i * theta_i                    (normalize: false)

Paper: Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", ICML 2022 (arXiv:2203.05482). The base model, if
given, is not averaged in (list it as an expert to include it); it supplies config and tokenizer.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergesweep.merge.methods._common import check_weight_sum, normalize_param, weight_param, weighted_sum
from mergesweep.merge.spec import MethodSpec


def linear(experts: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """Weighted average (or weighted sum) of same-shaped tensors."""
    return weighted_sum(experts, weights, normalize)


def _merge(base, experts, p, ctx):
    return linear(experts, p["weight"], p["normalize"])


SPEC = MethodSpec(
    name="linear",
    summary="weighted average of the experts (model soup)",
    paper="Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
    params=(weight_param(), normalize_param(True)),
    merge=_merge,
    base="unused",
    min_experts=1,
    validate=check_weight_sum,
    doc=__doc__,
)
