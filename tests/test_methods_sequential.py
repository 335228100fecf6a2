"""Methods that look at the whole model: Localize-and-Stitch (dataless: whole-model top-k masks;
with data: trained masks) and RegMean++ (layer-by-layer Gram matrices on the merged model's
hidden states). Tiny real Llama checkpoints with a character tokenizer; each result is checked
against an independent computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers_merge import make_base, make_expert, read_state, write_like
from mergesweep.merge.engine import merge_checkpoints
from mergesweep.merge.methods import REGISTRY
from mergesweep.merge.names import is_embedding, is_lm_head
from mergesweep.merge.spec import resolve_params
from mergesweep.merge.whole import WholeModelInputs


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """The CPU is shared: one torch thread for these tests (tests/conftest.py)."""


CALIB = {"examples": 16, "max_length": 24, "batch_size": 8}


def _texts(skill: str, n: int, seed: int) -> list[str]:
    from mergesweep.align.toy import synthetic_texts

    return synthetic_texts(n, seed=seed, skill=skill)


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _finetune(base: Path, dst: Path, texts: list[str], steps: int, seed: int) -> Path:
    """``base`` trained a few Adam steps on ``texts`` (a real expert of that skill)."""
    from mergesweep.align.data import load_causal_lm, tokenize_batches
    from mergesweep.align.toy import char_tokenizer

    torch.manual_seed(seed)
    model = load_causal_lm(base)
    model.train()
    tok = char_tokenizer()
    batches = tokenize_batches(tok, texts, 8, 24)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for s in range(steps):
        ids, mask = batches[s % len(batches)]
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k in read_state(base)}
    write_like(base, dst, state)
    tok.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny tied Llama with a character tokenizer, two experts fine-tuned on different skills
    (grammar, arithmetic) and each expert's calibration JSONL."""
    from mergesweep.align.toy import char_tokenizer

    root = tmp_path_factory.mktemp("seq")
    base = make_base(root / "base", seed=3)
    char_tokenizer().save_pretrained(base)
    skills = ["grammar", "arithmetic"]
    experts = [_finetune(base, root / f"expert_{s}", _texts(s, 32, 10 + i), 12, 20 + i)
               for i, s in enumerate(skills)]
    calib = [_write_jsonl(root / f"calib_{s}.jsonl", _texts(s, 16, 50 + i)) for i, s in enumerate(skills)]
    return base, experts, calib


# ---------------------------------------------------------------------------------------------
# Localize-and-Stitch
# ---------------------------------------------------------------------------------------------
def _localised_names(state: dict) -> list[str]:
    return [k for k in state if not (is_embedding(k) or is_lm_head(k))]


def _direct_localize_stitch(base: Path, experts: list[Path], sparsity: float) -> dict:
    """Independent reference: per expert the k = floor(sparsity n) largest |tau| over all localised
    tensors (torch.topk indices, distinct magnitudes), stitched by averaging where masks overlap;
    embedding (and head) stay the base's."""
    b = read_state(base)
    names = _localised_names(b)
    flat_b = torch.cat([b[k].reshape(-1) for k in names])
    num = torch.zeros_like(flat_b)
    cnt = torch.zeros_like(flat_b)
    for e in experts:
        s = read_state(e)
        tau = torch.cat([s[k].reshape(-1) for k in names]) - flat_b
        k = int(math.floor(sparsity * tau.numel()))
        idx = torch.topk(tau.abs(), k).indices
        m = torch.zeros_like(tau)
        m[idx] = 1.0
        num += m * tau
        cnt += m
    merged = flat_b + num / torch.clamp(cnt, min=1.0)
    out, off = dict(b), 0
    for k in names:
        n = b[k].numel()
        out[k] = merged[off:off + n].reshape(b[k].shape)
        off += n
    return out


def test_dataless_localize_stitch_is_the_whole_model_topk_stitched_mean(tiny, tmp_path):
    base, experts, _ = tiny
    # a third expert that is a random perturbation, so that masks overlap and differ
    third = make_expert(base, tmp_path / "e3", seed=7, scale=0.01)
    exps = [*experts, third]
    out = tmp_path / "ls"
    rec = merge_checkpoints("localize_stitch", base, exps, {"sparsity": 0.05}, out)
    got = read_state(out)
    want = _direct_localize_stitch(base, exps, 0.05)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-7, rtol=0, msg=k)
    # the masks really overlap (some entries averaged) and really differ from the base elsewhere
    b = read_state(base)
    names = _localised_names(b)
    changed = sum(int((got[k] != b[k]).sum()) for k in names)
    n = sum(b[k].numel() for k in names)
    assert 0.05 * n < changed < 3 * 0.05 * n
    emb = "model.embed_tokens.weight"
    assert torch.equal(got[emb], b[emb])
    assert rec["method"] == "localize_stitch"


def test_dataless_localize_stitch_global_not_per_tensor(tiny, tmp_path):
    """The threshold is one per expert over the whole model: tensors with larger task vectors keep
    more than `sparsity` of their entries (a per-tensor top-k would keep the same fraction)."""
    base, experts, _ = tiny
    b, e = read_state(base), read_state(experts[0])
    big = "model.layers.0.mlp.down_proj.weight"
    scaled = dict(e)
    scaled[big] = b[big] + 50.0 * (e[big] - b[big])
    ex = write_like(experts[0], tmp_path / "scaled", scaled)
    out = tmp_path / "g"
    merge_checkpoints("localize_stitch", base, [ex], {"sparsity": 0.05}, out)
    got = read_state(out)
    frac_big = float((got[big] != b[big]).float().mean())
    assert frac_big > 0.5  # this tensor dominates the global top 5%
    want = _direct_localize_stitch(base, [ex], 0.05)
    torch.testing.assert_close(got[big], want[big], atol=1e-7, rtol=0)


def _tiny_model(base: Path, experts: list[Path], calib: Path, expert: int = 0):
    from mergesweep.align.data import load_causal_lm, read_texts, tokenize_batches
    from mergesweep.align.toy import char_tokenizer

    model = load_causal_lm(base)
    for q in model.parameters():
        q.requires_grad_(False)
    b, e = read_state(base), read_state(experts[expert])
    names = _localised_names(b)
    params = [model.get_parameter(k) for k in names]
    for q in params:
        q.requires_grad_(True)
    base_t = [b[k] for k in names]
    tau = [e[k] - b[k] for k in names]
    batches = tokenize_batches(char_tokenizer(), read_texts(calib, CALIB["examples"]), CALIB["batch_size"],
                               CALIB["max_length"])
    return model, names, params, base_t, tau, batches


def _objective(model, names, base_t, tau, scores, batches, lr, l1) -> float:
    """Independent J(S): functional forward of theta_base + sigmoid(S) tau, the mean over batches
    of the token-mean next-token cross-entropy (labels -100 on padding), plus (l1/lr) sum sigmoid(S)."""
    from torch.func import functional_call

    theta = {k: b + torch.sigmoid(s) * t for k, b, t, s in zip(names, base_t, tau, scores)}
    losses = []
    with torch.no_grad():
        for ids, mask in batches:
            labels = ids.masked_fill(mask == 0, -100)
            losses.append(float(functional_call(model, theta, (), {"input_ids": ids, "attention_mask": mask,
                                                                   "labels": labels}).loss))
    return sum(losses) / len(losses) + (l1 / lr) * sum(float(torch.sigmoid(s).sum()) for s in scores)


def test_data_mode_mask_training_decreases_its_objective(tiny):
    from mergesweep.merge.methods._localize import train_mask

    base, experts, calib = tiny
    model, names, params, base_t, tau, batches = _tiny_model(base, experts, calib[0])
    lr, l1, bias = 3e4, 1e-3, 3.0
    scores, facts = train_mask(model, params, base_t, tau, batches, sparsity=0.05, sigmoid_bias=bias,
                               learning_rate=lr, l1_strength=l1, num_train_epochs=4)
    # the starting point: +bias on the whole-model top 5% of |tau|, -bias elsewhere
    flat = torch.cat([t.abs().reshape(-1) for t in tau])
    k = int(0.05 * flat.numel())
    top = torch.zeros_like(flat)
    top[torch.topk(flat, k).indices] = 1.0
    s0, off = [], 0
    for t in tau:
        s0.append(torch.where(top[off:off + t.numel()].reshape(t.shape) > 0, bias, -bias))
        off += t.numel()
    assert facts["initial_fraction"] == pytest.approx(k / flat.numel())
    j0 = _objective(model, names, base_t, tau, s0, batches, lr, l1)
    j1 = _objective(model, names, base_t, tau, scores, batches, lr, l1)
    assert facts["objective"][0] == pytest.approx(j0, rel=1e-5)
    assert facts["objective"][-1] == pytest.approx(j1, rel=1e-5)
    assert j1 < j0 - 1e-3, (j0, j1)
    # the objective went down at every step (small enough steps)
    assert all(b < a for a, b in zip(facts["objective"], facts["objective"][1:])), facts["objective"]
    # and the mask changed: training is not the identity on the top-k mask
    assert facts["final_fraction"] != facts["initial_fraction"]


def test_data_mode_without_training_equals_dataless(tiny, tmp_path):
    """num_train_epochs 0: the whole-model path's top-k masks are the streamed path's, bit for bit
    up to float rounding (a check of the data path's top-k and stitch)."""
    from mergesweep.merge.methods._localize import merge_model_data

    base, experts, calib = tiny
    spec = REGISTRY["localize_stitch"]
    kp, _ = resolve_params(spec, {"sparsity": 0.05, "dataless": False, "num_train_epochs": 0}, 2)
    assert spec.uses_whole_model(kp)
    res = merge_model_data(WholeModelInputs(base, list(experts), ["g", "a"], kp, list(calib), dict(CALIB),
                                            torch.device("cpu")))
    want = _direct_localize_stitch(base, experts, 0.05)
    assert set(res.state) == set(want)
    for k in want:
        torch.testing.assert_close(res.state[k], want[k], atol=1e-7, rtol=0, msg=k)
    assert res.info["experts"]["g"]["objective"] == []


def test_data_mode_trains_each_experts_mask_on_its_own_data(tiny):
    from mergesweep.merge.methods._localize import merge_model_data

    base, experts, calib = tiny
    spec = REGISTRY["localize_stitch"]
    kp, _ = resolve_params(spec, {"sparsity": 0.05, "dataless": False, "num_train_epochs": 2,
                                  "learning_rate": 3e4}, 2)
    res = merge_model_data(WholeModelInputs(base, list(experts), ["g", "a"], kp, list(calib), dict(CALIB),
                                            torch.device("cpu")))
    for name in ("g", "a"):
        obj = res.info["experts"][name]["objective"]
        assert len(obj) == 3 and obj[-1] < obj[0], (name, obj)
    # each expert's first objective is its own calibration loss at the top-k mask: recomputed here
    model, names, params, base_t, tau, batches = _tiny_model(base, experts, calib[1], expert=1)
    flat = torch.cat([t.abs().reshape(-1) for t in tau])
    thr = torch.topk(flat, int(0.05 * flat.numel())).values.min()
    s0 = [torch.where(t.abs() >= thr, 3.0, -3.0) for t in tau]
    assert res.info["experts"]["a"]["objective"][0] == pytest.approx(
        _objective(model, names, base_t, tau, s0, batches, 3e4, 0.0), rel=1e-5)
    # the result differs from the dataless one (the trained masks are not the top-k masks)
    want = _direct_localize_stitch(base, experts, 0.05)
    assert any(not torch.allclose(res.state[k], want[k]) for k in _localised_names(want))


# ---------------------------------------------------------------------------------------------
# RegMean++
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def same_embedding(tiny, tmp_path_factory):
    """The two skill experts with the base's embedding (tied: and head), different blocks: layer 0's
    inputs are then each expert's own, so RegMean++ and RegMean agree there exactly."""
    base, experts, calib = tiny
    from mergesweep.align.toy import char_tokenizer

    root = tmp_path_factory.mktemp("same_emb")
    emb = "model.embed_tokens.weight"
    b = read_state(base)
    out = []
    for i, e in enumerate(experts):
        s = read_state(e)
        s[emb] = b[emb].clone()
        d = write_like(e, root / f"e{i}", s)
        char_tokenizer().save_pretrained(d)
        out.append(d)
    return base, out, calib


def _inputs(base, experts, calib, params, names=None):
    spec = REGISTRY["regmean_plus_plus"]
    kp, _ = resolve_params(spec, params, len(experts), has_base=base is not None)
    return WholeModelInputs(base, list(experts), names or [f"e{i}" for i in range(len(experts))], kp, list(calib),
                            dict(CALIB), torch.device("cpu"))


def _batches(calib: Path):
    from mergesweep.align.data import read_texts, tokenize_batches
    from mergesweep.align.toy import char_tokenizer

    return tokenize_batches(char_tokenizer(), read_texts(calib, CALIB["examples"]), CALIB["batch_size"],
                            CALIB["max_length"])


def _own_grams(model_dir: Path, calib: Path, layers=(0, 1), replace_input: dict | None = None):
    """Independent Grams: a full transformers forward of one model, forward pre-hooks on every
    nn.Linear of the given layers summing x x^T (float64) over real tokens. ``replace_input``
    {layer: [hidden per batch]} swaps that decoder layer's input hidden states first."""
    from mergesweep.align.data import load_causal_lm

    model = load_causal_lm(model_dir)
    grams, counts, state = {}, {}, {"mask": None, "batch": 0}

    def linear_hook(name):
        def hook(mod, args):
            x = args[0].detach()[state["mask"].bool()].double()
            grams[name] = grams.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    handles = []
    for li in layers:
        for rel, mod in model.model.layers[li].named_modules():
            if isinstance(mod, torch.nn.Linear):
                handles.append(mod.register_forward_pre_hook(linear_hook(f"model.layers.{li}.{rel}.weight")))
    for li, hs in (replace_input or {}).items():
        def swap(mod, args, kwargs, hs=hs):
            h = hs[state["batch"]]
            if args:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}
        handles.append(model.model.layers[li].register_forward_pre_hook(swap, with_kwargs=True))
    with torch.no_grad():
        for b, (ids, mask) in enumerate(_batches(calib)):
            state["mask"], state["batch"] = mask, b
            model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    return grams, counts


def _plain_regmean(ws, grams, counts, alpha):
    """W* = (sum_i W_i G~_i)(sum_i G~_i)^-1, G~ = alpha G/N + (1 - alpha) diag(G/N): numpy float64."""
    import numpy as np

    s, r = 0, 0
    for w, g, c in zip(ws, grams, counts):
        g = g.numpy() / c
        gt = alpha * g + (1 - alpha) * np.diag(np.diag(g))
        s, r = s + gt, r + w.double().numpy() @ gt
    return torch.from_numpy(np.linalg.solve(s.T, r.T).T)


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_regmean_pp_layer0_is_plain_regmean_later_layers_are_not(same_embedding):
    from mergesweep.merge.methods.regmean_plus_plus import merge_layerwise

    base, experts, calib = same_embedding
    seen = {}
    res = merge_layerwise(_inputs(base, experts, calib, {"reduce_non_diagonal_ratio": 0.5, "ridge": 0.0}),
                          observe=lambda li, g, c: seen.setdefault(li, (g, c)))
    own = [_own_grams(e, c) for e, c in zip(experts, calib)]
    states = [read_state(e) for e in experts]
    linears = [k for k in own[0][0]]
    assert len(linears) == 14  # 7 linears in each of layers 0 and 1
    diffs = []
    for k in linears:
        ws = [s[k] for s in states]
        plain = _plain_regmean(ws, [o[0][k] for o in own], [o[1][k] for o in own], 0.5)
        # what RegMean++ solved with the Grams it measured (the solve is RegMean's)
        g, c = seen[int(k.split(".")[2])]
        pp = _plain_regmean(ws, [gi[k] for gi in g], [ci[k] for ci in c], 0.5)
        assert _rel(res.state[k], pp) < 1e-4, k
        if k.startswith("model.layers.0."):
            assert _rel(res.state[k], plain) < 1e-4, k  # same inputs: plain RegMean
        else:
            diffs.append(_rel(res.state[k], plain))
    assert min(diffs) > 1e-3, diffs  # every layer-1 linear differs from plain RegMean
    # the non-linear tensors are averaged (fallback: average)
    for k in ("model.layers.1.input_layernorm.weight", "model.norm.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(res.state[k], (states[0][k] + states[1][k]) / 2, atol=1e-7, rtol=0)
    assert [layer["solved"] for layer in res.info["layers"]] == [7, 7, 7]


def test_regmean_pp_gram_of_a_later_layer_is_taken_on_the_merged_hidden_states(tiny):
    """Layer 1's Grams: expert i's own layer 1 run on the *merged* model's layer-0 output on expert
    i's data, recomputed with a transformers forward of the final merged model and a forward of
    expert i whose layer-1 input is swapped for those hidden states."""
    from mergesweep.align.data import load_causal_lm
    from mergesweep.merge.methods.regmean_plus_plus import merge_layerwise

    base, experts, calib = tiny
    seen = {}
    res = merge_layerwise(_inputs(base, experts, calib, {}),
                          observe=lambda li, g, c: seen.setdefault(li, (g, c)))
    merged = load_causal_lm(base)
    merged.load_state_dict(res.state, strict=False)
    merged.tie_weights()
    for i, (e, c) in enumerate(zip(experts, calib)):
        with torch.no_grad():
            hs = [merged(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
                  for ids, mask in _batches(c)]
        want, counts = _own_grams(e, c, layers=(1,), replace_input={1: hs})
        got_g, got_c = seen[1][0][i], seen[1][1][i]
        assert set(got_g) == set(want)
        for k in want:
            assert got_c[k] == counts[k]
            assert _rel(got_g[k], want[k]) < 1e-5, (i, k)
        # and not the expert's own-model Gram (the inputs really are the merged model's)
        own, _ = _own_grams(e, c, layers=(1,))
        q = "model.layers.1.self_attn.q_proj.weight"
        assert _rel(got_g[q], own[q]) > 1e-3


def test_regmean_pp_one_expert_and_identical_experts_return_the_expert(tiny):
    from mergesweep.merge.methods.regmean_plus_plus import merge_layerwise

    base, experts, calib = tiny
    want = read_state(experts[1])
    for exps, cal in (([experts[1]], [calib[1]]), ([experts[1], experts[1]], [calib[0], calib[1]])):
        res = merge_layerwise(_inputs(None, exps, cal, {"reduce_non_diagonal_ratio": 1.0}))
        assert set(res.state) == set(want)
        for k in want:
            torch.testing.assert_close(res.state[k], want[k], atol=1e-6, rtol=0, msg=k)


def test_regmean_pp_refuses_an_expert_of_another_shape_naming_it(tiny, tmp_path):
    from mergesweep.errors import MergeError
    from mergesweep.merge.methods.regmean_plus_plus import merge_layerwise

    base, experts, calib = tiny
    other = make_base(tmp_path / "wide", seed=5, intermediate_size=40)
    with pytest.raises(MergeError, match=r"wide.*mlp.*shape \[40, 32\]|wide.*mlp.*shape \[32, 40\]"):
        merge_layerwise(_inputs(base, [experts[0], other], calib, {}))


# ---------------------------------------------------------------------------------------------
# through the engine (whole-model path: merge_model on calibration data)
# ---------------------------------------------------------------------------------------------
def test_whole_model_methods_through_merge_checkpoints(tiny, tmp_path):
    from mergesweep.merge.methods.regmean_plus_plus import merge_layerwise

    base, experts, calib = tiny
    cal = {i: c for i, c in enumerate(calib)}
    out = tmp_path / "rpp"
    rec = merge_checkpoints("regmean_plus_plus", base, experts, {"ridge": 1e-6}, out, calibration=cal,
                            calibration_settings=CALIB)
    got = read_state(out)
    direct = merge_layerwise(_inputs(base, experts, calib, {"ridge": 1e-6}))
    assert set(got) == set(direct.state) == set(read_state(base))
    for k in got:
        torch.testing.assert_close(got[k], direct.state[k], atol=0, rtol=0, msg=k)
    assert [layer["solved"] for layer in rec["method_info"]["layers"]] == [7, 7, 7]

    out = tmp_path / "ls"
    rec = merge_checkpoints("localize_stitch", base, experts,
                            {"dataless": False, "sparsity": 0.05, "learning_rate": 3e4, "num_train_epochs": 2},
                            out, calibration=cal, calibration_settings=CALIB)
    info = rec["method_info"]["experts"]
    assert all(v["objective"][-1] < v["objective"][0] for v in info.values()), info
    # without calibration data the data mode is refused, naming the key
    from mergesweep.errors import ConfigError

    with pytest.raises(ConfigError, match="calibration"):
        merge_checkpoints("localize_stitch", base, experts, {"dataless": False}, tmp_path / "x")
