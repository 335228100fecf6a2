"""Apply a permutation map tensor by tensor, from the Hugging Face parameter name alone.

This is the hook the merge engine calls while streaming an expert::

    pm = load_perm_map("results/align/<id>/perm.safetensors")
    for name in expert.keys():
        t = permute_tensor(name, expert.get(name), pm, expert.config)

so any merge method can be combined with any alignment. Gathering is exact in any dtype.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Mapping

import torch

from mergesweep.align.permmap import PermMap, load
from mergesweep.align.spec import AlignError, arch_spec, check_compatible

__all__ = ["load_perm_map", "permute_tensor", "tensor_axes", "permute_state_dict"]

_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_EMBED = re.compile(r"^(?:model\.)?embed_tokens\.weight$")
_FINAL_NORM = re.compile(r"^(?:model\.)?norm\.(weight|bias)$")
_LAYER_NORM = re.compile(r"^[a-z_]*layernorm\.(weight|bias)$")
_PROJ = re.compile(r"^(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.(weight|bias)$")
_QK_NORM = re.compile(r"^self_attn\.(q|k)_norm\.weight$")

# (projection) -> (row index kind, column index kind) for weights; bias follows the row kind.
_PROJ_AXES = {
    "q": ("q", "residual"),
    "k": ("kv", "residual"),
    "v": ("v", "residual"),
    "o": ("residual", "o"),
    "gate": ("mlp", "residual"),
    "up": ("mlp", "residual"),
    "down": ("residual", "mlp"),
}


def load_perm_map(path: str | os.PathLike) -> PermMap:
    """Read and validate a permutation map written by ``mergesweep align``."""
    return load(path)


def tensor_axes(name: str, shape: tuple[int, ...], spec) -> list[tuple[int, str, int | None]]:
    """Which axes of parameter ``name`` are permuted, as ``[(dim, kind, layer)]`` (may be empty).

    Raises :class:`AlignError` for a name outside the supported architecture, so a tensor is never
    silently left in the wrong basis.
    """
    if name == "lm_head.weight" or _EMBED.match(name):
        return [(1, "residual", None)]
    if _FINAL_NORM.match(name):
        return [(0, "residual", None)]
    m = _LAYER.match(name)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        if layer >= spec.num_layers:
            raise AlignError(f"tensor '{name}': layer {layer} does not exist (num_hidden_layers={spec.num_layers})")
        if _LAYER_NORM.match(rest):
            return [(0, "residual", None)]
        p = _PROJ.match(rest)
        if p:
            row, col = _PROJ_AXES[p.group(2)]
            axes = [(0, row, layer)] if p.group(3) == "bias" else [(0, row, layer), (1, col, layer)]
            return [(d, k, None if k == "residual" else l) for d, k, l in axes]
        n = _QK_NORM.match(rest)
        if n:
            size = shape[0] if shape else 0
            if size == spec.head_dim:  # per-head norm shared by all heads (qwen3, gemma3): unchanged
                return []
            return [(0, "q" if n.group(1) == "q" else "kv", layer)]  # whole-projection norm (olmo2)
    raise AlignError(
        f"tensor '{name}' is not covered by the permutation structure of model_type "
        f"'{spec.model_type}'; refusing to leave it unaligned"
    )


def permute_tensor(name: str, tensor: torch.Tensor, perm_map: PermMap, config: Mapping[str, Any]) -> torch.Tensor:
    """Return ``tensor`` (HF parameter ``name``) moved into the reference's basis.

    ``config`` is the model's ``config.json`` dict; it must describe the same architecture the
    map was computed for. The result has the input's dtype and device.
    """
    spec = arch_spec(config, where=f"config of tensor '{name}'")
    if spec != perm_map.spec:
        check_compatible(spec, perm_map.spec, "the model's config", "the permutation map")
    out = tensor
    for dim, kind, layer in tensor_axes(name, tuple(tensor.shape), spec):
        idx = perm_map.index(kind, layer)
        if dim >= out.dim() or out.shape[dim] != idx.numel():
            raise AlignError(
                f"tensor '{name}' has shape {tuple(tensor.shape)}; axis {dim} should have "
                f"{idx.numel()} entries for the '{kind}' permutation"
            )
        out = out.index_select(dim, idx.to(out.device))
    return out


def permute_state_dict(
    state: Mapping[str, torch.Tensor], perm_map: PermMap, config: Mapping[str, Any], skip: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """Apply :func:`permute_tensor` to every entry (names in ``skip`` are copied unchanged)."""
    skip = set(skip)
    return {k: (v if k in skip else permute_tensor(k, v, perm_map, config)) for k, v in state.items()}
