"""PLeaS for decoder-only transformers: the algorithm behind :mod:`mergesweep.merge.methods.pleas`.

Pieces (see the method's docstring for the formulas and the deviations from the authors' code):

* :func:`ridge_toward` - the closed-form least squares ``min_W ||X W^T - Y||^2 + lam ||W - W0||^2``
  from ``G = X^T X`` and ``C = X^T Y`` (the RegMean solver; a singular ``G`` never gives NaN);
* :func:`select_units` - partial matching of one MLP layer: which matched pairs are merged, which
  units of each model are kept separately, at a given width and budget ratio;
* :func:`pleas_merge` - the whole method: align model B onto model A (residual stream, attention
  heads, MLP units) with :mod:`mergesweep.align`, build the merged model at the new MLP width, then
  fit every linear layer, block by block, with :class:`mergesweep.stats.blocks.BlockRunner`.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mergesweep.errors import ConfigError, MergeError

log = logging.getLogger(__name__)

#: the linear layers of a decoder block, fitted in this order; a stage's inputs depend only on the
#: stages before it (q/k/v read the attention norm, o reads the attention output, gate/up read the
#: MLP norm, down reads act(gate) * up)
STAGES = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
MLP_ROWS = ("mlp.gate_proj", "mlp.up_proj")  # output rows are MLP units
MLP_COLS = "mlp.down_proj"  # input columns are MLP units


# --------------------------------------------------------------------------------------------
# least squares
# --------------------------------------------------------------------------------------------
def ridge_toward(G: torch.Tensor, C: torch.Tensor, W0: torch.Tensor, lam: float) -> torch.Tensor:
    """``argmin_W ||X W^T - Y||^2 + lam ||W - W0||^2`` from ``G = X^T X`` [d, d], ``C = X^T Y`` [d, o].

    ``W0`` is [o, d]. Closed form ``W = W0 + (C^T - W0 G) (G + lam I)^-1``, solved by the RegMean
    solver's float64 Cholesky (:func:`mergesweep.merge.methods._regmean._solve_spd`); with
    ``lam = 0`` (or a failed factorisation) by its eigen pseudo-inverse, i.e. the least-squares
    solution closest to ``W0`` (directions the data do not determine stay at ``W0``: never NaN).
    Returns ``W`` [o, d] in float64.
    """
    from mergesweep.merge.methods._regmean import _solve_spd

    G = G.to(torch.float64)
    W0 = W0.to(torch.float64)
    S = G.clone()
    if lam > 0:
        S.diagonal().add_(float(lam))
    rhs = C.to(torch.float64).T - W0 @ G
    return W0 + _solve_spd(S, rhs, cholesky=lam > 0)


def residual(G: torch.Tensor, C: torch.Tensor, yy: float, W: torch.Tensor) -> float:
    """``||X W^T - Y||^2 = tr(W G W^T) - 2 tr(W C) + ||Y||^2`` (float64, from the sums)."""
    Wt = W.to(torch.float64).T
    val = float((Wt * (G @ Wt)).sum() - 2.0 * (Wt * C).sum() + yy)
    return max(val, 0.0)


class _Fit:
    """Streaming sums for one linear layer's least squares: ``G = X^T X``, ``C = X^T Y``, ``||Y||^2``.

    With a bias the inputs get a constant 1 column (the bias is the last column of ``W``)."""

    def __init__(self, d_in: int, d_out: int, bias: bool, device):
        d = d_in + int(bias)
        self.bias = bias
        self.G = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.C = torch.zeros(d, d_out, dtype=torch.float64, device=device)
        self.yy = 0.0
        self.n = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.to(torch.float64)
        if self.bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
        y = y.to(torch.float64)
        self.G.addmm_(x.T, x)
        self.C.addmm_(x.T, y)
        self.yy += float((y * y).sum())
        self.n += x.shape[0]


def _weight_of(lin: torch.nn.Linear) -> torch.Tensor:
    """``[W | b]`` ([out, in (+1)]) of a linear layer, float64."""
    w = lin.weight.detach().to(torch.float64)
    if lin.bias is not None:
        w = torch.cat([w, lin.bias.detach().to(torch.float64)[:, None]], 1)
    return w


def _set_weight(lin: torch.nn.Linear, w: torch.Tensor) -> None:
    with torch.no_grad():
        if lin.bias is not None:
            lin.weight.copy_(w[:, :-1].to(lin.weight.dtype))
            lin.bias.copy_(w[:, -1].to(lin.bias.dtype))
        else:
            lin.weight.copy_(w.to(lin.weight.dtype))


# --------------------------------------------------------------------------------------------
# partial matching
# --------------------------------------------------------------------------------------------
def split_width(width_units: int, budget_ratio: float) -> tuple[int, int]:
    """``(n_merge, n_sep)`` for a merged layer of ``width_units`` units: ``n_sep`` units kept from
    each model, ``n_merge`` merged pairs, ``n_merge + 2 n_sep = width_units``,
    ``n_sep = floor(budget_ratio * width_units / (1 + budget_ratio))`` (at the authors' width
    ``(1 + r) I`` this is their ``r I`` separate units)."""
    n_sep = int(math.floor(budget_ratio * width_units / (1.0 + budget_ratio) + 1e-9))
    return width_units - 2 * n_sep, n_sep


def select_units(corr: torch.Tensor, imp_a: torch.Tensor, imp_b: torch.Tensor, width_units: int,
                 budget_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial matching of one layer whose unit ``k`` of model A is matched with unit ``k`` of
    (aligned) model B, ``corr[k]`` their activation correlation.

    Returns sorted index tensors ``(merged, sep_a, sep_b)``: the ``n_merge`` pairs of highest
    correlation are merged (ties: lower index first); of the remaining units, each model keeps its
    ``n_sep`` most important ones (``imp``: the unit's output energy); the rest are dropped.
    """
    n = corr.numel()
    if not 1 <= width_units <= n:
        raise ValueError(f"width {width_units} outside [1, {n}]")
    n_merge, n_sep = split_width(width_units, budget_ratio)
    order = torch.sort(-corr.to(torch.float64), stable=True).indices
    merged = torch.sort(order[:n_merge]).values
    rest = order[n_merge:]

    def top(imp):
        pick = torch.sort(-imp.to(torch.float64)[rest], stable=True).indices[:n_sep]
        return torch.sort(rest[pick]).values

    return merged, top(imp_a), top(imp_b)


class _UnitStats:
    """Per-unit sums over tokens for the Pearson correlation of matched units and their energy."""

    def __init__(self, n: int, device):
        z = lambda: torch.zeros(n, dtype=torch.float64, device=device)  # noqa: E731
        self.sx, self.sy, self.sxx, self.syy, self.sxy = z(), z(), z(), z(), z()
        self.n = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.to(torch.float64), y.to(torch.float64)
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.sxx += (x * x).sum(0)
        self.syy += (y * y).sum(0)
        self.sxy += (x * y).sum(0)

    def corr(self) -> torch.Tensor:
        n = max(self.n, 1)
        mx, my = self.sx / n, self.sy / n
        cov = self.sxy / n - mx * my
        sd = ((self.sxx / n - mx * mx).clamp_min(0) * (self.syy / n - my * my).clamp_min(0)).sqrt()
        return torch.where(sd > 1e-12, cov / sd.clamp_min(1e-30), torch.zeros_like(cov))

    def rms(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(self.n, 1)
        return (self.sxx / n).sqrt(), (self.syy / n).sqrt()


# --------------------------------------------------------------------------------------------
# the method
# --------------------------------------------------------------------------------------------
def _merge_error(e: Exception) -> MergeError:
    return MergeError(f"pleas: {e}")


def _check_models(experts: list[Path]):
    """(configs, ArchSpec of model A); MergeError naming the files when PLeaS cannot merge them."""
    from mergesweep.align.spec import AlignError, arch_spec, check_compatible
    from mergesweep.checkpoints.layout import CheckpointReader
    from mergesweep.stats.blocks import SUPPORTED_MODEL_TYPES

    readers = [CheckpointReader(p, f"expert {i}") for i, p in enumerate(experts)]
    try:
        cfgs = [dict(r.config) for r in readers]
        keys = readers[0].keys()
    finally:
        for r in readers:
            r.close()
    specs = []
    for p, cfg in zip(experts, cfgs):
        where = str(Path(p) / "config.json")
        if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
            raise MergeError(f"{where}: model_type {cfg.get('model_type')!r} is not supported by pleas (it runs "
                             f"the models block by block: {', '.join(SUPPORTED_MODEL_TYPES)})")
        try:
            specs.append(arch_spec(cfg, where=where))
        except AlignError as e:
            raise _merge_error(e) from None
    try:
        check_compatible(specs[1], specs[0], str(experts[1]), str(experts[0]))
    except AlignError as e:
        raise MergeError(f"pleas: {e}; PLeaS changes only the MLP width, every other size must agree") from None
    if specs[0].tied != specs[1].tied:
        raise MergeError(f"pleas: {experts[0]} {'ties' if specs[0].tied else 'does not tie'} lm_head to the input "
                         f"embeddings and {experts[1]} {'does' if specs[1].tied else 'does not'} "
                         "(tie_word_embeddings); the merged head would be neither model's")
    return cfgs, specs[0], keys


def _calibration_batches(inputs, tokenizer):
    from mergesweep.align.data import read_texts, tokenize_batches
    from mergesweep.align.spec import AlignError
    from mergesweep.merge.settings import CALIBRATION_DEFAULTS

    settings = {**CALIBRATION_DEFAULTS, **(inputs.calibration_settings or {})}
    texts: list[str] = []
    for i, path in enumerate(inputs.calibration):
        if path is None:
            raise MergeError(f"pleas: expert {i} ({inputs.experts[i]}) has no calibration data; PLeaS reads "
                             "both experts' calibration sets")
        try:
            texts += read_texts(path, max_examples=int(settings["examples"]))
        except AlignError as e:
            raise _merge_error(e) from None
    try:
        batches = tokenize_batches(tokenizer, texts, int(settings["batch_size"]), int(settings["max_length"]))
    except AlignError as e:
        raise _merge_error(e) from None
    return batches, settings


def _check_tokenizers(experts: list[Path]):
    from mergesweep.align.data import load_tokenizer
    from mergesweep.align.spec import AlignError

    try:
        tok = load_tokenizer(experts[0])
    except AlignError as e:
        raise _merge_error(e) from None
    try:
        other = load_tokenizer(experts[1])
    except AlignError:
        other = None  # no tokenizer files: the vocabulary size was checked with the configs
    if other is not None and other.get_vocab() != tok.get_vocab():
        raise MergeError(f"pleas: {experts[0]} and {experts[1]} have different tokenizers (vocabularies); the "
                         "merged embeddings average rows by token id, which needs one vocabulary")
    return tok


def _align(p: dict, spec, model_a, model_b, batches, progress: bool):
    """The permutation map of model B onto model A (residual, heads, value dims, MLP units)."""
    if p["matching"] == "activation":
        from mergesweep.align.activation_matching import activation_matching

        return activation_matching(spec, model_a, model_b, batches, progress=progress).perm_map
    from mergesweep.align.weight_matching import weight_matching

    sa = {k: v.detach() for k, v in model_a.state_dict().items()}
    sb = {k: v.detach() for k, v in model_b.state_dict().items()}
    return weight_matching(spec, sa, sb, seed=int(p["seed"]), progress=progress,
                           threads=torch.get_num_threads()).perm_map


def _layer_linears(layer: torch.nn.Module, where: str) -> dict[str, torch.nn.Linear]:
    lins = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    known = {n for st in STAGES for n in st}
    if set(lins) != known:
        raise MergeError(f"pleas: {where} has linear layers {sorted(lins)}; expected {sorted(known)} (separate "
                         "q/k/v/o and gate/up/down projections)")
    return lins


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def pleas_merge(inputs):
    """Run PLeaS on ``inputs`` (:class:`mergesweep.merge.whole.WholeModelInputs`), return a
    :class:`mergesweep.merge.whole.WholeModelResult`."""
    from mergesweep.align.apply import permute_state_dict
    from mergesweep.align.data import load_causal_lm
    from mergesweep.align.spec import AlignError
    from mergesweep.merge.whole import WholeModelResult
    from mergesweep.stats.blocks import BlockRunner

    t0 = time.perf_counter()
    p = dict(inputs.params)
    if len(inputs.experts) != 2:
        raise ConfigError(f"experts: method 'pleas' takes 2 experts, got {len(inputs.experts)}")
    width = p.get("width", 1.0)
    if not (isinstance(width, (int, float)) and 0 < width <= 1):
        raise ConfigError(f"params.width: {width!r} is out of range (0, 1]")
    budget_ratio = float(p.get("budget_ratio", 0.0))
    if not 0 <= budget_ratio <= 1:
        raise ConfigError(f"params.budget_ratio: {budget_ratio!r} is out of range [0, 1]")
    ridge = float(p.get("ridge", 1e-3))
    p.setdefault("matching", "activation")
    p.setdefault("seed", inputs.seed)
    experts = [Path(e) for e in inputs.experts]
    device = torch.device(inputs.device)
    progress = sys.stderr.isatty()

    cfgs, spec, ref_keys = _check_models(experts)
    I = spec.intermediate
    m = max(1, int(round(float(width) * I)))
    tok = _check_tokenizers(experts)
    batches, settings = _calibration_batches(inputs, tok)
    n_tokens = sum(int(mk.sum()) for _, mk in batches)
    torch.manual_seed(int(p["seed"]))

    try:
        model_a, model_b = load_causal_lm(experts[0]), load_causal_lm(experts[1])
    except AlignError as e:
        raise _merge_error(e) from None
    # 1. align B onto A (on the CPU, where mergesweep.align accumulates its statistics)
    with torch.no_grad():
        pm = _align(p, spec, model_a, model_b, batches, progress)
        sd_b = permute_state_dict({k: v.detach() for k, v in model_b.state_dict().items()}, pm, cfgs[1])
        model_b.load_state_dict(sd_b, strict=True)
    del sd_b
    model_a.to(device)
    model_b.to(device)

    # 2. the merged model: A's architecture at MLP width m, every tensor the average of A and P(B)
    #    (MLP tensors are set per layer once the partial matching of that layer is known)
    from transformers import AutoModelForCausalLM

    cfg_m = copy.deepcopy(model_a.config)
    cfg_m.intermediate_size = m
    merged = AutoModelForCausalLM.from_config(cfg_m, dtype=torch.float32).to(device).eval()
    sa, sb = model_a.state_dict(), model_b.state_dict()
    init = {}
    for k, v in merged.state_dict().items():
        if ".mlp." in k:
            init[k] = torch.zeros_like(v)
        elif k in sa and k in sb and sa[k].shape == v.shape:
            init[k] = (sa[k].to(torch.float32) + sb[k].to(torch.float32)) / 2
        else:
            raise MergeError(f"pleas: tensor '{k}' of the merged model has no counterpart in {experts[0]} and "
                             f"{experts[1]}")
    merged.load_state_dict(init, strict=True)
    del init

    runners = [BlockRunner(model_a), BlockRunner(model_b), BlockRunner(merged)]
    dev_batches = [(ids.to(device), mk.to(device)) for ids, mk in batches]
    with torch.no_grad():
        hidden = [[r.embed(ids) for ids, _ in dev_batches] for r in runners]

    layers_info = []
    n_merge_total = 0
    for l in tqdm(range(spec.num_layers), desc="pleas layers", unit="layer", disable=None, leave=False):
        lin = [_layer_linears(r.layers[l], f"layer {l} of {e}")
               for r, e in zip(runners, experts + ["the merged model"])]
        prefix = f"model.layers.{l}"
        fits_info: dict[str, dict] = {}
        sel = None
        for si, stage in enumerate(STAGES):
            fits = {n: _Fit(lin[2][n].in_features, lin[2][n].out_features, lin[2][n].bias is not None, device)
                    for n in stage}
            ustats = _UnitStats(I, device) if si == 0 else None
            last = si == len(STAGES) - 1
            nxt: list[list] = [[], []]
            for b, (_ids, mask) in enumerate(dev_batches):
                outs, caps = [], []
                with torch.no_grad():
                    for j, r in enumerate(runners):
                        with r.capture_linear_inputs(r.layers[l], mask, gram=False, keep_inputs=True,
                                                     prefix=prefix) as cap:
                            outs.append(r.run_block(l, hidden[j][b]))
                        caps.append(cap.inputs)
                    for n in stage:
                        key = f"{prefix}.{n}.weight"
                        ya = torch.nn.functional.linear(caps[0][key][-1], lin[0][n].weight, lin[0][n].bias)
                        yb = torch.nn.functional.linear(caps[1][key][-1], lin[1][n].weight, lin[1][n].bias)
                        if n in MLP_ROWS:
                            mg, s_a, s_b = sel
                            y = torch.cat([(ya[:, mg] + yb[:, mg]) / 2, ya[:, s_a], yb[:, s_b]], 1)
                        else:
                            y = (ya + yb) / 2
                        fits[n].add(caps[2][key][-1], y)
                    if ustats is not None:
                        key = f"{prefix}.{MLP_COLS}.weight"
                        ustats.add(caps[0][key][-1], caps[1][key][-1])
                if last:
                    nxt[0].append(outs[0])
                    nxt[1].append(outs[1])
                del outs, caps
            for n, f in fits.items():
                if f.n == 0:
                    raise MergeError("pleas: the calibration data gave no tokens")
                w0 = _weight_of(lin[2][n])
                lam = ridge * float(f.G.diagonal()[: lin[2][n].in_features].mean())
                w = ridge_toward(f.G, f.C, w0, lam)
                if not torch.isfinite(w).all():
                    raise MergeError(f"pleas: the least squares of '{prefix}.{n}.weight' is not finite "
                                     f"(ridge {ridge}); raise params.ridge")
                yy = max(f.yy, 1e-300)
                fits_info[n] = {"before": _round(residual(f.G, f.C, f.yy, w0) / yy),
                                "after": _round(residual(f.G, f.C, f.yy, w) / yy), "tokens": f.n}
                _set_weight(lin[2][n], w)
            if ustats is not None:
                # partial matching of this layer's MLP units, then its initial (averaged) weights
                corr = ustats.corr()
                rms_a, rms_b = ustats.rms()
                imp_a = rms_a * _weight_of(lin[0][MLP_COLS])[:, :I].norm(dim=0)
                imp_b = rms_b * _weight_of(lin[1][MLP_COLS])[:, :I].norm(dim=0)
                sel = select_units(corr, imp_a, imp_b, m, budget_ratio)
                _init_mlp(lin, sel)
                mg = sel[0]
                n_merge_total += int(mg.numel())
                mlp_info = {"width": m, "merged": int(mg.numel()), "separate_per_model": int(sel[1].numel()),
                            "fraction_matched": _round(mg.numel() / m),
                            "corr_merged_mean": _round(float(corr[mg].mean())) if mg.numel() else None,
                            "corr_all_mean": _round(float(corr.mean()))}
            if last:
                hidden[0], hidden[1] = nxt
        with torch.no_grad():
            hidden[2] = [runners[2].run_block(l, h) for h in hidden[2]]
        layers_info.append({"layer": l, "mlp": mlp_info, "least_squares": fits_info})
        log.info("pleas layer %d: %d of %d MLP units merged pairs; relative residuals %s", l, mlp_info["merged"], m,
                 ", ".join(f"{n.split('.')[-1]} {v['before']:.3g}->{v['after']:.3g}" for n, v in fits_info.items()))

    head_info = _fit_head(runners, hidden, dev_batches, ridge)

    state = merged.state_dict()
    out = {}
    for k in ref_keys:
        if k not in state:
            raise MergeError(f"pleas: the merged model has no tensor '{k}' (of {experts[0]})")
        out[k] = state[k].detach().to("cpu", torch.float32).clone()
    info = {
        "intermediate_size": {"input": I, "merged": m},
        "fraction_matched": _round(n_merge_total / (m * spec.num_layers)),
        "budget_ratio": budget_ratio,
        "matching": p["matching"],
        "alignment_identity_fraction": _round(pm.identity_fraction()["overall"]),
        "calibration": {"examples_per_expert": int(settings["examples"]), "sequences": sum(len(i) for i, _ in batches),
                        "tokens": n_tokens},
        "layers": layers_info,
        "head": head_info,
        "runtime_s": round(time.perf_counter() - t0, 3),
    }
    config_updates = {"intermediate_size": m} if m != I else {}
    return WholeModelResult(state=out, config_updates=config_updates, info=info)


def _init_mlp(lin, sel) -> None:
    """The merged MLP's initial weights from the partial matching (the authors' partial merge):
    merged rows of gate/up the average of the pair, separate rows the model's own; down_proj
    columns the pair's average, separate columns half the model's own (each model contributes half
    of the merged output)."""
    mg, s_a, s_b = sel
    for n in MLP_ROWS:
        wa, wb = _weight_of(lin[0][n]), _weight_of(lin[1][n])
        _set_weight(lin[2][n], torch.cat([(wa[mg] + wb[mg]) / 2, wa[s_a], wb[s_b]], 0))
    da, db = lin[0][MLP_COLS], lin[1][MLP_COLS]
    wa, wb = da.weight.detach().to(torch.float64), db.weight.detach().to(torch.float64)
    w = torch.cat([(wa[:, mg] + wb[:, mg]) / 2, wa[:, s_a] / 2, wb[:, s_b] / 2], 1)
    if da.bias is not None:
        w = torch.cat([w, ((da.bias + db.bias) / 2).detach().to(torch.float64)[:, None]], 1)
    _set_weight(lin[2][MLP_COLS], w)


def _fit_head(runners, hidden, batches, ridge: float) -> dict:
    """An untied ``lm_head`` is fitted like every linear layer (inputs: the merged model's final
    norm output; targets: the average of both models' logits). A tied head stays the averaged
    embedding (refitting it would change the input embeddings too)."""
    merged = runners[2].model
    if getattr(merged.config, "tie_word_embeddings", False):
        return {"fitted": False, "reason": "tied to the (averaged) input embeddings"}
    heads = [r.model.lm_head for r in runners]
    fit = _Fit(heads[2].in_features, heads[2].out_features, heads[2].bias is not None, hidden[2][0].device)
    with torch.no_grad():
        for b, (_ids, mask) in enumerate(batches):
            sel = mask.bool()
            ya = runners[0].head(hidden[0][b])[sel]
            yb = runners[1].head(hidden[1][b])[sel]
            x = runners[2].decoder.norm(hidden[2][b])[sel]
            fit.add(x, (ya + yb) / 2)
    w0 = _weight_of(heads[2])
    lam = ridge * float(fit.G.diagonal()[: heads[2].in_features].mean())
    w = ridge_toward(fit.G, fit.C, w0, lam)
    if not torch.isfinite(w).all():
        raise MergeError(f"pleas: the least squares of 'lm_head.weight' is not finite (ridge {ridge})")
    yy = max(fit.yy, 1e-300)
    info = {"fitted": True, "before": _round(residual(fit.G, fit.C, fit.yy, w0) / yy),
            "after": _round(residual(fit.G, fit.C, fit.yy, w) / yy)}
    _set_weight(heads[2], w)
    return info
