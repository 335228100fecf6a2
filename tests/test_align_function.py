"""Function preservation: a valid permutation leaves the model's logits unchanged; a permutation
that ignores grouped-query attention, rotary embeddings, the value/o_proj coupling or the norm
weights does not (so these tests would catch an implementation that got any of them wrong)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mergesweep.align.apply import permute_state_dict, permute_tensor
from mergesweep.align.permmap import PermMap
from mergesweep.align.spec import arch_spec
from mergesweep.align.toy import tiny_config

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = Path(os.environ.get("MERGESWEEP_SMOLLM2_DIR", REPO / "resources/checkpoints/smollm2-135m-instruct"))
TEXT = (
    "The quick brown fox jumps over the lazy dog. Model merging combines the weights of several "
    "fine-tuned networks into one, without retraining."
)

ARCHS = {
    "llama": dict(attention_bias=True, mlp_bias=True),
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": {},
    "gemma3_text": {},
    "olmo2": {},
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are overhead-bound; one thread is faster (and steadier) on the shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _tiny(model_type: str, seed: int = 0):
    """A tiny GQA model (6 query / 2 kv heads) with every weight, norms included, randomised."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(
        model_type, hidden_size=48, intermediate_size=96, num_attention_heads=6, num_key_value_heads=2,
        head_dim=8, **ARCHS[model_type],
    )
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def _logits(model, state, ids):
    model.load_state_dict(state)
    with torch.no_grad():
        return model(input_ids=ids).logits


def _break_gqa(pm: PermMap) -> PermMap:
    """Swap two query heads that read *different* kv heads (o_proj follows, kv heads do not)."""
    s, t = pm.spec, {k: v.clone() for k, v in pm.tensors.items()}
    q = t["layers.0.q_heads"]
    q[0], q[s.group_size] = q[s.group_size].clone(), q[0].clone()
    return PermMap(s, t, validate=False)


def _rotary_broken_state(state, spec, perm_dims, layers=None):
    """Permute the dimensions inside every query and key head the same way (exact without RoPE)."""
    out = dict(state)
    hd = spec.head_dim
    for l in range(spec.num_layers) if layers is None else layers:
        for proj, nh in (("q_proj", spec.num_heads), ("k_proj", spec.num_kv_heads)):
            idx = (torch.arange(nh)[:, None] * hd + perm_dims).reshape(-1)
            for suffix in ("weight", "bias"):
                key = f"model.layers.{l}.self_attn.{proj}.{suffix}"
                if key in out:
                    out[key] = out[key].index_select(0, idx)
    return out


def _vdims_without_o(state, pm, config):
    """Apply the map everywhere but leave o_proj's columns out of the value-dimension move."""
    out = permute_state_dict(state, pm, config)
    ident = {k: (v if not k.endswith("v_dims") else torch.arange(pm.spec.head_dim).repeat(pm.spec.num_kv_heads, 1))
             for k, v in pm.tensors.items()}
    pm0 = PermMap(pm.spec, ident)
    for k in state:
        if k.endswith("o_proj.weight"):
            out[k] = permute_tensor(k, state[k], pm0, config)
    return out


def _norms_left_out(state, pm, config):
    out = permute_state_dict(state, pm, config)
    for k in state:
        if "norm" in k and state[k].numel() == pm.spec.hidden:
            out[k] = state[k]
    return out


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_random_permutation_preserves_logits_tiny(model_type):
    model = _tiny(model_type)
    config = model.config.to_dict()
    spec = arch_spec(config)
    assert spec.group_size == 3
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(4, config["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, state, ids)
    pm = PermMap.random(spec, seed=1)
    assert pm.identity_fraction()["overall"] < 0.3
    permuted = permute_state_dict(state, pm, config)
    # the weights really moved, and the function did not
    assert not torch.equal(permuted["model.layers.0.mlp.down_proj.weight"], state["model.layers.0.mlp.down_proj.weight"])
    out = _logits(model, permuted, ids)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (out - ref).abs().max()
    # round trip through the inverse restores every tensor bit for bit
    back = permute_state_dict(permuted, pm.inverse(), config)
    assert all(torch.equal(back[k], state[k]) for k in state)

    # each way of getting the structure wrong changes the logits by far more than float noise
    broken = {
        "gqa": permute_state_dict(state, _break_gqa(pm), config),
        "rotary": _rotary_broken_state(permuted, spec, torch.randperm(spec.head_dim, generator=torch.Generator().manual_seed(2))),
        "v_dims_without_o": _vdims_without_o(state, pm, config),
        "norms_left_out": _norms_left_out(state, pm, config),
    }
    for what, st in broken.items():
        diff = (_logits(model, st, ids) - ref).abs().max().item()
        assert diff > 1e-3, f"{model_type}: breaking '{what}' went unnoticed (max |Δlogit| = {diff:.2e})"


def test_tied_embeddings_model_preserved():
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama", tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(4, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, state, ids)
    pm = PermMap.random(arch_spec(cfg.to_dict()), seed=3)
    permuted = permute_state_dict(state, pm, cfg.to_dict())
    assert torch.equal(permuted["lm_head.weight"], permuted["model.embed_tokens.weight"])
    assert torch.allclose(_logits(model, permuted, ids), ref, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def smollm2_model(request):
    """The real SmolLM2-135M (MERGESWEEP_SMOLLM2_DIR, else the session's lazily fetched base)."""
    path = SMOLLM2 if os.environ.get("MERGESWEEP_SMOLLM2_DIR") else request.getfixturevalue("smollm2")
    if not (path / "config.json").exists():
        pytest.skip(f"real SmolLM2-135M checkpoint not found at {path}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    return model, tok


def _layer0_only(state, pm, config, prefix="model.layers.0.self_attn."):
    """Apply ``pm`` to layer 0's attention tensors only (cheap; the rest stays as it is)."""
    out = dict(state)
    for k in state:
        if k.startswith(prefix):
            out[k] = permute_tensor(k, state[k], pm, config)
    return out


def test_random_permutation_preserves_logits_smollm2(smollm2_model):
    """The real SmolLM2-135M (30 layers, 9 query / 3 kv heads, RoPE, tied embeddings) on real text."""
    model, tok = smollm2_model
    config = model.config.to_dict()
    spec = arch_spec(config)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.tied) == (30, 9, 3, 64, True)
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        ref = _logits(model, state, ids)
        scale = ref.abs().max().item()
        assert scale > 5
        pm = PermMap.random(spec, seed=7)
        out = _logits(model, permute_state_dict(state, pm, config), ids)
        # float32: only the summation order inside matmuls changes
        assert (out - ref).abs().max().item() < 1e-4 * scale, (out - ref).abs().max()
        assert torch.equal(out.argmax(-1), ref.argmax(-1))

        # Breaking GQA or rotary handling in a single layer is caught on the real model too.
        # Control: a valid head relabelling of layer 0 alone is exact.
        heads_only = PermMap.identity(spec)
        heads_only.tensors.update({k: v for k, v in pm.tensors.items() if k.startswith("layers.0.") and k != "layers.0.mlp"})
        heads_only._cache.clear()
        ok = _logits(model, _layer0_only(state, heads_only, config), ids)
        assert (ok - ref).abs().max().item() < 1e-4 * scale
        bad_gqa = _logits(model, _layer0_only(state, _break_gqa(heads_only), config), ids)
        rot = _rotary_broken_state(state, spec, torch.randperm(64, generator=torch.Generator().manual_seed(1)), layers=[0])
        bad_rope = _logits(model, rot, ids)
        assert (bad_gqa - ref).abs().max().item() > 1e-2 * scale
        assert (bad_rope - ref).abs().max().item() > 1e-2 * scale
    finally:
        model.load_state_dict(state)
