"""RegMean++: RegMean layer by layer, each layer's Gram matrices taken on the *merged* model's inputs.

RegMean merges every linear layer with the Gram matrices of each expert's inputs to it *in that
expert's own model*. RegMean++ takes layer l's inputs from the model being merged instead: the
output of the merged layers 0..l-1 on expert i's data. Block by block, for decoder block l:

    H_i^0    = merged embedding of expert i's calibration tokens (the embedding merged first)
    G_i^{l,j} = sum over expert i's real tokens of x x^T, x the input of linear j when expert i's
               own block l runs on H_i^l (so inside block l, later linears - o_proj, the MLP - see
               inputs produced by expert i's own earlier sub-layers, on top of the merged H_i^l)
    W*_{l,j}  = (sum_i W_i G~_i) (sum_i G~_i)^-1,  G~_i = alpha G_i/N_i + (1 - alpha) diag(G_i/N_i)
    H_i^{l+1} = merged block l applied to H_i^l

with alpha = ``reduce_non_diagonal_ratio``, N_i expert i's token count (the per-token mean, as the
authors' and MergeBench's hooks keep it) and the solve of
:func:`mergesweep.merge.methods._regmean.regmean_solve` (the ``ridge`` regulariser towards the
experts' average; ``ridge: 0`` is the formula exactly). Every other tensor - the embedding (merged
before layer 0, since layer 0's inputs come from it), norms, biases, the final norm and
``lm_head`` - takes the ``fallback``: ``average`` or ``task_arithmetic`` (``theta_0 + lambda
sum_i tau_i``, needs a base), as in ``regmean``.

Calibration: each expert's own JSONL (``calibration_settings``: examples, max_length,
batch_size), tokenised with the base's tokenizer (else the first expert's), right-padded;
padded positions are left out of every Gram. Memory: the experts' models and the merged model
(n + 1 models, float32 on ``device``), the hidden states of every calibration token of every
expert (n x examples x max_length x hidden floats) and the Gram matrices of one block for every
expert (per linear [in, in], float64). Time: every expert's calibration set through two blocks
per layer (its own, then the merged one): about two forward passes per expert.

Paper: Nguyen, Ton-That, Nguyen, "RegMean++: Enhancing Effectiveness and Generalization of
Regression Mean for Model Merging", 2025 (arXiv:2508.03121); code
github.com/nthehai01/RegMean-plusplus (``fusion_bench/method/regmean_plusplus``: each candidate's
layer l runs on its own batches of the merged model's layer l-1 outputs, hooks on its
``nn.Linear`` inputs; the merged layer then advances every candidate's batches), and MergeBench's
LLM port (github.com/uiuctml/MergeBench ``merging/merging_methods/regmean_plusplus.py``, the same
order). Names as ``regmean`` (``reduce_non_diagonal_ratio``, MergeBench's ``--reduction``);
default 0.1, the authors' config (``config/method/regmean_plusplus``) and MergeBench's
``scripts/merge.sh`` for RegMean++.

Departures: the authors merge the (vision) embeddings by averaging and keep the pretrained
model's other non-layer tensors; MergeBench keeps the *base's* embedding and ``lm_head`` and
averages the other non-layer tensors (the final norm). Here every non-linear tensor takes the
fallback, embedding and ``lm_head`` included (``lm_head`` is not solved: its inputs are the final
norm's, after the last block). Both codes average over padded positions too; here real tokens
only. The solve is float64 with the ``ridge`` regulariser (MergeBench: float32 inverse, ``pinv``
when ill-conditioned). Models: the Llama family run block by block
(:class:`mergesweep.stats.blocks.BlockRunner`: Llama, Mistral, Qwen2, Qwen3).
"""

from __future__ import annotations

from typing import Callable, Sequence

from mergesweep.errors import ConfigError, MergeError
from mergesweep.merge.methods._regmean import regmean_params, validate_fallback
from mergesweep.merge.spec import Identity, MethodSpec, Param



def _fallback(base, experts: Sequence, fallback: str, lam: float):
    from mergesweep.merge.methods._parts import combine_task_vectors, weighted_sum

    if fallback == "average":
        return weighted_sum(list(experts), [1.0] * len(experts), True)
    return combine_task_vectors(base, list(experts), [1.0] * len(experts), lam, False)


def merge_layerwise(inputs, observe: Callable | None = None):
    """The RegMean++ merge (``MethodSpec.merge_model``); ``observe(layer, grams, counts)``, when
    given, sees each block's per-expert Gram matrices (``[{weight name: float64 [in, in]}]``) and
    token counts (``[{weight name: int}]``) before they are solved (tests, diagnostics)."""
    import torch
    from tqdm.auto import tqdm

    from mergesweep.align.data import load_causal_lm
    from mergesweep.checkpoints.layout import CheckpointReader
    from mergesweep.merge.methods._regmean import regmean_solve
    from mergesweep.merge.names import layer_index
    from mergesweep.merge.whole import WholeModelResult
    from mergesweep.stats.blocks import BlockRunner

    p = inputs.params
    alpha, ridge, fallback, lam = p["reduce_non_diagonal_ratio"], p["ridge"], p["fallback"], p["lambda"]
    if fallback == "task_arithmetic" and inputs.base is None:
        raise ConfigError("params.fallback: 'task_arithmetic' needs a base model")
    device = inputs.device
    n = len(inputs.experts)
    ref_path = inputs.base if inputs.base is not None else inputs.experts[0]
    ref_label = "base" if inputs.base is not None else f"expert 0 ({inputs.names[0]})"

    with torch.no_grad():
        experts = []
        for i, path in enumerate(inputs.experts):
            m = load_causal_lm(path).to(device)
            m.config.use_cache = False
            experts.append(m)
        merged = load_causal_lm(ref_path).to(device)
        merged.config.use_cache = False
        for m in [merged, *experts]:
            for q in m.parameters():
                q.requires_grad_(False)
        runners = [BlockRunner(m) for m in experts]
        mrun = BlockRunner(merged)
        for i, r in enumerate(runners):
            if r.num_layers != mrun.num_layers:
                raise MergeError(f"expert {i} ({inputs.names[i]}) at {inputs.experts[i]} has {r.num_layers} decoder "
                                 f"layers, the {ref_label} {mrun.num_layers}")
        ex_states = [m.state_dict() for m in experts]
        m_state = merged.state_dict()

        with CheckpointReader(ref_path, ref_label) as ref:
            names = ref.keys()
            floating = {k: ref.is_floating_point(k) for k in names}
        base_reader = CheckpointReader(inputs.base, "base") if fallback == "task_arithmetic" else None
        try:
            def tensors(name):
                out = []
                for i, st in enumerate(ex_states):
                    if name not in st:
                        raise MergeError(f"expert {i} ({inputs.names[i]}) at {inputs.experts[i]} has no tensor "
                                         f"'{name}' (the {ref_label} has)")
                    t = st[name]
                    if name in m_state and tuple(t.shape) != tuple(m_state[name].shape):
                        raise MergeError(f"expert {i} ({inputs.names[i]}) at {inputs.experts[i]}: tensor '{name}' has "
                                         f"shape {list(t.shape)}, the {ref_label}'s {list(m_state[name].shape)}")
                    out.append(t.to(torch.float32))
                return out

            def fallback_of(name):
                b = None
                if base_reader is not None:
                    b = base_reader.get(name).to(device=device, dtype=torch.float32)
                return _fallback(b, tensors(name), fallback, lam)

            def assign(name, value):
                t = m_state[name]
                if tuple(value.shape) != tuple(t.shape):
                    raise MergeError(f"tensor '{name}': merged shape {list(value.shape)}, the {ref_label}'s "
                                     f"{list(t.shape)}")
                t.copy_(value)

            by_layer: dict[int, list[str]] = {}
            outside = []
            for k in names:
                if not floating[k]:
                    continue
                li = layer_index(k)
                (outside if li is None else by_layer.setdefault(li, [])).append(k)
            for k in outside:  # embedding, final norm, lm_head: before layer 0 (the embedding feeds it)
                if k not in m_state:
                    raise MergeError(f"{ref_label}: tensor '{k}' is not part of the loaded model")
                assign(k, fallback_of(k))

            tok = inputs.tokenizer("regmean_plus_plus")
            batches = [inputs.batches(i, tok, device) for i in range(n)]
            hidden = [[mrun.embed(ids) for ids, _ in bs] for bs in batches]
            tokens = [sum(int(mask.sum()) for _, mask in bs) for bs in batches]
            info: dict = {"tokens": dict(zip(inputs.names, tokens)), "layers": []}

            for li in tqdm(range(mrun.num_layers), desc="regmean_plus_plus: layers", leave=False, disable=None):
                grams, counts = [], []
                for i in range(n):
                    layer = runners[i].layers[li]
                    with runners[i].capture_linear_inputs(layer) as cap:
                        for (ids, mask), h in zip(batches[i], hidden[i]):
                            cap.mask = mask
                            runners[i].run_block(li, h)
                            cap.release()
                    grams.append(cap.grams)
                    counts.append(cap.counts)
                if observe is not None:
                    observe(li, grams, counts)
                solved, shift_num, shift_den = 0, 0.0, 0.0
                for k in by_layer.get(li, []):
                    have = [k in g for g in grams]
                    if all(have):
                        ws = tensors(k)
                        w = regmean_solve(ws, [g[k] for g in grams], alpha, ridge, [c[k] for c in counts], name=k)
                        avg = torch.stack(ws).mean(0)
                        shift_num += float((w - avg).pow(2).sum())
                        shift_den += float(avg.pow(2).sum())
                        solved += 1
                    elif any(have):
                        raise MergeError(f"tensor '{k}': a linear layer in some experts' block {li} and not in "
                                         "others (different architectures?)")
                    else:
                        w = fallback_of(k)
                    assign(k, w)
                info["layers"].append({"layer": li, "solved": solved,
                                       "fallback": len(by_layer.get(li, [])) - solved,
                                       "relative_shift_from_average": (shift_num / shift_den) ** 0.5
                                       if shift_den > 0 else 0.0})
                del grams, counts
                if li < mrun.num_layers - 1:
                    hidden = [[mrun.run_block(li, h) for h in hs] for hs in hidden]
            state = {}
            for k in names:
                if floating[k]:
                    state[k] = m_state[k].detach().to("cpu", torch.float32).clone()
                else:
                    with CheckpointReader(ref_path, ref_label) as ref:
                        state[k] = ref.get(k).clone()
        finally:
            if base_reader is not None:
                base_reader.close()
    return WholeModelResult(state=state, info=info)


def _merge(base, experts, p, ctx):
    raise MergeError(f"tensor '{ctx.name}': regmean_plus_plus is a whole-model method (forward passes through the "
                     "merged model on calibration data); it has no per-tensor kernel")



SPEC = MethodSpec(
    name="regmean_plus_plus",
    summary="RegMean layer by layer with each layer's Gram matrices taken on the merged model's hidden states",
    paper="Nguyen et al. 2025, RegMean++: Enhancing Effectiveness and Generalization of Regression Mean for Model "
          "Merging (arXiv:2508.03121)",
    params=regmean_params(
        0.1,
        "alpha: off-diagonal Gram entries are multiplied by it (1: plain RegMean solve); the authors' and "
        "MergeBench's RegMean++ runs use 0.1",
        "tensors other than the blocks' linear weights (embedding, norms, biases, lm_head): the experts' "
        "mean, or task arithmetic base + lambda * sum of task vectors (needs a base)"),
    merge=_merge,
    base="optional",
    min_experts=1,
    validate=validate_fallback,
    merge_model=merge_layerwise,
    deviations="every non-linear tensor (embedding and lm_head included) takes the fallback (MergeBench keeps the "
               "base's embedding and lm_head); Grams over real tokens only, per-token means; float64 solve with "
               "a ridge towards the average; Llama-family decoders",
    doc=__doc__,
    formula="block by block: Grams of each expert's block-l linear inputs on the merged blocks' hidden states "
            "of its data; `(sum_i W_i G~_i)(sum_i G~_i)^-1`; other tensors: `fallback`",
    order_invariant=True,
    identities=(Identity({}, "expert", 1, atol=1e-6),),
)
