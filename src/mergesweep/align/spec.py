"""Permutation symmetry of a decoder-only transformer, derived from its Hugging Face config.

A pre-norm (or post-norm) decoder with RMSNorm, rotary attention and a gated MLP computes the
same function after these relabellings of hidden units (``P[i]`` = "new unit ``i`` is old unit
``P[i]``", i.e. every permutation is a *gather* index):

* **residual** ``P_res`` (size ``hidden``): one permutation of the residual stream shared by the
  token embeddings (columns), every ``*layernorm`` / final ``norm`` weight, the inputs (columns)
  of q/k/v/gate/up, the outputs (rows) of o_proj/down_proj and their biases, and ``lm_head``
  (columns; tied or not). RMSNorm's mean square is permutation invariant, so it is exact as long
  as the norm weights are permuted along.
* **mlp** ``P_mlp[l]`` (size ``intermediate``): gate/up rows (and biases), down_proj columns. The
  activation is elementwise, so any permutation is exact.
* **attention heads** of layer ``l``, respecting grouped-query attention: query head ``j`` reads
  key/value head ``j // g`` (``g = heads / kv_heads``). A valid relabelling permutes the kv heads
  (``kv_heads``) and, inside every group, the ``g`` query heads that share one kv head
  (``q_heads``), i.e. ``q_heads[j] // g == kv_heads[j // g]``. Rotary embeddings rotate dimension
  pairs with distinct frequencies, so nothing moves *inside* a query or key head.
* **value dimensions** ``v_dims[l]`` (``kv_heads × head_dim``): inside a value head any
  permutation is exact, provided o_proj's input columns of every query head that reads that value
  head move the same way.

Supported model types are those whose HF implementation has exactly this structure (checked by
function-preservation tests for each): see :data:`SUPPORTED_MODEL_TYPES`. Anything else is
refused with :class:`AlignError` rather than silently producing a non-equivalent model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from mergesweep.errors import MergesweepError


class AlignError(MergesweepError, ValueError):
    """Alignment cannot proceed (unsupported architecture, mismatched models, bad permutation map).

    The message names the model directory, config key or tensor.
    """


#: model_type -> short note on what differs from plain Llama (all verified by tests).
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "optional attention_bias (q/k/v/o) and mlp_bias (gate/up/down)",
    "mistral": "as llama, no biases; sliding window is permutation invariant",
    "qwen2": "q/k/v biases",
    "qwen3": "per-head q_norm/k_norm (weights of size head_dim, shared by heads: unchanged)",
    "gemma": "RMSNorm(1+w), embedding scaling: both permutation invariant",
    "gemma2": "extra pre/post feed-forward norms (residual basis); logit soft-capping",
    "gemma3_text": "gemma2 layout plus per-head q_norm/k_norm",
    "olmo2": "post-norms only; q_norm/k_norm over the whole projection (permuted with the heads)",
}


@dataclass(frozen=True)
class ArchSpec:
    """The shapes that define the permutation groups of one architecture instance."""

    model_type: str
    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied: bool

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (``g``)."""
        return self.num_heads // self.num_kv_heads

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "hidden": self.hidden,
            "intermediate": self.intermediate,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "tied": self.tied,
        }


def _partial_rotary(config: Mapping[str, Any]) -> float:
    for src in (config, config.get("rope_parameters") or {}, config.get("rope_scaling") or {}):
        if isinstance(src, Mapping) and src.get("partial_rotary_factor") not in (None, 1, 1.0):
            return float(src["partial_rotary_factor"])
    return 1.0


def arch_spec(config: Mapping[str, Any], where: str = "config.json") -> ArchSpec:
    """Derive the permutation structure from a Hugging Face config dict.

    Raises :class:`AlignError` naming ``where`` and the offending key for anything that is not
    exactly covered (unknown model type, mixture of experts, partial rotary, uneven GQA).
    """
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise AlignError(
            f"{where}: model_type '{model_type}' is not supported by permutation alignment "
            f"(supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}); its permutation symmetry "
            "would have to be derived and tested before it can be aligned"
        )
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if config.get(key):
            raise AlignError(f"{where}: '{key}' = {config[key]}: mixture-of-experts layers are not supported")
    prf = _partial_rotary(config)
    if prf != 1.0:
        raise AlignError(
            f"{where}: partial_rotary_factor = {prf}: partial rotary heads are not supported "
            "(the non-rotary part of a head would need its own permutation group)"
        )
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        spec = ArchSpec(
            model_type=model_type,
            num_layers=int(config["num_hidden_layers"]),
            hidden=hidden,
            intermediate=int(config["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            vocab_size=int(config["vocab_size"]),
            tied=bool(config.get("tie_word_embeddings", model_type.startswith("gemma"))),
        )
    except KeyError as e:
        raise AlignError(f"{where}: key {e} is missing") from e
    if heads % kv:
        raise AlignError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    return spec


def check_compatible(model: ArchSpec, reference: ArchSpec, model_where: str, ref_where: str) -> None:
    """Two checkpoints can be aligned only if every permutation group has the same size."""
    a, b = model.as_dict(), reference.as_dict()
    diff = [k for k in a if k != "tied" and a[k] != b[k]]
    if diff:
        detail = ", ".join(f"{k}: {a[k]} vs {b[k]}" for k in diff)
        raise AlignError(f"{model_where} and {ref_where} have different architectures ({detail})")
