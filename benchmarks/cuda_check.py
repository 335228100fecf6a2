"""CUDA vs CPU check: training, merging and evaluation give the CPU's results on a GPU.

    .venv/bin/python benchmarks/cuda_check.py --work /tmp/cuda-check            # tiny, everything
    .venv/bin/python benchmarks/cuda_check.py --work /tmp/cuda-check --eval \\
        --merge-base resources/checkpoints/smollm2-135m-instruct               # + a SmolLM2 merge

What it does (every CUDA part is skipped, with a message, when torch sees no CUDA device, so the
script also runs on a CPU machine — small sizes make that a matter of seconds):

(a) **training**: a tiny Llama base (the tiny preset's shape, fewer steps) pretrained from the same
    seed on ``cpu`` (fp32), ``cuda`` (fp32) and ``cuda`` with ``--precision auto`` (bf16 autocast
    where supported), then one expert fine-tuned from the CPU base the same three ways; prints the
    loss curves side by side and the largest weight difference to the CPU run. The curves should
    follow each other (fp32 closely, bf16 loosely); bit equality is not expected.
(b) **merge**: the CPU-trained base and experts (or ``--merge-base`` with synthetic experts, base +
    1 % noise) merged by each ``--methods`` on ``cpu`` and ``cuda``; prints the largest absolute
    difference per tensor (worst ``--show`` tensors) and whether every tensor is within float32
    tolerance: ``|cuda - cpu| <= atol + rtol * max|cpu|`` per tensor.
(c) ``--eval``: the first method's CPU merge evaluated with ``mergesweep evaluate`` on the tiny
    suites with ``--device cpu`` and ``--device cuda``; prints both scores per task, split and
    metric: accuracies should be equal, continuous metrics (perplexity) equal to ``--eval-rtol``.

Exit status 0 when every comparison that ran is within tolerance, 1 otherwise. ``--report FILE``
writes everything measured as JSON (for an issue's closing note).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKILLS = ("arithmetic", "reverse")
DEFAULT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "tsv", "model_stock")


def log(msg: str = "") -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def make_data(work: Path, n_train: int, n_eval: int, seed: int) -> dict[str, tuple[Path, Path]]:
    """skill -> (data dir with train.jsonl, tasks dir) for the tiny suites."""
    from mergesweep.zoo.cli_data import make_suite

    out = {}
    for skill in SKILLS:
        d, t = work / "data" / skill, work / "tasks" / skill
        if not (d / "manifest.json").exists():
            make_suite(skill, seed, {"train": n_train, "validation": n_eval, "test": n_eval}, d, t)
        out[skill] = (d, t)
    return out


# --------------------------------------------------------------------------------------------
# (a) training
# --------------------------------------------------------------------------------------------
def variants(other: str | None) -> list[tuple[str, str]]:
    """(device, precision) of the runs to compare; the first is the reference."""
    return [("cpu", "fp32")] + ([(other, "fp32"), (other, "auto")] if other else [])


def run_training(kind: str, make_model, tok, records, tcfg, other: str | None) -> tuple[dict, dict, object]:
    """Train a fresh model per variant; returns (label -> loss curve, label -> summary, the CPU model)."""
    from mergesweep.devices import autocast_dtype, precision_name, resolve_device
    from mergesweep.zoo.train import train

    curves, info, models = {}, {}, {}
    for i, (dev, prec) in enumerate(variants(other)):
        device = resolve_device(dev, "device")
        ac = autocast_dtype(device, prec)
        label = "cpu fp32" if i == 0 else f"{device} {prec}={precision_name(ac)}"
        model = make_model()
        curve: list[float] = []
        t0 = time.perf_counter()
        summary = train(model, tok, records, tcfg, desc=f"{kind} {label}", device=device, autocast=ac,
                        on_step=lambda step, loss: curve.append(loss))
        curves[label] = curve
        info[label] = {"seconds": round(time.perf_counter() - t0, 2), "loss_first": summary["loss_first"],
                       "loss_last": summary["loss_last"], "precision": summary["precision"]}
        models[label] = model
    ref = models["cpu fp32"].state_dict()
    for label, model in models.items():
        sd = model.state_dict()
        diff = max(float((sd[k].float() - ref[k].float()).abs().max()) for k in ref)
        info[label]["max_abs_weight_diff_vs_cpu"] = diff
        info[label]["saved_dtypes"] = sorted({str(t.dtype).replace("torch.", "") for t in sd.values()})
        assert all(t.device.type == "cpu" for t in sd.values()), f"{label}: model not back on the CPU"
    return curves, info, models["cpu fp32"]


def print_curves(title: str, curves: dict[str, list[float]], info: dict, every: int) -> None:
    labels = list(curves)
    log(f"\n{title}: loss per step")
    log("  step " + "".join(f"{lab:>14}" for lab in labels))
    n = len(next(iter(curves.values())))
    for i in list(range(0, n, every)) + ([n - 1] if (n - 1) % every else []):
        log(f"  {i:4d} " + "".join(f"{curves[lab][i]:14.4f}" for lab in labels))
    for lab in labels:
        x = info[lab]
        log(f"  {lab}: loss {x['loss_first']:.4f} -> {x['loss_last']:.4f} in {x['seconds']} s; "
            f"max |w - w_cpu| = {x['max_abs_weight_diff_vs_cpu']:.3g}; weights {', '.join(x['saved_dtypes'])}")


def training_check(args, work: Path, data: dict, other: str | None) -> tuple[dict, Path, list[Path]]:
    import torch
    from transformers import LlamaForCausalLM

    from mergesweep.record import ModelRecord
    from mergesweep.zoo.cli_finetune import save_model
    from mergesweep.zoo.tiny import read_records, tiny_llama_config, train_tokenizer
    from mergesweep.zoo.train import TrainConfig, read_jsonl

    report: dict = {}
    records = read_records([d for d, _ in data.values()])
    tok = train_tokenizer([r["prompt"] + r["target"] for r in records], vocab_size=args.vocab_size)
    cfg = tiny_llama_config(len(tok), hidden=args.hidden, layers=args.layers, heads=8, kv_heads=4,
                            intermediate=2 * args.hidden, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id)

    def fresh():
        torch.manual_seed(args.seed)
        return LlamaForCausalLM(cfg)

    tcfg = TrainConfig(steps=args.pretrain_steps, batch_size=32, lr=3e-3, warmup=10, seed=args.seed,
                       freeze_embeddings=False, loss_on="all")
    curves, info, base_model = run_training("pretrain", fresh, tok, records, tcfg, other)
    print_curves("(a) pretrain", curves, info, args.every)
    report["pretrain"] = {"runs": info, "curves": curves}
    base_dir = work / "models" / "base"
    if base_dir.exists():
        shutil.rmtree(base_dir)
    save_model(base_model, tok, base_dir, ModelRecord(model_id="check-base", role="base", stage="pretrain",
                                                      uid="check-base@0"))

    experts = []
    for i, (skill, (ddir, _)) in enumerate(data.items()):
        recs = read_jsonl(ddir / "train.jsonl")
        ftcfg = TrainConfig(steps=args.finetune_steps, batch_size=32, lr=3e-3, warmup=5, seed=args.seed + i)

        def from_base():
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)

        if i == 0:  # one expert compared across devices; the others trained on the CPU only
            curves, info, model = run_training(f"finetune {skill}", from_base, tok, recs, ftcfg, other)
            print_curves(f"(a) finetune {skill}", curves, info, max(1, args.every // 2))
            report[f"finetune_{skill}"] = {"runs": info, "curves": curves}
        else:
            _, _, model = run_training(f"finetune {skill}", from_base, tok, recs, ftcfg, None)
        edir = work / "models" / skill
        if edir.exists():
            shutil.rmtree(edir)
        save_model(model, tok, edir, ModelRecord(model_id=f"check-{skill}", role="expert", stage="finetune",
                                                 uid=f"check-{skill}@0", domain=skill, base="check-base"))
        experts.append(edir)
    return report, base_dir, experts


# --------------------------------------------------------------------------------------------
# (b) merge
# --------------------------------------------------------------------------------------------
def synthetic_experts(base: Path, work: Path, n: int = 2, scale: float = 0.01) -> list[Path]:
    """``n`` experts = base + seeded noise (``scale`` x each tensor's std), float32, beside ``work``."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = []
    files = sorted(base.glob("*.safetensors"))
    for i in range(n):
        edir = work / "synthetic" / f"expert{i}"
        out.append(edir)
        if (edir / "done").exists():
            continue
        edir.mkdir(parents=True, exist_ok=True)
        for f in base.iterdir():
            if f.is_file() and f.suffix in (".json", ".jinja", ".txt", ".model") and f.name != "mergesweep.json" \
                    and not f.name.endswith(".index.json"):
                shutil.copy(f, edir / f.name)
        g = torch.Generator().manual_seed(1000 + i)
        state = {}
        for fpath in files:
            with safe_open(str(fpath), "pt") as fh:
                for name in fh.keys():
                    t = fh.get_tensor(name).float()
                    std = float(t.std()) if t.numel() > 1 else 1.0
                    state[name] = (t + scale * max(std, 1e-3) * torch.randn(t.shape, generator=g)).contiguous()
        save_file(state, str(edir / "model.safetensors"), metadata={"format": "pt"})
        (edir / "done").write_text("")
        del state
    return out


def compare_checkpoints(ref: Path, other: Path, rtol: float, atol: float) -> list[dict]:
    """Per tensor: max |other - ref|, max |ref|, within tolerance."""
    from safetensors import safe_open

    def tensors(path: Path) -> dict:
        out = {}
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():
                    out[k] = fh.get_tensor(k)
        return out

    a, b = tensors(ref), tensors(other)
    if a.keys() != b.keys():
        raise SystemExit(f"{ref} and {other} hold different tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    rows = []
    for k in sorted(a):
        x, y = a[k].float(), b[k].float()
        diff = float((x - y).abs().max()) if x.numel() else 0.0
        scale = float(x.abs().max()) if x.numel() else 0.0
        rows.append({"tensor": k, "max_abs_diff": diff, "max_abs": scale, "ok": diff <= atol + rtol * scale,
                     "dtype": str(a[k].dtype).replace("torch.", "")})
    return rows


def merge_check(args, work: Path, base: Path, experts: list[Path], other: str | None) -> tuple[dict, bool, dict]:
    import torch

    from mergesweep.merge.engine import merge_checkpoints
    from mergesweep.merge.tuning import tune_malloc

    tune_malloc()
    report, ok, merged = {}, True, {}
    roles = {"cpu": "cpu", **({"other": other} if other else {})}
    if not other:
        log("\n(b) merge: CUDA not available, merging on the CPU only (nothing to compare)")
    for method in args.methods:
        params = {"density": 0.5} if method in ("ties", "dare_ties", "dare_linear", "della", "della_linear") else {}
        outs, times, ids = {}, {}, {}
        for role, dev in roles.items():
            out = work / "merged" / f"{method}-{role}"
            if out.exists():
                shutil.rmtree(out)
            threads = torch.get_num_threads()
            if dev == "cpu":
                torch.set_num_threads(args.threads)
            t0 = time.perf_counter()
            rec = merge_checkpoints(method, base, experts, params, out, device=dev)
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            times[role] = round(time.perf_counter() - t0, 2)
            torch.set_num_threads(threads)
            outs[role], ids[role] = out, rec["model_id"]
            assert rec["device"] == dev, (rec["device"], dev)
        merged[method] = outs["cpu"]
        entry = {"seconds": times, "model_id": ids["cpu"]}
        if "other" in outs:
            assert ids["other"] == ids["cpu"], f"{method}: the device changed the model id"
            rows = compare_checkpoints(outs["cpu"], outs["other"], args.rtol, args.atol)
            bad = [r for r in rows if not r["ok"]]
            worst = sorted(rows, key=lambda r: -r["max_abs_diff"])[: args.show]
            entry.update(max_abs_diff=max(r["max_abs_diff"] for r in rows), tensors=len(rows), outside_tol=len(bad),
                         per_tensor={r["tensor"]: r["max_abs_diff"] for r in rows})
            ok &= not bad
            log(f"\n(b) merge {method}: cpu {times['cpu']} s, {other} {times['other']} s; {len(rows)} tensors, "
                f"max |{other} - cpu| = {entry['max_abs_diff']:.3g}, {len(bad)} outside tolerance "
                f"(atol {args.atol:g} + rtol {args.rtol:g} x max|cpu|) -> {'OK' if not bad else 'FAIL'}")
            log(f"  {'tensor':<60}{'max|diff|':>12}{'max|cpu|':>12}")
            for r in worst + [r for r in bad if r not in worst]:
                log(f"  {r['tensor']:<60}{r['max_abs_diff']:12.3g}{r['max_abs']:12.3g}{'' if r['ok'] else '  FAIL'}")
        else:
            log(f"  {method}: cpu {times['cpu']} s ({ids['cpu']})")
        report[method] = entry
    return report, ok, merged


# --------------------------------------------------------------------------------------------
# (c) evaluation
# --------------------------------------------------------------------------------------------
def eval_check(args, work: Path, model: Path, data: dict, other: str | None) -> tuple[dict, bool]:
    roles = {"cpu": "cpu", **({"other": other} if other else {})}
    if not other:
        log("\n(c) evaluation: CUDA not available, evaluating on the CPU only (nothing to compare)")
    env = {**os.environ, "TQDM_DISABLE": "1"}
    scores: dict[str, dict] = {}
    for role, dev in roles.items():
        for skill, (_, tasks) in data.items():
            out = work / "evals" / role / f"{skill}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "mergesweep.cli", "evaluate", "--model", str(model), "--suite", skill,
                   "--tasks-dir", str(tasks), "--out", str(out), "--device", dev, "--dtype", "float32",
                   "--threads", str(args.threads), "--fail-on-error"]
            if args.eval_limit:
                cmd += ["--limit", str(args.eval_limit)]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"evaluate on {dev} failed:\n{r.stderr[-3000:]}")
            doc = json.loads(out.read_text())
            for row in doc.get("results") or []:
                key = f"{row.get('task')}/{row.get('split')}/{row.get('metric')}/{row.get('filter')}"
                scores.setdefault(key, {})[role] = row.get("value")
            if doc.get("device") != dev:
                raise SystemExit(f"evaluate --device {dev} ran on {doc.get('device')!r}")
            scores.setdefault("_seconds", {})[f"{dev}/{skill}"] = round(time.perf_counter() - t0, 1)
    log(f"\n(c) evaluation of {model.name}: " + " vs ".join(roles.values()))
    ok = True
    for key, vals in scores.items():
        if key == "_seconds":
            continue
        vs = [v for v in vals.values() if v is not None]
        same = len(vs) == len(vals) and all(abs(v - vs[0]) <= args.eval_rtol * max(abs(v), abs(vs[0])) + 1e-12
                                              for v in vs)
        ok &= same
        log(f"  {key:<50}" + "".join(f"{vals.get(r, float('nan')):>14.6g}" for r in roles)
            + ("" if same else "  DIFFERENT"))
    log("  seconds: " + ", ".join(f"{k} {v}" for k, v in scores["_seconds"].items()))
    return scores, ok


# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, help="working directory (default: a temporary one, removed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=800, help="training examples per skill")
    p.add_argument("--eval-size", type=int, default=40, help="validation/test examples per skill")
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--finetune-steps", type=int, default=80)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--every", type=int, default=10, help="print every N-th step of the loss curves")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--merge-base", type=Path,
                   help="merge this checkpoint (e.g. resources/checkpoints/smollm2-135m-instruct) with two "
                        "synthetic experts instead of the tiny trained ones")
    p.add_argument("--rtol", type=float, default=1e-5, help="per tensor, relative to max|cpu| (default 1e-5)")
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument("--show", type=int, default=5, help="tensors shown per merge (largest differences)")
    p.add_argument("--eval", action="store_true", help="(c): evaluate the first method's merge on cpu and cuda")
    p.add_argument("--eval-limit", type=int, help="examples per task (default: all --eval-size)")
    p.add_argument("--eval-rtol", type=float, default=1e-4,
                   help="relative tolerance between devices' scores (accuracy: any flip is a difference)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the CPU runs")
    p.add_argument("--skip-training", action="store_true", help="(a) off: needs --merge-base")
    p.add_argument("--against", default="cuda",
                   help="the device compared with the CPU (default cuda; 'cpu' checks the comparisons themselves "
                        "on a CPU machine: everything must then be identical)")
    p.add_argument("--report", type=Path, help="write the measurements as JSON here")
    args = p.parse_args(argv)
    if args.skip_training and not args.merge_base:
        p.error("--skip-training needs --merge-base")

    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    from mergesweep.devices import device_summary, resolve_device

    torch.set_num_threads(args.threads)
    cuda = resolve_device("auto") != "cpu"
    other = args.against if (cuda or not args.against.startswith("cuda")) else None
    if other:
        other = resolve_device(other, "--against")
    log(f"torch {torch.__version__}; cpu: {device_summary('cpu')}")
    if cuda:
        log(f"cuda: {device_summary('cuda')}; bf16 supported: {torch.cuda.is_bf16_supported()}; "
            f"matmul precision: {torch.get_float32_matmul_precision()}")
    elif other is None:
        log("CUDA not available (or not allocated to this job): the CUDA runs are skipped, the CPU runs check "
            "that the script works")
    tmp = None
    work = args.work
    if work is None:
        tmp = tempfile.mkdtemp(prefix="cuda-check-")
        work = Path(tmp)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict = {"cuda": device_summary("cuda") if cuda else None, "against": other, "torch": torch.__version__,
                    "rtol": args.rtol, "atol": args.atol}
    ok = True
    try:
        data = make_data(work, args.train_size, args.eval_size, args.seed)
        if not args.skip_training:
            report["training"], base, experts = training_check(args, work, data, other)
        if args.merge_base:
            base = args.merge_base.resolve()
            experts = synthetic_experts(base, work)
        report["merge"], merge_ok, merged = merge_check(args, work, base, experts, other)
        ok &= merge_ok
        if args.eval:
            report["evaluation"], eval_ok = eval_check(args, work, merged[args.methods[0]], data, other)
            ok &= eval_ok
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    report["ok"], report["seconds"] = ok, round(time.perf_counter() - t0, 1)
    if args.report:
        args.report.write_text(json.dumps(report, indent=1) + "\n")
    log(f"\n{'OK' if ok else 'FAIL'}: {f'{other} matches the CPU' if other else 'CPU-only run'} "
        f"({report['seconds']} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    sys.exit(main())
