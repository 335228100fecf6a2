"""Benchmark: the LoRA-native merges (lora_lego, rmm, knots) on three SmolLM2-135M-shaped LoRA
experts (rank 16, alpha 32, every linear layer of the 30 decoder layers: 210 modules each).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lora_methods.py --work /tmp/mergesweep-lora-bench

What it does:

1. writes (once) under ``--work`` a random SmolLM2-shaped base (hidden 576, intermediate 1536, 30
   layers, 9 heads / 3 KV heads, vocabulary 49152, tied embeddings; bfloat16, ~270 MB) and three
   random rank-16 adapters with ``mergesweep.lora.write.write_adapter``;
2. runs each merge through the real engine (``merge_checkpoints``: opening and checking the
   adapters against the base, fingerprints, the per-module kernels, writing the output, record
   and card) in a fresh process, ``--repeats`` times, and reports the best wall time and the
   child's peak RSS;
3. reports, for lora_lego and rmm, the kernel time alone (the module loop on factors already in
   memory), so the I/O share is visible.

Random factors are a worst case for k-means (no cluster structure: Lloyd runs to its iteration
cap more often than on trained adapters).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
               tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: run name -> (method, parameters); task_arithmetic streams base + ΔW densely (the reference)
RUNS = {
    "lora_lego": ("lora_lego", {}),
    "lora_lego_k48": ("lora_lego", {"rank": 48}),
    "rmm": ("rmm", {}),
    "rmm_m3": ("rmm", {"components": 3}),
    "knots": ("knots", {}),
    "task_arithmetic": ("task_arithmetic", {}),
}


def prepare(work: Path, rank: int = 16, n: int = 3) -> tuple[Path, list[Path]]:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from mergesweep.lora.write import write_adapter

    base = work / "base"
    if not (base / "model.safetensors").exists():
        base.mkdir(parents=True, exist_ok=True)
        cfg = LlamaConfig(**SMOLLM2, torch_dtype="bfloat16")
        g = torch.Generator().manual_seed(0)
        h, i, kv = SMOLLM2["hidden_size"], SMOLLM2["intermediate_size"], 192
        state = {"model.embed_tokens.weight": (torch.randn(SMOLLM2["vocab_size"], h, generator=g) * 0.02),
                 "model.norm.weight": torch.ones(h)}
        for layer in range(SMOLLM2["num_hidden_layers"]):
            p = f"model.layers.{layer}."
            shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                      "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
                      "mlp.down_proj": (h, i)}
            for name, shape in shapes.items():
                state[p + name + ".weight"] = torch.randn(*shape, generator=g) * 0.02
            state[p + "input_layernorm.weight"] = torch.ones(h)
            state[p + "post_attention_layernorm.weight"] = torch.ones(h)
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, str(base / "model.safetensors"),
                  metadata={"format": "pt"})
        cfg.save_pretrained(base)
    adapters = []
    from mergesweep.checkpoints.layout import CheckpointReader

    for e in range(n):
        out = work / f"lora{e}"
        adapters.append(out)
        if (out / "adapter_model.safetensors").exists():
            continue
        g = torch.Generator().manual_seed(100 + e)
        factors = {}
        with CheckpointReader(base) as r:
            for name in r.keys():
                if any(f".{m}." in name for m in LINEAR):
                    o, i = r.shape(name)
                    factors[name] = (torch.randn(o, rank, generator=g) * 0.01, torch.randn(rank, i, generator=g) / i ** 0.5)
        write_adapter(out, factors, lora_alpha=2.0 * rank, base_model_name_or_path=str(base))
    return base, adapters


def one(method: str, work: Path) -> dict:
    """One merge in this process (the child): wall time, peak RSS, kernel time."""
    import shutil

    import torch

    from mergesweep.merge.engine import merge_checkpoints

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    base, adapters = prepare(work)
    real, params = RUNS[method]
    out = work / f"out-{method}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    rec = merge_checkpoints(real, base, adapters, params, out)
    wall = time.perf_counter() - t0
    kernel = None
    if real in ("lora_lego", "rmm", "knots"):
        from mergesweep.lora.adapter import AdapterReader
        from mergesweep.merge.methods import get_method
        from mergesweep.merge.spec import resolve_params

        spec = get_method(real)
        kp, _ = resolve_params(spec, params, len(adapters))
        readers = [AdapterReader(a) for a in adapters]
        mods = readers[0].modules()
        facs = {m: [(*r.factors(m), r.scaling(m)) for r in readers] for m in mods}
        t1 = time.perf_counter()
        for m in mods:
            spec.merge_adapters(facs[m], kp, m)
        kernel = time.perf_counter() - t1
        for r in readers:
            r.close()
    return {"method": method, "wall_s": round(wall, 3), "kernel_s": None if kernel is None else round(kernel, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "model_id": rec["model_id"], "method_info": rec.get("method_info")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/mergesweep-lora-bench")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", default=",".join(RUNS))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    work = Path(args.work)
    if args.one:
        print(json.dumps(one(args.one, work)))
        return 0
    t0 = time.perf_counter()
    prepare(work)
    print(f"inputs ready under {work} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    rows = []
    for method in args.methods.split(","):
        best = None
        for _ in range(args.repeats):
            res = subprocess.run([sys.executable, __file__, "--work", str(work), "--one", method],
                                 capture_output=True, text=True, cwd=REPO)
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                return 1
            row = json.loads(res.stdout.strip().splitlines()[-1])
            if best is None or row["wall_s"] < best["wall_s"]:
                best = row
        rows.append(best)
        print(f"{method:18s} wall {best['wall_s']:7.2f} s   kernel {best['kernel_s'] if best['kernel_s'] is not None else '-':>7} s"
              f"   peak RSS {best['peak_rss_mb']:7.0f} MB   {json.dumps(best['method_info'])[:160]}")
    print(json.dumps(rows, indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
