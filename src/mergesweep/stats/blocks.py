"""Run a Hugging Face decoder LM block by block, and record the inputs of its linear layers.

Statistics passes (Gram matrices for RegMean, layer-wise passes for RegMean++ and PLeaS) need the
hidden states at a decoder block's input, one block at a time, without holding every block's
statistics at once. :class:`BlockRunner` exposes the model's forward pass in pieces::

    runner = BlockRunner(model)
    h = runner.embed(input_ids)                 # [B, T, d]
    for i in range(runner.num_layers):
        h = runner.run_block(i, h)              # or run_block(i, h, layer=other_layer)
    logits = runner.head(h)                     # final norm + lm_head

which equals ``model(input_ids).logits``. Supported: the Llama family of decoder layers that take
``(hidden_states, attention_mask, position_ids, position_embeddings)`` with rotary embeddings
computed once per model (``model.model.rotary_emb``) — model types :data:`SUPPORTED_MODEL_TYPES`
(Llama, Mistral, Qwen2, Qwen3) in transformers 5.x. Models that scale embeddings or soft-cap
logits (Gemma, ...) are refused: running their pieces here would silently differ from ``model()``.

**Padding.** Every block is run with a plain causal mask (the one ``model(input_ids)`` builds
without an attention mask: ``None`` + ``is_causal`` under SDPA, an explicit additive mask under
eager attention; sliding-window masks for the layers the config marks so) and positions
``0..T-1``. For *right-padded* batches this is exact for every real token: a real token attends
only to earlier positions, which are all real. Outputs at padded positions are meaningless; use
the batch's attention mask to leave them out of any statistic (``capture_linear_inputs(mask=)``).

**Capturing linear inputs.** :meth:`BlockRunner.capture_linear_inputs` registers forward
pre-hooks on every ``nn.Linear`` inside a module and, over the real tokens (``mask == 1``) of each
forward pass, either accumulates the Gram matrix ``G = Σ_t x_t x_tᵀ`` (``[in, in]``, with the
token count) or keeps the inputs themselves (``[n_real, in]`` per call). Keys are parameter
names of the full model (``model.layers.0.mlp.down_proj.weight``), so they match checkpoint
tensor names. Linear layers fed the same tensor (q/k/v; gate/up) share one ``XᵀX`` product per
call (wide inputs form only its upper block triangle: :func:`gram_product`). Each call's
product is computed in ``compute_dtype`` (float32: a sum over at most one batch's tokens) and
added into a ``gram_dtype`` accumulator (float64; float32 on MPS, which has no float64), so the
sum over many batches does not lose precision.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from mergesweep.errors import MergeError

#: ``config.model_type`` values whose decoder stacks run exactly piece by piece here
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (``model.model`` of a ``*ForCausalLM``), checked for the pieces we use."""
    inner = getattr(model, "model", None)
    missing = [a for a in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(inner, a)]
    if inner is None:
        missing = ["model"]
    elif not hasattr(model, "lm_head"):
        missing.append("lm_head")
    if missing:
        raise MergeError(f"{type(model).__name__}: not a decoder LM of the Llama family (needs model.embed_tokens, "
                         f"model.layers, model.norm, model.rotary_emb and lm_head; missing: {', '.join(missing)})")
    return inner


#: column-block width of :func:`gram_product` for inputs at least twice as wide
GRAM_BLOCK = 384


def gram_product(x: torch.Tensor) -> torch.Tensor:
    """``xᵀx`` for ``x`` ``[n, d]``, computing only the upper block triangle when ``d`` is wide.

    For ``d ≥ 2·GRAM_BLOCK`` the columns are split into blocks of :data:`GRAM_BLOCK` and only
    the products of block ``i`` with blocks ``≥ i`` are formed (``(k+1)/2k`` of the work for ``k``
    blocks: 62 % for an MLP width of 1536); the lower triangle is the transpose. Every entry is
    the same dot product over the ``n`` rows as in ``x.T @ x``."""
    d = x.shape[1]
    if d < 2 * GRAM_BLOCK:
        return x.T @ x
    g = x.new_zeros(d, d)
    for i0 in range(0, d, GRAM_BLOCK):
        i1 = min(i0 + GRAM_BLOCK, d)
        g[i0:i1, i0:] = x[:, i0:i1].T @ x[:, i0:]
    g.triu_()  # the upper triangle (diagonal blocks were formed whole)
    return g.add_(g.triu(1).T)


@dataclass
class LinearCapture:
    """What :meth:`BlockRunner.capture_linear_inputs` records; set :attr:`mask` before each forward.

    * ``grams[name]``: ``gram_dtype`` ``[in, in]``, ``Σ x xᵀ`` over the real tokens of every call;
    * ``counts[name]``: the number of tokens summed (int);
    * ``inputs[name]``: with ``keep_inputs``, one ``[n_real, in]`` tensor per call (detached, on
      the model's device, in the input's dtype; linear layers fed the same tensor share it).
    """

    names: dict[int, str]
    mask: torch.Tensor | None = None
    gram: bool = True
    keep_inputs: bool = False
    gram_dtype: torch.dtype = torch.float64
    compute_dtype: torch.dtype = torch.float32
    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    _last: tuple | None = None  # (input tensor, selected rows, XᵀX of them) of the latest call

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """The real tokens' rows of ``x`` ``[..., in]`` as ``[n, in]``."""
        if self.mask is None:
            return x.reshape(-1, x.shape[-1])
        m = self.mask.to(device=x.device).bool()
        if tuple(m.shape) != tuple(x.shape[:-1]):
            raise MergeError(f"capture_linear_inputs: mask of shape {tuple(m.shape)} does not match the "
                             f"linear input's leading shape {tuple(x.shape[:-1])}")
        return x[m]

    def hook(self, module: nn.Module, args) -> None:
        x = args[0]
        name = self.names[id(module)]
        with torch.no_grad():
            if self._last is not None and self._last[0] is x:
                _, rows, g = self._last
            else:
                rows = self._rows(x.detach())
                g = None
                if self.gram:
                    g = gram_product(rows.to(self.compute_dtype))
                self._last = (x, rows, g)
            if self.gram:
                acc = self.grams.get(name)
                if acc is None:
                    dtype = torch.float32 if g.device.type == "mps" else self.gram_dtype  # MPS has no float64
                    acc = self.grams[name] = torch.zeros(g.shape, dtype=dtype, device=g.device)
                acc.add_(g)  # cast element by element into the gram_dtype accumulator
            self.counts[name] = self.counts.get(name, 0) + int(rows.shape[0])
            if self.keep_inputs:
                self.inputs.setdefault(name, []).append(rows)

    def release(self) -> None:
        """Drop the reference to the latest input (call between batches to free it early)."""
        self._last = None


class BlockRunner:
    """The forward pass of a Llama-family causal LM in pieces: embed, decoder blocks, head.

    ``model`` is a ``*ForCausalLM`` (any device/dtype; run it under ``torch.no_grad()`` unless
    gradients are wanted). Position embeddings and masks are cached per (batch, length, dtype,
    device)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.decoder = decoder_of(model)
        self.config = model.config
        mtype = getattr(self.config, "model_type", None)
        if mtype not in SUPPORTED_MODEL_TYPES:
            raise MergeError(f"model type {mtype!r} is not supported block by block "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        self.layers = self.decoder.layers
        self._pe_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._mask_cache: dict[tuple, torch.Tensor | None] = {}
        self._names = {id(m): n for n, m in model.named_modules()}

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` token ids -> ``[B, T, d]`` hidden states at block 0's input."""
        return self.decoder.embed_tokens(input_ids.to(self.device))

    def position_ids(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)

    def position_embeddings(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary ``(cos, sin)`` for positions ``0..T-1`` (cached per length, dtype, device)."""
        key = (hidden.shape[1], hidden.dtype, hidden.device)
        pe = self._pe_cache.get(key)
        if pe is None:
            with torch.no_grad():
                pe = self.decoder.rotary_emb(hidden, position_ids=self.position_ids(hidden))
            self._pe_cache[key] = pe
        return pe

    def _layer_type(self, i: int) -> str:
        types = getattr(self.config, "layer_types", None)
        if types:
            return types[i]
        # Mistral: one sliding window for every layer when the config sets one
        return "sliding_attention" if getattr(self.config, "sliding_window", None) and self.config.model_type == "mistral" \
            else "full_attention"

    def causal_mask(self, i: int, hidden: torch.Tensor, layer: nn.Module | None = None):
        """The mask ``model(input_ids)`` gives layer ``i`` for this batch shape (no padding mask)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        attn = getattr(layer if layer is not None else self.layers[i], "self_attn", None)
        config = getattr(attn, "config", None) or self.config
        ltype = self._layer_type(i)
        impl = getattr(config, "_attn_implementation", None)
        key = (ltype, impl, id(config), tuple(hidden.shape[:2]), hidden.dtype, hidden.device)
        if key not in self._mask_cache:
            fn = create_sliding_window_causal_mask if ltype == "sliding_attention" else create_causal_mask
            self._mask_cache[key] = fn(config=config, inputs_embeds=hidden, attention_mask=None, cache=None,
                                       position_ids=self.position_ids(hidden))
        return self._mask_cache[key]

    def run_block(self, i: int, hidden: torch.Tensor, layer: nn.Module | None = None) -> torch.Tensor:
        """Decoder block ``i`` (or ``layer`` in its place: a decoder layer of another model with
        the same hidden size) on ``hidden`` ``[B, T, d]``; returns the block's output."""
        block = self.layers[i] if layer is None else layer
        out = block(hidden, attention_mask=self.causal_mask(i, hidden, layer), position_ids=self.position_ids(hidden),
                    position_embeddings=self.position_embeddings(hidden), use_cache=False)
        return out[0] if isinstance(out, tuple) else out

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + ``lm_head``: the logits ``[B, T, vocab]``."""
        return self.model.lm_head(self.decoder.norm(hidden))

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """All pieces in sequence (equals ``model(input_ids).logits`` on real tokens)."""
        h = self.embed(input_ids)
        for i in range(self.num_layers):
            h = self.run_block(i, h)
        return self.head(h)

    def name_of(self, module: nn.Module) -> str | None:
        """``module``'s qualified name in the model (None when it is not part of it)."""
        return self._names.get(id(module))

    @contextlib.contextmanager
    def capture_linear_inputs(self, module: nn.Module, mask: torch.Tensor | None = None, *, gram: bool = True,
                              keep_inputs: bool = False, prefix: str | None = None,
                              gram_dtype: torch.dtype = torch.float64,
                              compute_dtype: torch.dtype = torch.float32) -> Iterator[LinearCapture]:
        """Record the inputs of every ``nn.Linear`` inside ``module`` while the block runs.

        ``mask`` ``[B, T]`` (1 = real token) selects the rows that count; set ``capture.mask``
        before each batch when it changes (None: every position counts). ``gram``: accumulate
        ``Σ x xᵀ`` and the token count per linear; ``keep_inputs``: keep the real tokens' inputs.
        Keys are ``<qualified name>.weight`` in the full model; for a module that is not part
        of this model (a layer of another model run with ``run_block(layer=)``) give
        ``prefix`` (``model.layers.3``) to name its linears as the layer it stands in for."""
        base = prefix if prefix is not None else self.name_of(module)
        if base is None:
            raise MergeError("capture_linear_inputs: the module is not part of this model; pass prefix= "
                             "(the qualified name of the layer it stands in for)")
        names: dict[int, str] = {}
        for rel, m in module.named_modules():
            if isinstance(m, nn.Linear):
                names[id(m)] = ".".join(p for p in (base, rel, "weight") if p)
        cap = LinearCapture(names=names, mask=mask, gram=gram, keep_inputs=keep_inputs, gram_dtype=gram_dtype,
                            compute_dtype=compute_dtype)
        handles = [m.register_forward_pre_hook(cap.hook) for m in module.modules() if id(m) in names]
        try:
            yield cap
        finally:
            for h in handles:
                h.remove()
            cap.release()
