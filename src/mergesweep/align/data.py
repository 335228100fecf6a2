"""Text data for activation matching and LMC: jsonl records with ``text`` or ``prompt`` + ``target``."""

from __future__ import annotations

import json
import os
from pathlib import Path
import torch

from mergesweep.align.spec import AlignError


def read_texts(path: str | os.PathLike, max_examples: int | None = None) -> list[str]:
    """One string per record: ``text``, or ``prompt + target`` concatenated (in file order)."""
    path = Path(path)
    texts: list[str] = []
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError as e:
        raise AlignError(f"{path}: data file not found") from e
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise AlignError(f"{path}:{i}: not valid JSON ({e})") from e
        if isinstance(rec, dict) and isinstance(rec.get("text"), str):
            texts.append(rec["text"])
        elif isinstance(rec, dict) and "prompt" in rec and "target" in rec:
            texts.append(f"{rec['prompt']}{rec['target']}")
        else:
            raise AlignError(f"{path}:{i}: record needs a 'text' field or 'prompt' and 'target' fields")
        if max_examples is not None and len(texts) >= max_examples:
            break
    if not texts:
        raise AlignError(f"{path}: no records")
    return texts


def load_tokenizer(model_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # missing or broken tokenizer files
        raise AlignError(f"{model_dir}: cannot load a tokenizer ({e})") from e
    return tok


def tokenize_batches(
    tokenizer, texts: list[str], batch_size: int = 8, max_length: int = 128
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded ``(input_ids, attention_mask)`` batches; sequences shorter than 2 tokens dropped."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    seqs = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) >= 2:
            seqs.append(ids)
    if not seqs:
        raise AlignError("data: every record tokenizes to fewer than 2 tokens")
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        out.append((ids, mask))
    return out


def load_causal_lm(model_dir: str | os.PathLike):
    """A Hugging Face causal LM in float32, eval mode (never ``trust_remote_code``)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    except Exception as e:
        raise AlignError(f"{model_dir}: cannot load as a causal LM ({e})") from e
    return model.eval()


def read_state(model_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, every tensor of the checkpoint in float32), read with CheckpointReader."""
    from mergesweep.checkpoints.layout import CheckpointReader

    with CheckpointReader(model_dir) as ckpt:
        return dict(ckpt.config), {k: ckpt.get(k).to(torch.float32) for k in ckpt.keys()}


def model_id_of(model_dir: str | os.PathLike) -> str:
    """The ``model_id`` from the checkpoint's ``mergesweep.json``, else the directory name."""
    import json as _json

    meta = Path(model_dir) / "mergesweep.json"
    try:
        return str(_json.loads(meta.read_text()).get("model_id") or Path(model_dir).name)
    except (OSError, ValueError):
        return Path(model_dir).name
