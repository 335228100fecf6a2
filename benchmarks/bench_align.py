"""Benchmark: weight matching of two SmolLM2-135M-sized models on CPU.

    .venv/bin/python benchmarks/bench_align.py [--checkpoint DIR] [--scenarios permuted noisy independent expert]
                                               [--out FILE.json]

Scenarios (both models have SmolLM2-135M's shape: 30 layers, hidden 576, MLP 1536, 9 query /
3 key-value heads, head_dim 64, vocabulary 49152, tied embeddings):

* ``permuted``    — the real checkpoint vs. a random valid permutation of it: the time to recover
                    the permutation, and whether it is recovered exactly;
* ``noisy``       — as ``permuted`` plus Gaussian noise (``--noise`` × each tensor's std);
* ``independent`` — two random initialisations (seeds 1 and 2) of the config: unrelated models;
* ``expert``      — the real checkpoint vs. a copy fine-tuned from it for a few AdamW steps on
                    synthetic text (a same-base expert): alignment should be the identity.

The reported ``seconds`` is weight matching alone (tensors already in memory, as in
``mergesweep align`` after loading); ``iterations`` is the number of coordinate-descent sweeps.
Without a real checkpoint (``--checkpoint`` / ``MERGESWEEP_SMOLLM2_DIR`` /
``resources/checkpoints/smollm2-135m-instruct``) the "real" model is a random init of the config.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from mergesweep.align.apply import permute_state_dict
from mergesweep.align.permmap import PermMap
from mergesweep.align.pipeline import weight_stats
from mergesweep.align.spec import arch_spec
from mergesweep.align.weight_matching import weight_matching

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "vocab_size": 49152, "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
}


def random_state(config: dict, seed: int) -> dict[str, torch.Tensor]:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # norms away from all-ones, so they carry (as in a trained model) information
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return sd


def finetuned_copy(ckpt: Path, state: dict, steps: int, lr: float) -> dict[str, torch.Tensor]:
    """A same-base expert: a few AdamW steps on synthetic text with the real tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergesweep.align.toy import synthetic_texts

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    texts = synthetic_texts(steps * 8, seed=0, skill="arithmetic")
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for i in range(steps):
        batch = tok(texts[i * 8 : (i + 1) * 8], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in state}


def run_one(name: str, spec, config: dict, ref: dict, model: dict, seed: int, truth: PermMap | None) -> dict:
    t0 = time.perf_counter()
    res = weight_matching(spec, ref, model, seed=seed, progress=False)
    secs = time.perf_counter() - t0
    pm = res.perm_map
    before = weight_stats(ref, model, None, config)
    after = weight_stats(ref, model, pm, config)
    row = {
        "scenario": name,
        "seconds": round(secs, 2),
        "iterations": res.iterations,
        "lap_steps": res.steps,
        "converged": res.converged,
        "sweep_seconds": [round(h["seconds"], 2) for h in res.history],
        "cosine_before": round(before["cosine"], 6),
        "cosine_after": round(after["cosine"], 6),
        "identity_fraction": {k: round(v, 4) for k, v in pm.identity_fraction().items()},
    }
    if truth is not None:  # the planted permutation (noisy: before the noise was added)
        row["recovered_exactly"] = pm.equals(truth.inverse())
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_ckpt = os.environ.get("MERGESWEEP_SMOLLM2_DIR", str(REPO / "resources/checkpoints/smollm2-135m-instruct"))
    ap.add_argument("--checkpoint", type=Path, default=Path(default_ckpt))
    ap.add_argument("--scenarios", nargs="+", default=["permuted", "noisy", "independent", "expert"])
    ap.add_argument("--noise", type=float, default=0.5, help="noisy: noise std as a fraction of each tensor's std")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--finetune-steps", type=int, default=10)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    if (args.checkpoint / "model.safetensors").exists() or (args.checkpoint / "model.safetensors.index.json").exists():
        from mergesweep.align.data import read_state

        config, real = read_state(args.checkpoint)
        real_src = str(args.checkpoint)
    else:
        config, real, real_src = dict(SMOLLM2_CONFIG), random_state(SMOLLM2_CONFIG, 0), "random init (no checkpoint)"
    spec = arch_spec(config)
    rows = []
    for sc in args.scenarios:
        if sc in ("permuted", "noisy"):
            truth = PermMap.random(spec, seed=123)
            other = permute_state_dict(real, truth, config)
            if sc == "noisy":
                g = torch.Generator().manual_seed(1)
                other = {k: v + args.noise * v.std() * torch.randn(v.shape, generator=g) for k, v in other.items()}
            rows.append(run_one(sc, spec, config, real, other, args.seed, truth))
        elif sc == "independent":
            a, b = random_state(SMOLLM2_CONFIG, 1), random_state(SMOLLM2_CONFIG, 2)
            rows.append(run_one(sc, arch_spec(SMOLLM2_CONFIG), SMOLLM2_CONFIG, a, b, args.seed, None))
            del a, b
        elif sc == "expert":
            if real_src.startswith("random"):
                print(json.dumps({"scenario": sc, "skipped": "needs the real checkpoint"}))
                continue
            ft = finetuned_copy(args.checkpoint, real, args.finetune_steps, lr=5e-5)
            rows.append(run_one(sc, spec, config, real, ft, args.seed, None))
        else:
            ap.error(f"unknown scenario {sc}")
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    report = {
        "benchmark": "weight matching, SmolLM2-135M-sized",
        "model": real_src,
        "search_threads": 1,  # weight_matching's default (see its docstring)
        "cpu_count": os.cpu_count(),
        "loadavg_at_end": load,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "rows": rows,
    }
    if args.out:
        from mergesweep.atomic import write_json

        write_json(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
