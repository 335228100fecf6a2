"""Shared helpers for the pipeline tests: tiny real checkpoints and paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def run_cli(*args, cwd=None, check=False, env=None):
    """Run ``python -m mergesweep ARGS`` and return the CompletedProcess (text)."""
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([PY, "-m", "mergesweep", *map(str, args)], cwd=cwd, capture_output=True, text=True, env=e)
    if check and proc.returncode != 0:
        raise AssertionError(f"mergesweep {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


def tiny_checkpoint(path: Path, seed: int = 0, hidden: int = 32, vocab: int = 64) -> Path:
    """A real, random tiny Llama checkpoint saved as safetensors (no tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path
