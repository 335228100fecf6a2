"""Tiny real checkpoints for the merge tests (no mocks: transformers config, real safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=True,
)


def make_base(path: Path, seed: int = 0, **overrides) -> Path:
    """A randomly initialised tiny Llama saved with ``save_pretrained`` (float32, tied)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY, **overrides})
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return path


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (single-file or sharded) checkpoint."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        out = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(path / shard))
        return out
    return load_file(path / "model.safetensors")


def write_like(src: Path, dst: Path, state: dict[str, torch.Tensor], config_updates: dict | None = None) -> Path:
    """A checkpoint with ``src``'s config (optionally updated) and the given tensors."""
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((Path(src) / "config.json").read_text())
    cfg.update(config_updates or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def make_expert(base: Path, dst: Path, seed: int, scale: float = 0.02) -> Path:
    """base + a random task vector (every tensor perturbed)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in read_state(base).items()}
    return write_like(base, dst, state)


def make_family(root: Path, n_experts: int = 3) -> tuple[Path, list[Path]]:
    base = make_base(root / "base")
    experts = [make_expert(base, root / f"expert{i}", seed=100 + i) for i in range(n_experts)]
    return base, experts
