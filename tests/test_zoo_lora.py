"""The embedded zoo's LoRA experts (``mergesweep finetune --method lora``, ``finetune.method: lora``).

A tiny base is pretrained here (real tokenizer, real Llama, a few steps), then fine-tuned as a LoRA
adapter. What is checked against independent computations:

- the adapter lowers the loss on its training data: HF's own ``labels=`` loss of the base vs of the
  base with the adapter loaded by ``peft.PeftModel.from_pretrained``;
- the adapter is ``ΔW = (alpha/r)·B·A`` on every target module, nonzero on each: the peft-loaded
  model's logits equal those of a dense model whose weights are ``W + (alpha/r)·B·A`` computed
  here from the safetensors file;
- only the adapter was trained: the base directory's files are byte-identical afterwards;
- the record (role, stage, domain, recipe, ``adapter`` entry with the base's uid and fingerprint);
- bad flags: a clear error naming the flag, nothing written;
- config: the default config's expert uids equal those computed from the recipe written out by hand
  (no ``method``/``lora`` in a full fine-tune's recipe), LoRA recipes get other uids.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergesweep.errors import ConfigError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = 2


def _args(module, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(argv)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(train.jsonl of dateformat, base dir): a tiny base with its record, pretrained on arithmetic
    only, so that dateformat is new to it and there is something to learn."""
    from mergesweep.zoo import cli_pretrain, skills

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lora")
    for skill in ("arithmetic", "dateformat"):
        (root / skill).mkdir()
        recs = skills.generate_splits(skill, {"train": 96, "validation": 1, "test": 1}, 0)["train"]
        (root / skill / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    base = root / "base"
    assert cli_pretrain.run(_args(cli_pretrain, [
        "--data-dirs", str(root / "arithmetic"), "--name", "tiny-base", "--uid", "tiny-base@0", "--out", str(base),
        "--hidden", "32", "--layers", str(LAYERS), "--heads", "4", "--kv-heads", "2", "--intermediate", "48",
        "--vocab-size", "300", "--steps", "60", "--lr", "1e-2", "--batch-size", "16", "--threads", "1"])) == 0
    return root / "dateformat" / "train.jsonl", base


def _finetune(tiny, out: Path, *extra: str) -> Path:
    from mergesweep.zoo import cli_finetune

    data, base = tiny
    assert cli_finetune.run(_args(cli_finetune, [
        "--base", str(base), "--data", str(data), "--domain", "dateformat", "--name", "ex-lora",
        "--uid", "ex-lora@1", "--out", str(out), "--batch-size", "8", "--threads", "1", "--device", "cpu",
        *extra])) == 0
    return out


def _digests(path: Path) -> dict[str, str]:
    """sha256 of every file of a directory except the fingerprint cache."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())
            if p.is_file() and p.name != ".mergesweep-sha256"}


def _loss(model, tok, data: Path, n: int = 48) -> float:
    """Mean target-token cross-entropy with HF's own ``labels=`` loss (prompt tokens masked)."""
    losses = []
    with torch.no_grad():
        for line in data.read_text().splitlines()[:n]:
            rec = json.loads(line)
            ids = tok(rec["prompt"] + rec["target"], add_special_tokens=False, return_tensors="pt")["input_ids"]
            n_prompt = len(tok(rec["prompt"], add_special_tokens=False)["input_ids"])
            labels = ids.clone()
            labels[:, :n_prompt] = -100
            losses.append(float(model(input_ids=ids, labels=labels).loss))
    return sum(losses) / len(losses)


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_lora_finetune_writes_a_peft_adapter_that_learns(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from mergesweep.checkpoints.layout import checkpoint_fingerprint
    from mergesweep.record import read_record

    data, base = tiny
    before = _digests(base)
    out = _finetune(tiny, tmp_path / "ex", "--method", "lora", "--steps", "25")
    assert _digests(base) == before, "the base directory changed"

    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "mergesweep.json", "tokenizer.json"} <= files
    assert "model.safetensors" not in files and "README.md" not in files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary siblings left"

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16 and cfg["lora_alpha"] == 32
    # sorted: peft writes a set in string-hash order, which differs between processes
    assert cfg["target_modules"] == sorted(TARGETS)
    assert cfg["base_model_name_or_path"] == "tiny-base"  # the base's model id, not a path

    # ΔW = (alpha/r)·B·A on every target module of every layer, nonzero on each
    state = load_file(out / "adapter_model.safetensors")
    base_state = load_file(base / "model.safetensors")
    scaling = 32 / 16
    dense = {}
    for layer in range(LAYERS):
        for t in TARGETS:
            part = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"model.layers.{layer}.{part}.{t}"
            a = state.pop(f"base_model.model.{name}.lora_A.weight")
            b = state.pop(f"base_model.model.{name}.lora_B.weight")
            w = base_state[f"{name}.weight"]
            assert a.shape == (16, w.shape[1]) and b.shape == (w.shape[0], 16)
            delta = scaling * b @ a
            assert delta.abs().max() > 0, f"{name}: the adapter did not change it"
            dense[f"{name}.weight"] = w + delta
    assert not state, f"unexpected adapter tensors: {sorted(state)}"

    # peft loads it; it applies exactly W + ΔW; it lowers the training loss
    tok = AutoTokenizer.from_pretrained(out)
    base_loss = _loss(_load(base), tok, data)
    adapted = PeftModel.from_pretrained(_load(base), out).eval()
    lora_loss = _loss(adapted, tok, data)
    assert lora_loss < 0.7 * base_loss, (base_loss, lora_loss)
    manual = _load(base)
    missing, unexpected = manual.load_state_dict(dense, strict=False)
    assert not unexpected
    ids = tok("12+7=19", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=ids).logits, manual(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(adapted(input_ids=ids).logits, _load(base)(input_ids=ids).logits, atol=1e-3)

    rec, base_rec = read_record(out), read_record(base)
    assert (rec.model_id, rec.role, rec.stage, rec.uid, rec.domain, rec.base) == \
        ("ex-lora", "expert", "finetune", "ex-lora@1", "dateformat", "tiny-base")
    assert rec.fingerprint == checkpoint_fingerprint(out)
    recipe = rec.source["recipe"]
    assert recipe["method"] == "lora" and recipe["lr"] == 1e-3 and recipe["steps"] == 25  # lora's default lr
    assert recipe["lora"] == {"r": 16, "alpha": 32.0, "target_modules": TARGETS, "dropout": 0.0}
    assert rec.source["base_uid"] == "tiny-base@0"
    ad = rec.extra["adapter"]
    assert (ad["r"], ad["lora_alpha"], sorted(ad["target_modules"])) == (16, 32, sorted(TARGETS))
    assert ad["modules"] == LAYERS * len(TARGETS)
    assert ad["base_uid"] == base_rec.uid == "tiny-base@0"
    assert ad["base_fingerprint"] == base_rec.fingerprint == checkpoint_fingerprint(base)
    n_lora = sum(16 * (w.shape[0] + w.shape[1]) for w in
                 (base_state[k] for k in dense))  # r·(out + in) per module
    assert rec.extra["train"]["trainable_params"] == n_lora
    assert rec.extra["train"]["loss_last"] < rec.extra["train"]["loss_first"]


def test_lora_rank_alpha_and_targets_are_configurable(tiny, tmp_path):
    out = _finetune(tiny, tmp_path / "ex", "--method", "lora", "--steps", "2", "--lora-r", "4",
                    "--lora-alpha", "8", "--lora-targets", "q_proj,down_proj", "--lora-dropout", "0.1")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"], cfg["lora_dropout"]) == \
        (4, 8, ["down_proj", "q_proj"], 0.1)
    keys = sorted(load_file(out / "adapter_model.safetensors"))
    assert len(keys) == 2 * 2 * LAYERS
    assert all(("q_proj" in k or "down_proj" in k) for k in keys)
    a = load_file(out / "adapter_model.safetensors")["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"]
    assert a.shape == (4, 48)
    from mergesweep.record import read_record

    assert read_record(out).source["recipe"]["lora"] == {"r": 4, "alpha": 8.0,
                                                          "target_modules": ["q_proj", "down_proj"], "dropout": 0.1}


def test_full_finetune_is_unchanged_by_default(tiny, tmp_path):
    """No --method: a dense checkpoint, as before (the record says method full)."""
    from mergesweep.record import read_record

    out = _finetune(tiny, tmp_path / "ex", "--steps", "2")
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    rec = read_record(out)
    assert rec.source["recipe"]["method"] == "full" and rec.source["recipe"]["lr"] == 1e-4
    assert "adapter" not in rec.extra and "lora" not in rec.source["recipe"]


@pytest.mark.parametrize("extra, message", [
    (["--method", "other"], r"^--method: 'other' is not one of full, lora"),
    (["--method", "lora", "--lora-r", "0"], r"^--lora-r: the rank must be a positive integer, got 0"),
    (["--method", "lora", "--lora-r", "-3"], r"^--lora-r: .* got -3"),
    (["--method", "lora", "--lora-alpha", "0"], r"^--lora-alpha: must be > 0"),
    (["--method", "lora", "--lora-dropout", "1"], r"^--lora-dropout: must be in \[0, 1\)"),
    (["--method", "lora", "--lora-targets", "q_proj,,v_proj"], r"^--lora-targets: expected comma-separated"),
    (["--method", "lora", "--lora-targets", "q_proj,q_proj"], r"^--lora-targets: a module name is repeated"),
    (["--method", "lora", "--lora-targets", "q_proj,attn_out"],
     r"^--lora-targets: 'attn_out' is no linear layer of .*base \(its linear layers: down_proj, gate_proj"),
    (["--method", "lora", "--train-embeddings"], r"^--train-embeddings: a LoRA fine-tune trains adapters only"),
    (["--lora-r", "8"], r"^--lora-r: only applies with --method lora"),
    (["--method", "lora", "--lr", "0"], r"^--lr: must be > 0"),
])
def test_bad_lora_flags_name_the_flag(tiny, tmp_path, extra, message):
    from mergesweep.zoo import cli_finetune

    data, base = tiny
    args = _args(cli_finetune, ["--base", str(base), "--data", str(data), "--domain", "arithmetic",
                                "--name", "x", "--out", str(tmp_path / "o"), "--steps", "1", "--threads", "1",
                                *extra])
    with pytest.raises(ConfigError, match=message):
        cli_finetune.run(args)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
# config: recipes and uids
# --------------------------------------------------------------------------------------------
def _default_config() -> dict:
    from mergesweep.config import load_config_file

    return load_config_file(Path(__file__).resolve().parents[1] / "config" / "config.yaml")


def test_default_expert_uids_are_those_of_the_recipes_written_out():
    """The uid of each default expert = definition_uid of the pre-LoRA definition, spelled out here
    literally from config/config.yaml (no method, no lora): the new keys change no uid."""
    from mergesweep.ids import definition_uid
    from mergesweep.plan import build_plan

    cfg = _default_config()
    plan = build_plan(cfg)
    common = {"steps": cfg["finetune"]["steps"], "batch_size": cfg["finetune"]["batch_size"],
              "lr": cfg["finetune"]["lr"], "warmup": 5, "train_embeddings": False}
    assert common == {"steps": 60, "batch_size": 8, "lr": 1e-4, "warmup": 5, "train_embeddings": False}
    data = {"sizes": plan.config["suites"]["sizes"], "seed": cfg.get("seed", 0)}
    for e in cfg["experts"]:
        recipe = {**common, **(e.get("finetune") or {}), "seed": cfg.get("seed", 0)}
        definition = {"skill": e["domain"], "finetune": recipe, "base": plan.base.uid, "data": data}
        got = plan.experts[e["name"]]
        assert got.uid == definition_uid(e["name"], definition), e["name"]
        assert "method" not in got.recipe and "lora" not in got.recipe

    # writing the defaults out changes nothing
    explicit = copy.deepcopy(cfg)
    explicit["finetune"].update(method="full", lora={"r": 4})
    explicit["experts"][1]["finetune"] = {**explicit["experts"][1]["finetune"], "method": "full"}
    plan2 = build_plan(explicit)
    assert {n: c.uid for n, c in plan2.experts.items()} == {n: c.uid for n, c in plan.experts.items()}


def test_lora_recipes_fill_defaults_merge_per_expert_and_get_their_own_uids():
    from mergesweep.plan import build_plan

    cfg = _default_config()
    cfg["merges"] = [m for m in cfg["merges"] if m["method"] == "task_arithmetic"]  # merges adapters stream
    full = {n: c.uid for n, c in build_plan(cfg).experts.items()}
    cfg["finetune"].update(method="lora", lora={"r": 8})
    cfg["experts"][1]["finetune"] = {"steps": 20, "lora": {"alpha": 4, "lr": 5e-3}}
    cfg["experts"][2]["finetune"] = {"steps": 20, "method": "full"}
    plan = build_plan(cfg)
    a, r, d = (plan.experts[e["name"]] for e in cfg["experts"])
    assert a.recipe["method"] == "lora" and a.recipe["lr"] == 1e-3  # lora.lr's default, not finetune.lr
    assert a.recipe["lora"] == {"r": 8, "alpha": 32, "target_modules": TARGETS, "dropout": 0.0}
    assert r.recipe["lora"] == {"r": 8, "alpha": 4, "target_modules": TARGETS, "dropout": 0.0}
    assert r.recipe["lr"] == 5e-3 and r.recipe["steps"] == 20
    assert "method" not in d.recipe and "lora" not in d.recipe
    assert a.uid != full[a.name] and r.uid != full[r.name] and d.uid == full[d.name]
    assert a.adapter and r.adapter and not d.adapter
    # one LoRA setting more or less is another expert
    cfg["finetune"]["lora"]["dropout"] = 0.05
    plan3 = build_plan(cfg)
    assert plan3.experts[a.name].uid != a.uid and plan3.experts[d.name].uid == d.uid


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["finetune"].update(method="qlora"), r"^finetune\.method: 'qlora' is not one of"),
    (lambda c: c["finetune"].update(lora={"r": 0}), r"^finetune\.lora\.r: 0 is less than the minimum of 1"),
    (lambda c: c["finetune"].update(lora={"rank": 4}), r"^finetune\.lora\.rank: unknown key"),
    (lambda c: c["experts"][0].update(finetune={"lora": {"target_modules": []}}),
     r"^experts\[0\]\.finetune\.lora\.target_modules: \[\] should be non-empty"),
    (lambda c: c["experts"][0].update(finetune={"method": "lora", "lr": 1e-3}),
     r"^experts\[0\]\.finetune\.lr: a LoRA fine-tune's learning rate is experts\[0\]\.finetune\.lora\.lr"),
])
def test_bad_lora_config_names_the_key(edit, message):
    from mergesweep.plan import build_plan

    cfg = _default_config()
    edit(cfg)
    with pytest.raises(ConfigError, match=message):
        build_plan(cfg)


def test_the_finetune_rule_passes_the_lora_flags(tmp_path):
    """snakemake -n -p on the tiny preset with LoRA experts: each finetune command carries its
    expert's LoRA settings (per-expert keys merged over the config's), a full expert none."""
    import subprocess
    import sys

    import yaml

    repo = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((repo / "config/presets/tiny.yaml").read_text())
    cfg["merges"] = [m for m in cfg["merges"] if m["method"] == "task_arithmetic"]
    cfg["finetune"].update(method="lora", lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    names = [e["name"] for e in cfg["experts"]]
    cfg["experts"][1]["finetune"] = {"lora": {"lr": 5e-3, "dropout": 0.1}}
    cfg["experts"][2]["finetune"] = {**cfg["experts"][2].get("finetune", {}), "method": "full"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(repo / "Snakefile"), "-n", "-p",
                           "--cores", "2", "--directory", str(tmp_path), "--configfile", str(tmp_path / "cfg.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cmds = {m.group(1): m.group(0) for m in re.finditer(r"finetune --base .*? --name (\S+) .*", proc.stdout)}
    assert sorted(cmds) == sorted(names)
    assert re.search(r" --lr 0\.001 .* --method lora --lora-r 4 --lora-alpha 32\.0 --lora-targets q_proj,v_proj "
                     r"--lora-dropout 0\.0 ", cmds[names[0]]), cmds[names[0]]
    assert re.search(r" --lr 0\.005 .* --method lora --lora-r 4 --lora-alpha 32\.0 --lora-targets q_proj,v_proj "
                     r"--lora-dropout 0\.1 ", cmds[names[1]]), cmds[names[1]]
    assert "--method" not in cmds[names[2]] and "--lora" not in cmds[names[2]]
