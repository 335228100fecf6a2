"""Benchmark: task arithmetic on three SmolLM2 LoRA experts, from the adapters vs from densified copies.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_lora.py
        [--base resources/checkpoints/smollm2-135m-instruct] [--work /tmp/mergesweep-bench-lora]
        [--rank 16] [--threads 1] [--repeat 1] [--no-native]

1. the base: ``--base`` when it exists (the embedded default's SmolLM2-135M-Instruct, as
   ``tests/conftest.py`` fetches it), linked under ``--work`` so fingerprint caches are written there;
   else a randomly initialised Llama of SmolLM2-135M's configuration (same shapes, same cost);
2. three LoRA adapters of rank ``--rank`` on every linear layer of the decoder (q, k, v, o, gate,
   up, down: 210 modules), with random A *and* B (so ΔW = (α/r)·B·A ≠ 0), written with
   :func:`mergesweep.lora.write.write_adapter`, and their densified copies (base + ΔW per tensor,
   float32 safetensors) - built once;
3. ``mergesweep merge`` with ``task_arithmetic`` on the adapters (the engine streams base + ΔW per
   tensor, :class:`mergesweep.lora.adapter.LoraCheckpoint`) and on the dense copies, each in a
   fresh process; prints each one's wall time and peak RSS (the child's ``wait4`` rusage) and the
   ratios adapters / dense;
4. the LoRA-native methods on the same adapters, when this build has them (``lora_lego``, ``rmm``:
   skipped with a message otherwise, or with ``--no-native``).

The adapter merge reads the base once per input (base + 3 experts) instead of four dense files, and
computes a rank-r product per adapted weight. It does not import peft (mergesweep.lora.adapter reads
adapter_config.json itself, with peft's defaults); methods that *write* an adapter do (through
``peft.LoraConfig``): that fixed cost is printed as "import peft".

Measured (2 shared cores, load average ~3, ``--repeat 2``, real SmolLM2-135M, rank 16, 1 thread):
dense 8.1 s / 787 MB, adapters 9.9 s / 799 MB (x1.22 wall, x1.02 RSS); lora_lego 14.7 s / 440 MB,
rmm 6.0 s / 335 MB; import peft 6.9 s / 161 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: SmolLM2-135M-Instruct's architecture (used only when the real base is unavailable)
SMOLLM2_CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576, intermediate_size=1536,
    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
    max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)
#: LoRA-native methods timed on the same adapters when this build has them: (method, params)
NATIVE = (("lora_lego", {}), ("rmm", {"components": 2}))


def run(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of a command in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def prepare_base(base: Path, work: Path) -> tuple[Path, str]:
    """The base under ``work`` (links to ``base``'s files, or a random SmolLM2-shaped Llama)."""
    bdir = work / "base"
    if (bdir / "config.json").exists():
        return bdir, json.loads((bdir / "config.json").read_text()).get("_bench_origin", "real SmolLM2")
    tmp = work / ".base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if (base / "model.safetensors").exists():
        tmp.mkdir(parents=True)
        for f in base.iterdir():
            if f.is_file() and f.name != ".mergesweep-sha256":
                (tmp / f.name).symlink_to(f.resolve())
        origin = f"real SmolLM2 ({base})"
    else:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SMOLLM2_CONFIG)).save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["_bench_origin"] = origin = "random Llama of SmolLM2-135M's configuration"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tmp.rename(bdir)
    return bdir, origin


def prepare_experts(base: Path, work: Path, rank: int, n: int = 3) -> tuple[list[Path], list[Path]]:
    """``n`` random LoRA adapters on every linear layer and their densified copies (built once)."""
    import torch
    from safetensors.torch import save_file

    from mergesweep.checkpoints.layout import CheckpointReader
    from mergesweep.lora.adapter import LoraCheckpoint
    from mergesweep.lora.write import write_adapter

    adapters, dense = [], []
    with CheckpointReader(base) as ref:
        shapes = {k: ref.shape(k) for k in ref.keys()
                  if len(ref.shape(k)) == 2 and k.endswith(".weight") and k.split(".")[-2] in LINEAR}
    for i in range(n):
        adir, ddir = work / f"lora{i}", work / f"dense{i}"
        adapters.append(adir)
        dense.append(ddir)
        if not adir.exists():
            g = torch.Generator().manual_seed(1000 + i)
            factors = {k: (0.02 * torch.randn(out, rank, generator=g), torch.randn(rank, inp, generator=g) / inp ** 0.5)
                       for k, (out, inp) in shapes.items()}
            write_adapter(adir, factors, lora_alpha=2 * rank, base_model_name_or_path="smollm2-135m-instruct")
        if not (ddir / "model.safetensors").exists():
            tmp = work / f".dense{i}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for f in base.iterdir():
                if f.is_file() and f.suffix in (".json", ".jinja") and f.name != "mergesweep.json":
                    shutil.copy(f, tmp / f.name)
            with LoraCheckpoint(adir, base) as ck:
                state = {k: ck.get(k).contiguous() for k in ck.keys()}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            del state
            tmp.rename(ddir)
    return adapters, dense


def prepare(args) -> int:
    """``--prepare``: the base and the experts (in a process of its own: see :func:`main`)."""
    base, origin = prepare_base(args.base, args.work)
    prepare_experts(base, args.work, args.rank)
    print(json.dumps({"base": str(base), "origin": origin}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=REPO / "resources/checkpoints/smollm2-135m-instruct")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mergesweep-bench-lora"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1, help="runs per merge (the fastest is reported)")
    ap.add_argument("--no-native", action="store_true", help="skip lora_lego / rmm")
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.prepare:
        return prepare(args)
    # This process stays light (no torch): Linux carries the parent's peak RSS into a child's
    # ru_maxrss across fork/vfork + exec, so a heavy parent would inflate every measurement.
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    ms = [sys.executable, "-m", "mergesweep"]
    proc = subprocess.run([sys.executable, __file__, "--prepare", "--base", str(args.base), "--work", str(args.work),
                           "--rank", str(args.rank)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"preparing the experts failed:\n{proc.stderr[-3000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    base = Path(info["base"])
    adapters = [args.work / f"lora{i}" for i in range(3)]
    dense = [args.work / f"dense{i}" for i in range(3)]
    print(f"base: {info['origin']}; 3 experts, LoRA rank {args.rank} on {', '.join(LINEAR)}; threads {args.threads}")
    wall, rss = run([sys.executable, "-c", "import torch, peft"], env)
    wall0, rss0 = run([sys.executable, "-c", "import torch"], env)
    print(f"import peft (on top of torch): {wall - wall0:.1f} s, {rss - rss0:.0f} MB")

    def merge(tag: str, method: str, experts: list[Path], params: dict) -> tuple[float, float]:
        doc = {"method": method, "base": str(base), "experts": [str(e) for e in experts],
               "expert_names": [f"e{i}" for i in range(len(experts))], "params": params, "device": "cpu"}
        spec = args.work / f"{tag}.yaml"
        spec.write_text(json.dumps(doc))
        best = None
        for _ in range(args.repeat):
            out = args.work / f"out-{tag}"
            shutil.rmtree(out, ignore_errors=True)
            got = run([*ms, "merge", "--config", str(spec), "--threads", str(args.threads), "--out", str(out)], env)
            best = got if best is None or got[0] < best[0] else best
            shutil.rmtree(out, ignore_errors=True)
        return best

    results = {"task_arithmetic (dense copies)": merge("ta-dense", "task_arithmetic", dense, {}),
               "task_arithmetic (adapters)": merge("ta-lora", "task_arithmetic", adapters, {})}
    if not args.no_native:  # helper methods of other work: timed when this build has them
        for method, params in NATIVE:
            try:
                results[f"{method} (adapters)"] = merge(method, method, adapters, params)
            except RuntimeError as e:
                why = "not in this build's methods" if "unknown merge method" in str(e) else f"failed\n{str(e)[-1500:]}"
                print(f"{method}: {why}; skipped")
    dw, dr = results["task_arithmetic (dense copies)"]
    print(f"\n{'merge':34s} {'wall s':>8s} {'x dense':>8s} {'peak RSS MB':>12s} {'x dense':>8s}")
    for tag, (w, r) in results.items():
        print(f"{tag:34s} {w:8.1f} {w / dw:8.2f} {r:12.0f} {r / dr:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
