"""Tiny Llama bases for tests and the tiny preset: a byte-level BPE tokenizer trained on the
skill data, a Llama config of about a hundred thousand parameters, and some seconds of
pretraining on a mixture of every suite's training text, loss on every token. The base learns the
prompts' format; how far it gets on the skills themselves is the preset's choice of steps
(``config/presets/tiny.yaml`` stops before any skill emerges, so its experts have something to
learn)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

SPECIAL = ["<|endoftext|>", "<|pad|>"]


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """Byte-level BPE (digits split one per token, as in SmolLM2) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|pad|>", unk_token=None)


def tiny_llama_config(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                      intermediate: int = 128, pad_token_id: int = 1, eos_token_id: int = 0):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=128, tie_word_embeddings=True, rms_norm_eps=1e-5,
                       pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=eos_token_id,
                       architectures=["LlamaForCausalLM"])


def read_records(data_dirs: list[Path]) -> list[dict]:
    recs = []
    for d in data_dirs:
        with open(Path(d) / "train.jsonl") as f:
            recs.extend(json.loads(line) for line in f if line.strip())
    return recs
