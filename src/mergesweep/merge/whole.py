"""Whole-model merges: the inputs and result of a method that runs forward passes.

Most methods are per-tensor kernels streamed by :mod:`mergesweep.merge.engine`. A few need the
models themselves: RegMean++ measures each layer's inputs on the *merged* model built so far,
PLeaS matches neurons from activations and fits each layer by least squares, Localize-and-Stitch
trains its masks on calibration examples. Such a method declares ``MethodSpec.merge_model``; the
engine calls it with :class:`WholeModelInputs` and writes the :class:`WholeModelResult` through
the same sharded writer, record and model card as every other merge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class WholeModelInputs:
    """What a whole-model method gets.

    ``params``: the kernel parameters (resolved: defaults filled, per-expert values as lists);
    ``calibration``: per expert, a JSONL file of calibration records (``text``, or ``prompt`` +
    ``target``; read with :func:`mergesweep.align.data.read_texts`), from that expert's own domain
    and never a test split; ``calibration_settings``: ``examples`` (records read per expert),
    ``max_length`` (tokens per sequence), ``batch_size``; ``device``: where to compute (float32);
    ``seed``: for anything random.
    """

    base: Path | None
    experts: list[Path]
    names: list[str]
    params: dict
    calibration: list[Path | None]
    calibration_settings: dict
    device: torch.device
    seed: int = 0

    def tokenizer(self, method: str):
        """The tokenizer of the base, else of the first expert that has one (the experts share the
        base's vocabulary; one tokenizer for every expert's calibration texts)."""
        from mergesweep.align.data import load_tokenizer
        from mergesweep.align.spec import AlignError
        from mergesweep.errors import MergeError

        tried = []
        for d in [self.base, *self.experts]:
            if d is None:
                continue
            try:
                return load_tokenizer(d)
            except AlignError as e:
                tried.append(str(e))
        raise MergeError(f"{method}: no tokenizer in the base or the experts' directories: " + "; ".join(tried))

    def batches(self, i: int, tok, device=None) -> list:
        """Expert ``i``'s calibration batches (``calibration_settings``: right-padded ``(input_ids,
        attention_mask)``), on ``device`` (default: the merge's)."""
        from mergesweep.align.data import read_texts, tokenize_batches
        from mergesweep.errors import MergeError

        path = self.calibration[i] if i < len(self.calibration) else None
        if path is None:
            raise MergeError(f"expert {i} ({self.names[i]}): no calibration data (a JSONL file from its own domain)")
        cs = self.calibration_settings
        texts = read_texts(path, max_examples=cs["examples"])
        device = self.device if device is None else device
        return [(ids.to(device), mask.to(device))
                for ids, mask in tokenize_batches(tok, texts, cs["batch_size"], cs["max_length"])]


@dataclass
class WholeModelResult:
    """A whole-model method's output.

    ``state``: every tensor of the output checkpoint by name, float32 (any device; the engine
    converts to the output dtype). Names must be the reference's (the base, else expert 0): no
    tensor missing, none added. ``config_updates``: keys of ``config.json`` that change (PLeaS at a
    reduced width: ``intermediate_size``); shapes may then differ from the reference's.
    ``info``: JSON-able facts recorded in the model record under ``method_info`` (losses,
    matched fractions, per-layer residuals).
    """

    state: dict[str, torch.Tensor]
    config_updates: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
