"""Tiny Llama-family models trained in seconds: for alignment tests, demos and the benchmark.

* :func:`char_tokenizer` — a character-level ``PreTrainedTokenizerFast`` (saved with the model,
  so ``AutoTokenizer`` loads it like any other);
* :func:`synthetic_texts` — two simple synthetic "skills" (``grammar`` sentences, ``arithmetic``);
* :func:`train_tiny` — pretrain a tiny model from a config with a given seed, or continue training
  an existing one (a same-base "expert"), and save it as a Hugging Face safetensors checkpoint.

Not a substitute for the zoo's pretrain/finetune stages: it only needs to give two bases trained
from different seeds, so that their linear mode connectivity can be measured.
"""

from __future__ import annotations

import logging
import os
import random
import string
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = string.ascii_lowercase + string.digits + " .,+=?-:"

_ADJ = "red big small old new quick lazy happy sad green tall short".split()
_NOUN = "cat dog bird fish tree house car boat king queen child robot".split()
_VERB = "sees likes finds chases helps paints eats builds follows meets".split()


def char_tokenizer():
    """Character-level fast tokenizer: ``<s>`` prepended, unknown characters map to ``<unk>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def synthetic_texts(n: int, seed: int = 0, skill: str = "mixed") -> list[str]:
    """``n`` short lines of a synthetic skill: ``grammar``, ``arithmetic`` or ``mixed``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = skill if skill != "mixed" else rng.choice(["grammar", "arithmetic"])
        if kind == "grammar":
            out.append(
                f"the {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} the {rng.choice(_ADJ)} {rng.choice(_NOUN)}."
            )
        elif kind == "arithmetic":
            a, b = rng.randint(0, 49), rng.randint(0, 49)
            out.append(f"{a}+{b}={a + b}.")
        else:
            raise ValueError(f"unknown skill '{skill}'")
    return out


def tiny_config(model_type: str = "llama", **overrides):
    """A tiny GQA config for ``model_type`` (hidden 64, 4 heads / 2 kv heads, head_dim 16)."""
    from transformers import AutoConfig

    kw = dict(
        vocab_size=len(SPECIALS) + len(CHARS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def _stream_batches(tokenizer, texts: list[str], batch_size: int, seq_len: int, gen: torch.Generator):
    ids = []
    for t in texts:
        ids.extend(tokenizer(t + " ", add_special_tokens=False)["input_ids"])
    data = torch.tensor(ids, dtype=torch.long)
    n = data.numel() - seq_len - 1
    while True:
        starts = torch.randint(0, n, (batch_size,), generator=gen)
        yield torch.stack([data[s : s + seq_len] for s in starts.tolist()])


def train_tiny(
    out_dir: str | os.PathLike,
    *,
    seed: int,
    steps: int = 150,
    config=None,
    init_from: str | os.PathLike | None = None,
    skill: str = "mixed",
    lr: float = 3e-3,
    batch_size: int = 16,
    seq_len: int = 48,
    n_texts: int = 4000,
    threads: int | None = 1,
) -> dict:
    """Train a tiny causal LM and save it (safetensors + char tokenizer) to ``out_dir`` atomically.

    ``seed`` fixes the initialisation (when not ``init_from``) and the batch order; ``threads``
    (default 1: these models are overhead-bound, and a fixed count keeps runs reproducible) is
    restored afterwards. Returns ``{"loss_first", "loss_last", "steps", "seconds"}``.
    """
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(out_dir, seed, steps, config, init_from, skill, lr, batch_size, seq_len, n_texts)
    finally:
        torch.set_num_threads(old_threads)


def _train(out_dir, seed, steps, config, init_from, skill, lr, batch_size, seq_len, n_texts) -> dict:
    import time

    from transformers import AutoModelForCausalLM

    from mergesweep.atomic import atomic_dir

    tok = char_tokenizer()
    torch.manual_seed(seed)
    if init_from is not None:
        model = AutoModelForCausalLM.from_pretrained(str(init_from), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(config if config is not None else tiny_config())
    model.train()
    gen = torch.Generator().manual_seed(seed)
    batches = _stream_batches(tok, synthetic_texts(n_texts, seed=seed, skill=skill), batch_size, seq_len, gen)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    t0, first, loss = time.perf_counter(), None, None
    for _ in range(steps):
        x = next(batches)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        first = float(loss.detach()) if first is None else first
    model.eval()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    info = {"loss_first": first, "loss_last": float(loss.detach()), "steps": steps, "seconds": time.perf_counter() - t0}
    log.info("trained %s (seed %d): loss %.3f -> %.3f in %.1f s", Path(out_dir).name, seed, first, info["loss_last"], info["seconds"])
    return info


def save_random(out_dir: str | os.PathLike, config, seed: int = 0, scale: float = 0.0) -> None:
    """Save a freshly initialised model (plus ``scale``·N(0,1) added to every weight, so norms are
    not all ones) with the char tokenizer — for structural tests that need no training."""
    from transformers import AutoModelForCausalLM

    from mergesweep.atomic import atomic_dir

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if scale:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn_like(p))
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        char_tokenizer().save_pretrained(tmp)
