"""PEFT LoRA adapters: reading (against peft's own merge), writing (loaded back by peft), the
dense view base + ΔW, and the errors for adapters mergesweep cannot use."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers_merge import make_base, read_state
from mergesweep.checkpoints.layout import CheckpointError, CheckpointReader, checkpoint_fingerprint
from mergesweep.lora.adapter import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, AdapterReader, LoraCheckpoint,
                                     is_adapter, open_checkpoint)
from mergesweep.lora.write import write_adapter
from mergesweep.record import ModelRecord

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, one_torch_thread):
    return make_base(tmp_path_factory.mktemp("lora") / "base")


def _model(base: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def _peft_adapter(base: Path, out: Path, seed: int = 0, **cfg) -> dict[str, torch.Tensor]:
    """An adapter made by peft itself (random A and B); returns peft's merged state dict."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LINEAR, init_lora_weights=False,
                        task_type="CAUSAL_LM", **cfg)
    model = get_peft_model(_model(base), config)
    model.save_pretrained(out)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("cfg", [
    {},
    {"use_rslora": True},
    {"rank_pattern": {"model.layers.1.self_attn.q_proj": 2, "down_proj": 6},
     "alpha_pattern": {"v_proj": 3.0, "model.layers.2.mlp.up_proj": 1.5}},
], ids=["plain", "rslora", "patterns"])
def test_delta_of_a_peft_adapter_is_peft_merged_minus_base(base, tmp_path, cfg):
    merged = _peft_adapter(base, tmp_path / "ad", **cfg)
    state = read_state(base)
    assert is_adapter(tmp_path / "ad") and not is_adapter(base)
    with AdapterReader(tmp_path / "ad") as ad:
        changed = sorted(k for k in state if not torch.equal(state[k], merged[k]))
        assert sorted(ad.modules()) == changed and len(changed) == 3 * len(LINEAR)
        for name in ad.modules():
            torch.testing.assert_close(ad.delta(name), merged[name] - state[name], rtol=0, atol=1e-6)
        if cfg.get("rank_pattern"):
            assert ad.rank("model.layers.1.self_attn.q_proj.weight") == 2
            assert ad.rank("model.layers.0.mlp.down_proj.weight") == 6
            assert ad.rank("model.layers.0.self_attn.q_proj.weight") == 4
            assert ad.scaling("model.layers.0.self_attn.v_proj.weight") == 3.0 / 4
            assert ad.scaling("model.layers.2.mlp.up_proj.weight") == 1.5 / 4
            assert ad.scaling("model.layers.1.mlp.up_proj.weight") == 8 / 4
        if cfg.get("use_rslora"):
            assert ad.scaling(ad.modules()[0]) == pytest.approx(8 / math.sqrt(4))
        s = ad.summary()
        assert s["r"] == 4 and s["lora_alpha"] == 8 and s["modules"] == 21
        assert s["target_modules"] == sorted(LINEAR)
    with AdapterReader(tmp_path / "ad", peft=True) as by_peft:  # peft's own parse reads the same adapter
        assert by_peft.summary() == s
        assert [by_peft.scaling(n) for n in by_peft.modules()] == [ad.scaling(n) for n in ad.modules()]
    with LoraCheckpoint(tmp_path / "ad", base, "expert") as ck:
        assert ck.keys() == CheckpointReader(base).keys()
        for name in ck.keys():
            torch.testing.assert_close(ck.get(name), merged[name], rtol=0, atol=1e-6)
            assert ck.shape(name) == tuple(state[name].shape)


def test_written_adapter_loads_in_peft_and_merges_to_base_plus_delta(base, tmp_path):
    from peft import PeftModel

    g = torch.Generator().manual_seed(3)
    state = read_state(base)
    factors = {}
    for i, name in enumerate(n for n in state if any(f".{m}." in n for m in LINEAR)):
        out, inp = state[name].shape
        r = 2 if "k_proj" in name else 5 if i == 4 else 3
        factors[name] = (torch.randn(out, r, generator=g), torch.randn(r, inp, generator=g) * 0.1)
    rec = ModelRecord(model_id="ad", role="expert", stage="fetch", extra={"adapter": {"r": 3}})
    files = write_adapter(tmp_path / "ad", factors, lora_alpha=6, base_model_name_or_path=str(base),
                          alpha_pattern={"o_proj": 2.0}, record=rec)
    assert files == [ADAPTER_CONFIG, ADAPTER_WEIGHTS, "mergesweep.json"]
    doc = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    assert doc["r"] == 3 and doc["peft_type"] == "LORA" and doc["target_modules"] == sorted(LINEAR)
    assert all(v == 2 for k, v in doc["rank_pattern"].items() if "k_proj" in k) and len(doc["rank_pattern"]) == 4
    model = PeftModel.from_pretrained(_model(base), tmp_path / "ad")
    merged = model.merge_and_unload().state_dict()
    with AdapterReader(tmp_path / "ad") as ad:
        assert sorted(ad.modules()) == sorted(factors)
        for name, t in state.items():
            if name not in factors:
                assert torch.equal(merged[name], t)
                continue
            b, a = factors[name]
            s = (2.0 if "o_proj" in name else 6.0) / a.shape[0]
            torch.testing.assert_close(ad.delta(name), s * (b @ a), rtol=0, atol=1e-5)  # independent formula
            torch.testing.assert_close(merged[name], t + ad.delta(name), rtol=0, atol=1e-5)
            assert ad.rank(name) == a.shape[0]


def test_rslora_and_dtype_round_trip(base, tmp_path):
    from peft import PeftModel

    state = read_state(base)
    name = "model.layers.0.mlp.up_proj.weight"
    out, inp = state[name].shape
    g = torch.Generator().manual_seed(5)
    b, a = torch.randn(out, 4, generator=g).bfloat16(), torch.randn(4, inp, generator=g).bfloat16()
    write_adapter(tmp_path / "ad", {name: (b, a)}, lora_alpha=3, base_model_name_or_path="base", use_rslora=True)
    assert load_file(tmp_path / "ad" / ADAPTER_WEIGHTS)[f"base_model.model.{name[:-7]}.lora_A.weight"].dtype \
        == torch.bfloat16
    merged = PeftModel.from_pretrained(_model(base), tmp_path / "ad").merge_and_unload().state_dict()
    with LoraCheckpoint(tmp_path / "ad", base) as ck:
        want = state[name] + 3 / 2 * (b.float() @ a.float())
        torch.testing.assert_close(ck.get(name), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-4)


def test_config_defaults_are_peft_s():
    """The fields read without importing peft default to what peft.LoraConfig gives them."""
    from peft import LoraConfig

    from mergesweep.lora.adapter import _UNSUPPORTED, LORA_DEFAULTS

    cfg = LoraConfig()
    for key, default in LORA_DEFAULTS.items():
        assert getattr(cfg, key) == default, key
    assert set(_UNSUPPORTED) <= set(LORA_DEFAULTS)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------
def _adapter(base: Path, out: Path, modules=("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"),
             r: int = 2) -> Path:
    state = read_state(base)
    factors = {m: (torch.ones(state[m + ".weight"].shape[0], r), torch.ones(r, state[m + ".weight"].shape[1]))
               for m in modules}
    write_adapter(out, factors, lora_alpha=r, base_model_name_or_path=str(base))
    return out


def _edit_config(path: Path, **changes) -> None:
    doc = json.loads((path / ADAPTER_CONFIG).read_text())
    doc.update(changes)
    (path / ADAPTER_CONFIG).write_text(json.dumps(doc))


def _edit_weights(path: Path, fn) -> None:
    tensors = load_file(path / ADAPTER_WEIGHTS)
    fn(tensors)
    save_file(tensors, str(path / ADAPTER_WEIGHTS))


def test_missing_files_are_named(base, tmp_path):
    ad = _adapter(base, tmp_path / "ad")
    (ad / ADAPTER_CONFIG).unlink()
    with pytest.raises(AdapterError, match=f"{ADAPTER_CONFIG}: missing"):
        AdapterReader(ad)
    ad = _adapter(base, tmp_path / "ad2")
    (ad / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(AdapterError, match=f"{ADAPTER_WEIGHTS}: missing"):
        AdapterReader(ad)


Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop(f"{Q}.lora_B.weight"), r"'model.layers.0.self_attn.q_proj' has lora_A .* but no lora_B"),
    (lambda t: t.update({f"{Q}.lora_B.weight": torch.ones(32, 3)}), "rank mismatch: lora_A .* has 2 rows but lora_B"),
    (lambda t: t.update({f"{Q}.lora_B.weight": torch.ones(32, 3), f"{Q}.lora_A.weight": torch.ones(3, 32)}),
     r"have rank 3 but adapter_config.json says r = 2"),
    (lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(2, 96)}),
     "embed_tokens.lora_embedding_A' is embedding LoRA"),
    (lambda t: t.update({"base_model.model.model.norm.weight": torch.ones(32)}), "model.norm.weight' is a tensor"),
    (lambda t: t.update({f"{Q}.lora_magnitude_vector": torch.ones(32)}), "DoRA"),
], ids=["A-without-B", "rank-A-vs-B", "rank-vs-config", "embedding", "modules-to-save-tensor", "dora-tensor"])
def test_bad_tensors_are_named(base, tmp_path, edit, match):
    ad = _adapter(base, tmp_path / "ad")
    _edit_weights(ad, edit)
    with pytest.raises(AdapterError, match=match) as e:
        AdapterReader(ad)
    assert ADAPTER_WEIGHTS in str(e.value)


@pytest.mark.parametrize("changes, match", [
    ({"modules_to_save": ["lm_head"]}, "'modules_to_save'"),
    ({"use_dora": True}, "'use_dora' = True: DoRA"),
    ({"bias": "all"}, "'bias' = 'all'"),
    ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
    ({"rank_pattern": {"q_proj": 5}}, r"rank 2 but adapter_config.json says rank_pattern\['q_proj'\] = 5"),
    ({"r": "two"}, r"'r' = 'two': expected a positive integer"),
    ({"alpha_pattern": {"q_proj": "x"}}, r"'alpha_pattern' = .*: expected a mapping"),
], ids=["modules_to_save", "dora", "bias", "ia3", "rank_pattern", "r-type", "alpha-type"])
def test_unsupported_config_is_named(base, tmp_path, changes, match):
    ad = _adapter(base, tmp_path / "ad")
    _edit_config(ad, **changes)
    with pytest.raises(AdapterError, match=match) as e:
        AdapterReader(ad)
    assert str(ad) in str(e.value)


def test_check_base_names_module_file_and_base(base, tmp_path):
    other = make_base(tmp_path / "wide", hidden_size=16, intermediate_size=24)
    ad = _adapter(base, tmp_path / "ad")
    with AdapterReader(ad) as r:
        r.check_base(base)
        with pytest.raises(AdapterError, match=r"module 'model.layers.0.self_attn.q_proj': lora_B @ lora_A is "
                                               r"\[32, 32\] but .* in the base .*wide is \[16, 16\]") as e:
            r.check_base(other)
        assert ADAPTER_WEIGHTS in str(e.value)
    shallow = make_base(tmp_path / "shallow", num_hidden_layers=1)
    with pytest.raises(AdapterError, match=r"adapts module 'model.layers.1.mlp.down_proj' but the base .*shallow "
                                           r"has no tensor"):
        LoraCheckpoint(ad, shallow)


def test_open_checkpoint_needs_the_base_and_checks_its_fingerprint(base, tmp_path):
    ad = _adapter(base, tmp_path / "ad")
    with pytest.raises(AdapterError, match=r"expert 0: .*ad is a LoRA adapter: merging it needs the base"):
        open_checkpoint(ad, "expert 0")
    with open_checkpoint(base, "base") as ck:
        assert isinstance(ck, CheckpointReader)
    other = make_base(tmp_path / "other", seed=1)
    rec = ModelRecord(model_id="ad", role="expert", stage="fetch",
                      extra={"adapter": {"base_fingerprint": checkpoint_fingerprint(base)}})
    from mergesweep.record import write_record

    write_record(ad, rec)
    with open_checkpoint(ad, "expert 0", base=base) as ck:
        assert isinstance(ck, LoraCheckpoint) and ck.label == "expert 0"
    with pytest.raises(AdapterError, match=f"fingerprint {checkpoint_fingerprint(base)}.*{other}, has fingerprint "
                                           f"{checkpoint_fingerprint(other)}"):
        open_checkpoint(ad, "expert 0", base=other)


# --------------------------------------------------------------------------------------------
# fetch: hub and local sources accept adapters, checked against the configured base
# --------------------------------------------------------------------------------------------
def _fetched_base(base: Path, root: Path) -> Path:
    from mergesweep.checkpoints.sources import fetch

    out = root / "fetched-base"
    if not out.exists():
        fetch("smol-base", {"type": "local", "path": str(base)}, out, role="base", uid="smol-base@abc")
    return out


def test_local_and_hub_sources_accept_an_adapter_and_record_it(base, tmp_path):
    from test_fetch import COMMIT, make_hub_cache

    from mergesweep.checkpoints.sources import fetch
    from mergesweep.lora.adapter import LoraCheckpoint
    from mergesweep.record import read_record

    fbase = _fetched_base(base, tmp_path)
    ad = _adapter(base, tmp_path / "src")
    _edit_config(ad, base_model_name_or_path="HuggingFaceTB/Smol-Base")
    rec = fetch("ex", {"type": "local", "path": str(ad)}, tmp_path / "ex", role="expert", domain="math",
                base_dir=fbase, base_names=("smol-base", "org/other"))
    got = read_record(tmp_path / "ex")
    assert got.base == "smol-base" and rec.domain == "math"
    info = got.extra["adapter"]
    assert info["r"] == 2 and info["lora_alpha"] == 2 and info["modules"] == 2
    assert info["target_modules"] == ["down_proj", "q_proj"]
    assert info["base_uid"] == "smol-base@abc" and info["base_fingerprint"] == checkpoint_fingerprint(fbase)
    assert got.extra["summary"]["tensors"] == 4
    with LoraCheckpoint(tmp_path / "ex", fbase) as ck:  # the recorded base fingerprint is checked and fits
        torch.testing.assert_close(ck.get("model.layers.0.self_attn.q_proj.weight"),
                                   read_state(base)["model.layers.0.self_attn.q_proj.weight"] + 2.0)  # s·B·A = 1·(1·1 + 1·1)
    make_hub_cache(tmp_path / "hub", "org/ad", ad)
    fetch("hx", {"type": "hub", "repo_id": "org/ad", "revision": COMMIT, "offline": True,
                 "cache_dir": str(tmp_path / "hub")}, tmp_path / "hx", role="expert",
          base_dir=fbase, base_names=("other", "HuggingFaceTB/smol-base"))
    assert read_record(tmp_path / "hx").extra["adapter"]["base_fingerprint"] == checkpoint_fingerprint(fbase)


def test_fetch_refuses_bad_adapters_naming_the_file_and_writes_nothing(base, tmp_path):
    from mergesweep.checkpoints.sources import fetch

    fbase = _fetched_base(base, tmp_path)
    only_weights = _adapter(base, tmp_path / "w")
    (only_weights / ADAPTER_CONFIG).unlink()
    with pytest.raises(AdapterError, match=f"{only_weights}/{ADAPTER_CONFIG}: missing"):
        fetch("a", {"type": "local", "path": str(only_weights)}, tmp_path / "a", role="expert", base_dir=fbase)
    named = _adapter(base, tmp_path / "n")
    _edit_config(named, base_model_name_or_path="meta-llama/Llama-3.2-1B")
    with pytest.raises(AdapterError, match=r"adapter_config.json names base 'meta-llama/Llama-3.2-1B' "
                                           r"\(base_model_name_or_path\) but the configured base is 'smol-base' / "
                                           r"'org/smol' \(base.name / base.hf_id\)"):
        fetch("b", {"type": "local", "path": str(named)}, tmp_path / "b", role="expert", base_dir=fbase,
              base_names=("smol-base", "org/smol"))
    deep = make_base(tmp_path / "deep", num_hidden_layers=4)
    extra = _adapter(deep, tmp_path / "x", modules=("model.layers.3.self_attn.v_proj",))
    with pytest.raises(AdapterError, match=r"adapts module 'model.layers.3.self_attn.v_proj' but the base "
                                           r".*fetched-base has no tensor"):
        fetch("c", {"type": "local", "path": str(extra)}, tmp_path / "c", role="expert", base_dir=fbase,
              base_names=(str(deep),))
    with pytest.raises(CheckpointError, match="is a LoRA adapter .*a base must be a full checkpoint"):
        fetch("d", {"type": "local", "path": str(named)}, tmp_path / "d", role="base")
    for name in "abcd":
        assert not (tmp_path / name).exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}.tmp-")]
