"""Activation matching (Git Re-Basin): correlate the two models' activations, then assign.

Both models run on the same token batches. At every permutation point the Pearson correlation
between reference unit ``a`` and model unit ``b`` over all (non-padding) tokens,

    corr[a, b] = cov(x_a, y_b) / (σ(x_a) σ(y_b))    (0 where a unit is constant),

is accumulated, and each permutation is the assignment maximising the summed correlation:

* residual: the sum of the correlation matrices of every hidden state (embeddings output, each
  layer's output);
* MLP units of layer ``l``: the input of ``down_proj`` (``act(gate) * up``);
* heads of layer ``l``: query head pairs score ``Σ_d corr(q_ref[j,d], q_mod[j',d])`` (q_proj output,
  before rotary; no permutation inside a head) plus the best within-head assignment of their
  attention outputs (o_proj input); kv head pairs likewise from k_proj and v_proj outputs; the
  GQA-respecting head relabelling is then solved exactly as in weight matching (inner ``g × g``
  assignments, outer ``kv × kv`` assignment);
* value dimensions: per kv head, the assignment of v_proj outputs plus the attention outputs of
  the query heads that read it.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack

import torch
from tqdm.auto import tqdm

from mergesweep.align.lap import assignment_score, solve_lap
from mergesweep.align.permmap import PermMap
from mergesweep.align.spec import AlignError, ArchSpec
from mergesweep.align.weight_matching import MatchResult

log = logging.getLogger(__name__)


class CrossCorrelation:
    """Streaming Pearson cross-correlation between two sets of units (float64 sums)."""

    def __init__(self, d1: int, d2: int):
        self.n = 0
        self.sx = torch.zeros(d1, dtype=torch.float64)
        self.sy = torch.zeros(d2, dtype=torch.float64)
        self.sxx = torch.zeros(d1, dtype=torch.float64)
        self.syy = torch.zeros(d2, dtype=torch.float64)
        self.sxy = torch.zeros(d1, d2, dtype=torch.float64)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """``x``: [N, d1], ``y``: [N, d2] (rows are the same tokens)."""
        x, y = x.to(torch.float64), y.to(torch.float64)
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.sxx += (x * x).sum(0)
        self.syy += (y * y).sum(0)
        self.sxy.addmm_(x.T, y)

    def corr(self) -> torch.Tensor:
        n = max(self.n, 1)
        mx, my = self.sx / n, self.sy / n
        cov = self.sxy / n - torch.outer(mx, my)
        sdx = (self.sxx / n - mx * mx).clamp_min(0).sqrt()
        sdy = (self.syy / n - my * my).clamp_min(0).sqrt()
        den = torch.outer(sdx, sdy)
        out = torch.where(den > 1e-12, cov / den.clamp_min(1e-30), torch.zeros_like(cov))
        return out.to(torch.float32)


def _block_diag_sum(c: torch.Tensor, n1: int, n2: int, hd: int) -> torch.Tensor:
    """``S[j, j'] = Σ_d c[j*hd + d, j'*hd + d]`` (same dimension inside heads)."""
    return torch.diagonal(c.reshape(n1, hd, n2, hd), dim1=1, dim2=3).sum(-1)


class _Recorder:
    """Forward hooks that keep the latest activations at every permutation point of one model."""

    def __init__(self, model, spec: ArchSpec):
        self.acts: dict[tuple[str, int], torch.Tensor] = {}
        self.model, self.spec = model, spec

    def install(self, stack: ExitStack) -> None:
        layers = self.model.model.layers
        if len(layers) != self.spec.num_layers:
            raise AlignError(f"model has {len(layers)} layers, config says {self.spec.num_layers}")
        for l, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            for name, mod in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj)):
                stack.enter_context(self._out_hook(mod, (name, l)))
            stack.enter_context(self._in_hook(attn.o_proj, ("o", l)))
            stack.enter_context(self._in_hook(mlp.down_proj, ("mlp", l)))

    def _out_hook(self, module, key):
        def hook(_m, _inp, out):
            self.acts[key] = out.detach()

        return _Handle(module.register_forward_hook(hook))

    def _in_hook(self, module, key):
        def hook(_m, inp):
            self.acts[key] = inp[0].detach()

        return _Handle(module.register_forward_pre_hook(hook))


class _Handle:
    def __init__(self, h):
        self.h = h

    def __enter__(self):
        return self.h

    def __exit__(self, *exc):
        self.h.remove()


def activation_matching(spec: ArchSpec, ref_model, model, batches, progress: bool = True) -> MatchResult:
    """Permutations of ``model`` onto ``ref_model`` from activation correlations on ``batches``.

    ``batches``: ``(input_ids, attention_mask)`` pairs (see :func:`mergesweep.align.data.tokenize_batches`).
    """
    t0 = time.perf_counter()
    s = spec
    H, I, hd = s.hidden, s.intermediate, s.head_dim
    nq, nk, g = s.num_heads, s.num_kv_heads, s.group_size
    acc: dict = {("residual", i): CrossCorrelation(H, H) for i in range(s.num_layers + 1)}
    for l in range(s.num_layers):
        acc["q", l] = CrossCorrelation(nq * hd, nq * hd)
        acc["o", l] = CrossCorrelation(nq * hd, nq * hd)
        acc["k", l] = CrossCorrelation(nk * hd, nk * hd)
        acc["v", l] = CrossCorrelation(nk * hd, nk * hd)
        acc["mlp", l] = CrossCorrelation(I, I)
    rec_ref, rec_mod = _Recorder(ref_model, s), _Recorder(model, s)
    n_tokens = 0
    with ExitStack() as stack, torch.no_grad():
        rec_ref.install(stack)
        rec_mod.install(stack)
        for ids, mask in tqdm(batches, desc="activation matching", unit="batch", disable=not progress, leave=False):
            out_r = ref_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            out_m = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            sel = mask.bool()
            n_tokens += int(sel.sum())
            hs_r, hs_m = out_r.hidden_states, out_m.hidden_states
            for i in range(min(len(hs_r), s.num_layers + 1)):
                acc["residual", i].update(hs_r[i][sel], hs_m[i][sel])
            for key, a in rec_ref.acts.items():
                acc[key].update(a[sel], rec_mod.acts[key][sel])
    if n_tokens < 2:
        raise AlignError("activation matching: the data gave fewer than 2 tokens")

    pm = PermMap.identity(s)
    C = sum(acc["residual", i].corr() for i in range(s.num_layers + 1))
    pm.tensors["residual"] = solve_lap(C)
    for l in range(s.num_layers):
        pm.tensors[f"layers.{l}.mlp"] = solve_lap(acc["mlp", l].corr())
        cq, co = acc["q", l].corr(), acc["o", l].corr()
        ck, cv = acc["k", l].corr(), acc["v", l].corr()
        co4 = co.reshape(nq, hd, nq, hd)
        cv4 = cv.reshape(nk, hd, nk, hd)
        Sq = _block_diag_sum(cq, nq, nq, hd)
        Sk = _block_diag_sum(ck, nk, nk, hd)
        for j in range(nq):
            for jj in range(nq):
                sub = co4[j, :, jj, :]
                Sq[j, jj] += assignment_score(sub, solve_lap(sub))
        for a in range(nk):
            for b in range(nk):
                sub = cv4[a, :, b, :]
                Sk[a, b] += assignment_score(sub, solve_lap(sub))
        inner = torch.zeros(nk, nk, dtype=torch.float64)
        sol = {}
        for a in range(nk):
            for b in range(nk):
                sub = Sq[a * g : (a + 1) * g, b * g : (b + 1) * g]
                sol[a, b] = solve_lap(sub)
                inner[a, b] = assignment_score(sub, sol[a, b])
        kv = solve_lap(Sk.to(torch.float64) + inner)
        q = torch.cat([kv[a] * g + sol[a, int(kv[a])] for a in range(nk)])
        vd = []
        for a in range(nk):
            b = int(kv[a])
            Cv = cv4[a, :, b, :].clone()
            for j in range(a * g, (a + 1) * g):
                Cv += co4[j, :, int(q[j]), :]
            vd.append(solve_lap(Cv))
        pm.tensors[f"layers.{l}.q_heads"] = q
        pm.tensors[f"layers.{l}.kv_heads"] = kv
        pm.tensors[f"layers.{l}.v_dims"] = torch.stack(vd)
    pm._cache.clear()
    pm.check()
    pm.meta.update({"method": "activation_matching", "iterations": 1, "n_tokens": n_tokens, "n_batches": len(batches)})
    return MatchResult(pm, 1, 1 + 3 * s.num_layers, True, time.perf_counter() - t0)
