"""What a parameter name says about a tensor: its transformer layer, whether it is the input
embedding or the output head. Shared by the engine and the methods; no torch."""

from __future__ import annotations

import re

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_EMBED_RE = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|embed_in)\.weight$")
_HEAD_RE = re.compile(r"(?:^|\.)(?:lm_head|embed_out)\.weight$")


def layer_index(name: str) -> int | None:
    """``model.layers.12.mlp.up_proj.weight`` -> 12; ``None`` outside the layer stack."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def is_embedding(name: str) -> bool:
    """The input embedding matrix (Llama ``embed_tokens``, GPT-2 ``wte``, BERT, GPT-NeoX)."""
    return _EMBED_RE.search(name) is not None


def is_lm_head(name: str) -> bool:
    """The output projection to the vocabulary (``lm_head``, GPT-NeoX ``embed_out``)."""
    return _HEAD_RE.search(name) is not None
