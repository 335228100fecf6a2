"""Layer swapping: build a model from whole transformer layers of different experts.

Expert 0 is the receiver: every tensor comes from it unless another expert claims the layer.
``layers`` gives, per expert, the layer indices it supplies, as ranges ``"0-3,28-29"``
(inclusive, 0-based; ``""`` = none). Tensors outside the layer stack (embeddings, final norm,
lm_head) come from expert ``embeddings_from``. For the paper's recipe - a math expert receiving
the bottom and top layers of a language expert - list the math expert first and write
``layers: {language_expert: "0-5,28-29"}``.

    theta[name] = theta_{e(name)}[name],   e(name) = the expert whose ranges contain layer(name),
                                           else 0 (layer tensors) or embeddings_from (others)

Paper: Bandarkar, Muller, Yuan, Pasunuru, Hou, Huang, Mohit, "Layer Swapping for Zero-Shot
Cross-Lingual Transfer in Large Language Models", ICLR 2025 (arXiv:2410.01335). The paper's
optional blended "transition zones" at range boundaries are not implemented.

The layer index of a tensor is the number after ``layers.``, ``h.``, ``blocks.`` or ``layer.``
in its name (``model.layers.12.mlp.up_proj.weight`` -> 12).
"""

from __future__ import annotations

import re
from typing import Sequence

from mergesweep.errors import ConfigError
from mergesweep.merge.names import layer_index  # noqa: F401  (re-exported for the kernel tests)
from mergesweep.merge.spec import Identity, MethodSpec, Param


def parse_ranges(text: str, where: str = "params.layers") -> set[int]:
    """``"0-3, 7,9-9"`` -> {0, 1, 2, 3, 7, 9}."""
    out: set[int] = set()
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", part)
        if not m:
            raise ConfigError(f"{where}: {part!r} is not a layer index or range like '0-5'")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise ConfigError(f"{where}: range {part!r} is empty (end before start)")
        out.update(range(a, b + 1))
    return out


def layer_owner(params: dict, n_experts: int) -> dict[int, int]:
    owner: dict[int, int] = {}
    for i, text in enumerate(params["layers"]):
        for layer in parse_ranges(text, f"params.layers[{i}]"):
            if layer in owner and owner[layer] != i:
                raise ConfigError(f"params.layers: layer {layer} is claimed by experts {owner[layer]} and {i}")
            owner[layer] = i
    return owner


def layer_swap(experts: Sequence, source: int):
    return experts[source]


def source_of(name: str, params: dict, n_experts: int) -> int:
    layer = layer_index(name)
    if layer is None:
        return params["embeddings_from"]
    return layer_owner(params, n_experts).get(layer, 0)


def _validate(p, n, has_base):
    layer_owner(p, n)
    if p["embeddings_from"] >= n:
        raise ConfigError(f"params.embeddings_from: {p['embeddings_from']} is not an expert index (0-{n - 1})")


def _check_layout(p, num_layers):
    if num_layers is None:
        return
    for layer in layer_owner(p, len(p["layers"])):
        if layer >= num_layers:
            raise ConfigError(f"params.layers: layer {layer} does not exist (the model has {num_layers} layers)")


def _merge(base, experts, p, ctx):
    return layer_swap(experts, source_of(ctx.name, p, len(experts)))


def _inputs_for(name, p, n):
    return [source_of(name, p, n)]


SPEC = MethodSpec(
    name="layer_swap",
    summary="take whole transformer layers from different experts by index ranges",
    paper="Bandarkar et al. 2025, Layer Swapping for Zero-Shot Cross-Lingual Transfer (arXiv:2410.01335)",
    params=(
        Param("layers", "str", "", "layer ranges this expert supplies, e.g. '0-5,28-29' (expert 0 gets the rest)",
              per_expert=True),
        Param("embeddings_from", "int", 0, "expert index supplying embeddings, final norm and lm_head", low=0),
    ),
    merge=_merge,
    base="unused",
    min_experts=2,
    validate=_validate,
    check_layout=_check_layout,
    inputs_for=_inputs_for,
    deviations="no blended transition zones at range boundaries",
    doc=__doc__,
    formula="each transformer layer from the expert whose `layers` ranges name it (expert 0 otherwise); other "
            "tensors from `embeddings_from`",
    order_invariant=False,  # expert 0 receives every layer no one claims
    identities=(Identity({}, "expert", 2),),
)
