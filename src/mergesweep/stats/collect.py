"""The statistics a data-aware merge reads, computed on one model over its calibration batches.

The calibration data are right-padded ``(input_ids, attention_mask)`` batches
(:func:`mergesweep.align.data.tokenize_batches`); only real tokens (``attention_mask == 1``)
count anywhere. Three kinds (:data:`mergesweep.stats.io.KINDS`):

``gram`` — RegMean (Jin et al., *Dataless Knowledge Fusion by Merging Weights of Language
Models*, ICLR 2023). For every ``nn.Linear`` of every decoder block (attention q/k/v/o, MLP
gate/up/down; **not** the embeddings or ``lm_head``: RegMean merges linear layers, those are
averaged), with ``x_t`` the layer's input at real token ``t`` of the calibration set:

    gram/<W>       = G = Σ_t x_t x_tᵀ          float32 [in, in]
    gram_count/<W> = n = number of real tokens  float32 [1]

Token-level, every real token of every example (prompt and target alike). It is computed block
by block (:class:`~mergesweep.stats.blocks.BlockRunner`): the hidden states of all batches at
block ``l``'s input are cached, block ``l`` runs on them with its linear inputs captured, its
Gram matrices are written to the file and freed, and the cache advances to block ``l + 1``'s
input. Peak memory: the model + the cached hidden states (examples × length × hidden × 4 bytes)
+ one block's Gram matrices. Each batch's ``XᵀX`` is a float32 product (a sum over at most one
batch's tokens), accumulated over batches in float64 and stored as float32. The logits are never
computed (no ``lm_head``), so the pass costs about one forward pass over the blocks plus the
products. MergeBench (``merging_methods/regmean_utils.py: compute_grams``) hooks the same
linear layers on examples of batch size 1 (no padding) and keeps the running *mean*
``G / n``; the file stores the sum and the count, so ``G / n`` is MergeBench's matrix.

``fisher`` and ``fisher_model`` — Fisher merging (Matena & Raffel, *Merging Models with Fisher-
Weighted Averaging*, NeurIPS 2022). The diagonal Fisher information of every parameter
(``model.named_parameters()``: tied ``lm_head`` is the embedding; an untied ``lm_head`` has its
own entry), estimated per example ``n`` from the gradient of the log-likelihood of its tokens:

    g_n = ∇_θ Σ_{t ∈ P_n} log p_θ(y_{n,t} | x_{n,≤t})
    F   = Σ_n g_n ⊙ g_n / Σ_n |P_n|                      float32, the parameter's shape

where ``P_n`` are the positions ``t = 0 .. len_n − 2`` of example ``n``'s real tokens that
predict a next real token — every token of the text :func:`mergesweep.align.data.read_texts`
returns, i.e. for ``prompt`` + ``target`` records the whole concatenation (prompt tokens
included, no prompt masking), after truncation to ``max_length`` — and the labels are

* ``fisher`` (empirical Fisher): the data's next tokens ``y_{n,t} = x_{n,t+1}``;
* ``fisher_model`` (the Fisher of the model's predictive distribution): ``y_{n,t}`` drawn from
  ``softmax(logits_{n,t})``, one draw per position, from a ``torch.Generator`` seeded with
  ``seed`` on the model's device, examples in file order. Because sampled labels give
  ``E[∇ log p(y_t)] = 0`` at every position, the squared gradient of the per-example sum is an
  unbiased estimate of ``Σ_t E[(∇ log p(y_t))²]``: ``F`` is the token-level (per predicted
  token) mean Fisher.

Each example runs alone (its real tokens only, no padding) with one forward and one backward
per kind (both kinds share the forward). Normalisation is by predicted tokens, so experts with
longer calibration texts are comparable.

Where this departs from MergeBench (``merging_methods/fisher_utils.py: FisherTrainer``,
``fisher_variant="hard"``, batch size 1): MergeBench takes the log-likelihood of one token per
example — the argmax of the logits at the *last* position, i.e. the model's greedy next token
after the text — and divides the summed squared gradients by the number of examples (= tokens
there). We sum over every position of the text (the model's own samples for ``fisher_model``;
the argmax is not a draw from the model's distribution and does not estimate its Fisher), and
divide by predicted tokens. MergeBench also runs this inside an SFT trainer whose optimizer
*steps* (learning rate 1e-5) after every backward, so its Fisher mixes gradients of slightly
different weights; here the weights never change. MergeBench computes in bfloat16 with gradient
checkpointing, here float32. Its Fisher excludes ``lm_head`` and its merge skips
``model.embed*``; which tensors a merge uses is the merge method's choice.

Every statistic is checked finite before it is written (MergeError naming the tensor).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm import tqdm

from mergesweep.errors import MergeError
from mergesweep.stats.blocks import BlockRunner
from mergesweep.stats.io import KINDS, count_key, tensor_key

log = logging.getLogger(__name__)

_DTYPES = {torch.float32: ("F32", 4)}


class StreamingSafetensors:
    """A safetensors file written tensor by tensor, in a declared order, without holding them.

    ``entries``: ``[(key, shape)]`` float32 tensors in the order they will be written; the header
    (with every offset) is written first, then each :meth:`write` appends one tensor's bytes.
    :meth:`close` checks that every entry was written. Readable by ``safetensors.safe_open``."""

    def __init__(self, path: str | os.PathLike, entries: Sequence[tuple[str, Sequence[int]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.order = [k for k, _ in entries]
        if len(set(self.order)) != len(self.order):
            raise ValueError("StreamingSafetensors: duplicate keys")
        self.shapes = {k: tuple(int(d) for d in s) for k, s in entries}
        header: dict = {}
        offset = 0
        for key, shape in entries:
            nbytes = 4
            for d in shape:
                nbytes *= int(d)
            header[key] = {"dtype": "F32", "shape": list(self.shapes[key]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.order) or self.order[self._next] != key:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise ValueError(f"StreamingSafetensors: wrote {key!r}, expected {expected!r}")
        t = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if tuple(t.shape) != self.shapes[key]:
            raise ValueError(f"StreamingSafetensors: {key} has shape {tuple(t.shape)}, declared {self.shapes[key]}")
        if not t.numel():
            pass
        elif sys.byteorder == "little":
            self._f.write(memoryview(t.numpy()).cast("B"))  # no copy
        else:  # safetensors is little-endian
            self._f.write(t.numpy().astype("<f4").tobytes())
        self._next += 1

    def close(self) -> None:
        if self._f is None:
            return
        self._f.close()
        self._f = None
        if self._next != len(self.order):
            raise ValueError(f"StreamingSafetensors: {len(self.order) - self._next} declared tensors not written "
                             f"(first: {self.order[self._next]})")

    def __enter__(self) -> "StreamingSafetensors":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        elif self._f is not None:
            self._f.close()
            self._f = None


def block_linears(runner: BlockRunner, i: int) -> list[tuple[str, int]]:
    """``[(weight name, in_features)]`` of the linear layers of decoder block ``i``, in module order."""
    prefix = runner.name_of(runner.layers[i])
    return [(f"{prefix}.{rel}.weight", m.in_features) for rel, m in runner.layers[i].named_modules()
            if isinstance(m, nn.Linear)]


def fisher_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters Fisher is computed for: ``named_parameters()`` (tied weights once)."""
    return list(model.named_parameters())


def entries_for(model: nn.Module, kinds: Sequence[str]) -> list[tuple[str, tuple[int, ...]]]:
    """The file's tensors in the order :func:`collect_stats` writes them."""
    out: list[tuple[str, tuple[int, ...]]] = []
    if "gram" in kinds:
        runner = BlockRunner(model)
        for i in range(runner.num_layers):
            for name, n_in in block_linears(runner, i):
                out.append((tensor_key("gram", name), (n_in, n_in)))
                out.append((count_key(name), (1,)))
    for kind in ("fisher", "fisher_model"):
        if kind in kinds:
            out.extend((tensor_key(kind, n), tuple(p.shape)) for n, p in fisher_params(model))
    return out


def _check_finite(kind: str, name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise MergeError(f"{kind} statistic of {name} is not finite (NaN or inf): the model's activations or "
                         "gradients overflow on the calibration data")


def _to_device(batches, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(ids.to(device), mask.to(device)) for ids, mask in batches]


def gram_pass(model: nn.Module, batches, writer: StreamingSafetensors, progress: bool = True) -> dict:
    """Write ``gram/<W>`` and ``gram_count/<W>`` of every decoder block's linear layers, block by block.

    Returns ``{"tokens": real tokens summed, "blocks": decoder blocks}``."""
    runner = BlockRunner(model)
    batches = _to_device(batches, runner.device)
    tokens = int(sum(int(m.sum()) for _, m in batches))
    bar = tqdm(total=runner.num_layers * len(batches), desc="gram", unit="batch", disable=None if progress else True)
    with torch.no_grad():
        hidden = [runner.embed(ids) for ids, _ in batches]
        for i in range(runner.num_layers):
            last = i == runner.num_layers - 1
            with runner.capture_linear_inputs(runner.layers[i]) as cap:
                for b, (_, mask) in enumerate(batches):
                    cap.mask = mask
                    out = runner.run_block(i, hidden[b])
                    cap.release()
                    hidden[b] = None if last else out
                    del out
                    bar.update(1)
            for name, _ in block_linears(runner, i):
                g = cap.grams.get(name)
                if g is None:
                    raise MergeError(f"gram: linear layer {name} received no input in block {i}")
                n = cap.counts[name]
                if n != tokens:
                    raise MergeError(f"gram: {name} saw {n} tokens, the batches have {tokens}")
                g32 = g.to(torch.float32)
                _check_finite("gram", name, g32)
                writer.write(tensor_key("gram", name), g32)
                writer.write(count_key(name), torch.tensor([float(n)]))
            del cap  # this block's statistics are freed before the next block runs
    bar.close()
    return {"tokens": tokens, "blocks": runner.num_layers}


def fisher_pass(model: nn.Module, batches, kinds: Sequence[str], writer: StreamingSafetensors, seed: int = 0,
                progress: bool = True) -> dict:
    """Write the diagonal Fisher of ``kinds`` (a subset of ``fisher``, ``fisher_model``) for every
    parameter (module docstring: the formula, the tokens, the normalisation).

    Returns ``{"predicted_tokens": Σ_n |P_n|, "examples": examples}``."""
    kinds = [k for k in ("fisher", "fisher_model") if k in kinds]
    if not kinds:
        return {}
    params = fisher_params(model)
    plist = [p for _, p in params]
    device = plist[0].device
    acc = {k: [torch.zeros(p.shape, dtype=torch.float32, device=device) for p in plist] for k in kinds}
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    was = [p.requires_grad for p in plist]
    for p in plist:
        p.requires_grad_(True)
    predicted = examples = 0
    bar = tqdm(total=sum(int(ids.shape[0]) for ids, _ in batches), desc="fisher", unit="example",
               disable=None if progress else True)
    try:
        for ids, mask in batches:
            for j in range(ids.shape[0]):
                n = int(mask[j].sum())
                x = ids[j : j + 1, :n].to(device)
                logits = model(input_ids=x).logits[0, :-1].float()  # [n-1, V]: position t predicts t+1
                logp = torch.log_softmax(logits, dim=-1)
                for k_i, kind in enumerate(kinds):
                    if kind == "fisher":
                        y = x[0, 1:]
                    else:
                        with torch.no_grad():
                            y = torch.multinomial(logp.detach().exp(), 1, generator=gen).squeeze(-1)
                    ll = logp.gather(-1, y[:, None]).sum()
                    grads = torch.autograd.grad(ll, plist, retain_graph=k_i < len(kinds) - 1, allow_unused=True)
                    for a, g in zip(acc[kind], grads):
                        if g is not None:
                            a.addcmul_(g, g)
                    del grads, ll
                del logits, logp
                predicted += n - 1
                examples += 1
                bar.update(1)
    finally:
        bar.close()
        for p, w in zip(plist, was):
            p.requires_grad_(w)
    for kind in kinds:
        for (name, _), a in zip(params, acc[kind]):
            a.div_(max(predicted, 1))
            _check_finite(kind, name, a)
            writer.write(tensor_key(kind, name), a)
        acc[kind] = None
    return {"predicted_tokens": predicted, "examples": examples}


def collect_stats(model: nn.Module, batches, kinds: Sequence[str], path: str | os.PathLike, seed: int = 0,
                  progress: bool = True, metadata: dict | None = None) -> dict:
    """Compute ``kinds`` on ``model`` over ``batches`` and write them to the safetensors ``path``
    (streamed: the Gram matrices block by block). Returns counts for the record."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise MergeError(f"unknown statistics kind {unknown[0]!r} (expected one of {', '.join(KINDS)})")
    kinds = [k for k in KINDS if k in kinds]
    info: dict = {}
    with StreamingSafetensors(path, entries_for(model, kinds), metadata=metadata) as writer:
        if "gram" in kinds:
            info["gram"] = gram_pass(model, batches, writer, progress=progress)
        if "fisher" in kinds or "fisher_model" in kinds:
            info["fisher"] = fisher_pass(model, batches, kinds, writer, seed=seed, progress=progress)
    return info
