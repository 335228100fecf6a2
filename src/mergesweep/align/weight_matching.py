"""Weight matching (Git Re-Basin, Ainsworth et al. 2023) for decoder-only transformers.

Find the permutations ``P`` (see :mod:`mergesweep.align.permmap`) that maximise the inner product
of the reference's weights with the permuted model's weights::

    J(P) = Σ_tensors ⟨ W_ref , P(W_model) ⟩_F

by coordinate descent: visit the permutation groups (residual; per layer MLP units, attention
heads, value dimensions) in a seeded random order; each visit fixes all other groups and solves
the resulting linear assignment problem exactly (scipy's ``linear_sum_assignment``); a sweep in
which no group improves ends the search. Every step is monotone in ``J``.

Cost matrices are torch matmuls and are kept up to date incrementally: a group is re-solved only
when a neighbouring group changed since its last visit, and when only a few indices of a
neighbour moved the cached cost is corrected with a low-rank update instead of recomputed.

The GQA head step is solved exactly over the whole group of valid head relabellings: for every
pair (new kv slot ``a``, old kv head ``b``) the query heads of the two groups are matched by a
``g × g`` assignment, and the kv heads by an outer ``kv × kv`` assignment over those totals.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from mergesweep.align.apply import tensor_axes
from mergesweep.align.lap import assignment_score, solve_lap
from mergesweep.align.permmap import PermMap
from mergesweep.align.spec import AlignError, ArchSpec

log = logging.getLogger(__name__)

# block -> permutation kind of its non-residual axis
_BLOCK_KIND = {"q": "q", "k": "kv", "v": "v", "o": "o", "gate": "mlp", "up": "mlp", "down": "mlp"}


@dataclass
class MatchResult:
    perm_map: PermMap
    iterations: int
    steps: int
    converged: bool
    runtime_s: float
    history: list[dict] = field(default_factory=list)


class _Layer:
    """One layer's projection weights, laid out so every permutation is a *row* gather.

    Reference blocks ``R`` are stored as in the checkpoint (q/k/v/gate/up ``[n, hidden]``,
    o/down ``[hidden, n]``). Model blocks ``M`` keep, besides those, contiguous transposes where a
    gather would otherwise hit columns: ``oT``/``downT`` (``[n, hidden]``, for the residual step)
    and ``gateT``/``upT`` (``[hidden, I]``, for the MLP step).
    """

    def __init__(self) -> None:
        self.R: dict[str, torch.Tensor] = {}
        self.M: dict[str, torch.Tensor] = {}
        # non-residual 1-D extras (biases, whole-projection q/k norms): kind -> list of (ref, mod)
        self.extras: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def add(self, block: str, ref: torch.Tensor, mod: torch.Tensor) -> None:
        self.R[block] = ref
        self.M[block] = mod
        if block in ("o", "down"):
            self.M[block + "T"] = mod.T.contiguous()
        if block in ("gate", "up"):
            self.M[block + "T"] = mod.T.contiguous()

    def res_rows(self, block: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference as [hidden, n] operand, model as [n, hidden] gatherable rows)."""
        if block in ("o", "down"):
            return self.R[block], self.M[block + "T"]
        return self.R[block].T, self.M[block]

    def extra(self, kind: str, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked extras of one kind as ``[n, c]`` (``[n, 0]`` when none)."""
        ex = self.extras.get(kind)
        if not ex:
            return torch.zeros(width, 0), torch.zeros(width, 0)
        return torch.stack([r for r, _ in ex], 1), torch.stack([m for _, m in ex], 1)


class WeightMatcher:
    """Holds both models' weights (float32) and the current permutations."""

    def __init__(self, spec: ArchSpec, reference: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor]):
        self.spec = s = spec
        H = s.hidden
        self.layers = [_Layer() for _ in range(s.num_layers)]
        self.res_const = torch.zeros(H, H)
        bias_kind = {"q": "q", "k": "kv", "v": "v", "gate": "mlp", "up": "mlp"}
        names = list(reference.keys())
        missing = [n for n in names if n not in model]
        extra = [n for n in model if n not in reference]
        if s.tied:  # a tied lm_head may be stored by one checkpoint and not the other
            missing = [n for n in missing if n != "lm_head.weight"]
            extra = [n for n in extra if n != "lm_head.weight"]
            names = [n for n in names if n in model]
        if missing or extra:
            raise AlignError(f"model lacks tensors {missing[:3]} / has extra tensors {extra[:3]} compared with the reference")
        for name in names:
            r = reference[name].to(torch.float32)
            m = model[name].to(torch.float32)
            if r.shape != m.shape:
                raise AlignError(f"tensor '{name}': shape {tuple(m.shape)} in the model, {tuple(r.shape)} in the reference")
            axes = tensor_axes(name, tuple(r.shape), s)
            kinds = [k for _, k, _ in axes]
            if not axes:
                continue  # never permuted: constant in the objective
            if kinds == ["residual"] and r.dim() == 2:  # embed_tokens / lm_head [V, H]
                self.res_const.addmm_(r.T, m)
                continue
            if kinds == ["residual"]:  # norms, o/down biases
                self.res_const.add_(torch.outer(r, m))
                continue
            layer = axes[0][2] if axes[0][2] is not None else axes[-1][2]
            L = self.layers[layer]
            proj = name.rsplit(".", 2)[-2].replace("_proj", "")
            if r.dim() == 2:
                L.add(proj, r, m)
            else:  # 1-D along a non-residual axis: biases, whole-projection q/k norms
                kind = bias_kind.get(proj) if name.endswith("_proj.bias") else kinds[0]
                L.extras.setdefault(kind, []).append((r, m))
        for i, L in enumerate(self.layers):
            if set(_BLOCK_KIND) - set(L.R):
                raise AlignError(f"layer {i}: missing projection weights {sorted(set(_BLOCK_KIND) - set(L.R))}")
        self.perm = PermMap.identity(s)
        self.rho = [torch.arange(s.head_dim).repeat(s.num_kv_heads, 1) for _ in range(s.num_layers)]
        self._res_cache: list[tuple[dict, torch.Tensor] | None] = [None] * s.num_layers
        self._mlp_cache: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * s.num_layers

    # -- current permutations -------------------------------------------------------------------
    @property
    def res(self) -> torch.Tensor:
        return self.perm.tensors["residual"]

    def _set(self, key: str, value: torch.Tensor) -> None:
        self.perm.tensors[key] = value
        self.perm._cache.clear()

    def _sync_vdims(self, l: int) -> None:
        kv = self.perm.tensors[f"layers.{l}.kv_heads"]
        self._set(f"layers.{l}.v_dims", self.rho[l][kv].clone())

    # -- residual step --------------------------------------------------------------------------
    def _layer_res_cost(self, l: int) -> torch.Tensor:
        """``Σ_blocks R_b^T M_b[rows_b]`` ([hidden, hidden]); low-rank update when few rows moved."""
        L = self.layers[l]
        cur = {b: self.perm.index(k, l) for b, k in _BLOCK_KIND.items()}
        cache = self._res_cache[l]
        if cache is not None:
            used, C = cache
            moved = {b: torch.nonzero(cur[b] != used[b]).flatten() for b in cur}
            n_moved = sum(m.numel() for m in moved.values())
            if n_moved == 0:
                return C
            if n_moved < sum(c.numel() for c in cur.values()) // 3:
                for b, mv in moved.items():
                    if mv.numel():
                        Rt, Mrows = L.res_rows(b)
                        C.addmm_(Rt[:, mv], Mrows[cur[b][mv]] - Mrows[used[b][mv]])
                self._res_cache[l] = (cur, C)
                return C
        C = torch.zeros(self.spec.hidden, self.spec.hidden)
        for b, idx in cur.items():
            Rt, Mrows = L.res_rows(b)
            C.addmm_(Rt, Mrows.index_select(0, idx))
        self._res_cache[l] = (cur, C)
        return C

    def residual_score(self) -> torch.Tensor:
        C = self.res_const.clone()
        for l in range(self.spec.num_layers):
            C += self._layer_res_cost(l)
        return C

    # -- MLP step -------------------------------------------------------------------------------
    def _mlp_terms(self, L: _Layer):
        """(reference operand [I, h], model rows [hidden, I]) for gate, up, down."""
        return ((L.R["gate"], L.M["gateT"]), (L.R["up"], L.M["upT"]), (L.R["down"].T, L.M["down"]))

    def mlp_score(self, l: int) -> torch.Tensor:
        """``Σ_{gate,up,down} ⟨R rows, M rows with columns in P_res⟩`` (+ bias products), [I, I]."""
        L, pi = self.layers[l], self.res
        cache = self._mlp_cache[l]
        if cache is not None:
            used, C = cache
            moved = torch.nonzero(pi != used).flatten()
            if moved.numel() == 0:
                return C
            if moved.numel() < self.spec.hidden // 3:
                for Rop, Mrows in self._mlp_terms(L):
                    C.addmm_(Rop[:, moved], Mrows[pi[moved]] - Mrows[used[moved]])
                self._mlp_cache[l] = (pi.clone(), C)
                return C
        I = self.spec.intermediate
        C = torch.zeros(I, I)
        for Rop, Mrows in self._mlp_terms(L):
            C.addmm_(Rop, Mrows.index_select(0, pi))
        xr, xm = L.extra("mlp", I)
        if xr.shape[1]:
            C.addmm_(xr, xm.T)
        self._mlp_cache[l] = (pi.clone(), C)
        return C

    # -- attention steps ------------------------------------------------------------------------
    def _head_blocks(self, l: int):
        s, L, pi = self.spec, self.layers[l], self.res
        hd, g = s.head_dim, s.group_size
        rho = self.rho[l]
        v_rows = (torch.arange(s.num_kv_heads)[:, None] * hd + rho).reshape(-1)
        o_rows = (torch.arange(s.num_heads)[:, None] * hd + rho[torch.arange(s.num_heads) // g]).reshape(-1)
        Rq, Rk, Rv, Ro = L.R["q"], L.R["k"], L.R["v"], L.R["o"].T
        Mq = L.M["q"][:, pi]
        Mk = L.M["k"][:, pi]
        Mv = L.M["v"][v_rows][:, pi]
        Mo = L.M["oT"][o_rows][:, pi]
        # extras (biases / whole-projection norms) as extra columns, rows moved like their weights
        xq = L.extra("q", s.num_heads * hd)
        xk = L.extra("kv", s.num_kv_heads * hd)
        xv = L.extra("v", s.num_kv_heads * hd)
        cat = lambda a, b: torch.cat([a, b], 1)  # noqa: E731
        Rq, Mq = cat(Rq, xq[0]), cat(Mq, xq[1])
        Rk, Mk = cat(Rk, xk[0]), cat(Mk, xk[1])
        Rv, Mv = cat(Rv, xv[0]), cat(Mv, xv[1][v_rows])
        return Rq, Mq, Rk, Mk, Rv, Mv, Ro, Mo

    def heads_scores(self, l: int):
        """(query-pair score [H_q, H_q], kv-pair score [kv, kv]) with value dims fixed per old head."""
        s = self.spec
        Rq, Mq, Rk, Mk, Rv, Mv, Ro, Mo = self._head_blocks(l)
        nq, nk = s.num_heads, s.num_kv_heads
        Sq = Rq.reshape(nq, -1) @ Mq.reshape(nq, -1).T + Ro.reshape(nq, -1) @ Mo.reshape(nq, -1).T
        Skv = Rk.reshape(nk, -1) @ Mk.reshape(nk, -1).T + Rv.reshape(nk, -1) @ Mv.reshape(nk, -1).T
        return Sq, Skv

    def solve_heads(self, l: int) -> tuple[float, float, torch.Tensor, torch.Tensor]:
        """Exact best GQA-respecting relabelling: (new score, current score, q_heads, kv_heads)."""
        s, g = self.spec, self.spec.group_size
        Sq, Skv = self.heads_scores(l)
        nk = s.num_kv_heads
        inner_val = torch.zeros(nk, nk, dtype=torch.float64)
        inner_sol: dict[tuple[int, int], torch.Tensor] = {}
        for a in range(nk):
            for b in range(nk):
                sub = Sq[a * g : (a + 1) * g, b * g : (b + 1) * g]
                p = solve_lap(sub)
                inner_sol[a, b] = p
                inner_val[a, b] = assignment_score(sub, p)
        total = Skv.to(torch.float64) + inner_val
        kv = solve_lap(total)
        q = torch.cat([kv[a] * g + inner_sol[a, int(kv[a])] for a in range(nk)])

        def score(qp, kvp):
            return assignment_score(Sq, qp) + assignment_score(Skv, kvp)

        cur_q = self.perm.tensors[f"layers.{l}.q_heads"]
        cur_kv = self.perm.tensors[f"layers.{l}.kv_heads"]
        return score(q, kv), score(cur_q, cur_kv), q, kv

    def solve_vdims(self, l: int) -> tuple[float, float, torch.Tensor]:
        """Best permutation inside every value head (o_proj columns move along)."""
        s, L, pi = self.spec, self.layers[l], self.res
        hd, g = s.head_dim, s.group_size
        q = self.perm.tensors[f"layers.{l}.q_heads"]
        kv = self.perm.tensors[f"layers.{l}.kv_heads"]
        Rv, Mv = L.R["v"], L.M["v"][:, pi]
        Ro, Mo = L.R["o"].T, L.M["oT"][:, pi]
        xr, xm = L.extra("v", s.num_kv_heads * hd)
        new_rho = self.rho[l].clone()
        new_score = cur_score = 0.0
        for a in range(s.num_kv_heads):
            b = int(kv[a])
            C = Rv[a * hd : (a + 1) * hd] @ Mv[b * hd : (b + 1) * hd].T
            C += xr[a * hd : (a + 1) * hd] @ xm[b * hd : (b + 1) * hd].T
            for j in range(a * g, (a + 1) * g):
                jj = int(q[j])
                C += Ro[j * hd : (j + 1) * hd] @ Mo[jj * hd : (jj + 1) * hd].T
            p = solve_lap(C)
            new_score += assignment_score(C, p)
            cur_score += assignment_score(C, self.rho[l][b])
            new_rho[b] = p
        return new_score, cur_score, new_rho

    # -- coordinate descent ---------------------------------------------------------------------
    def run(
        self, seed: int = 0, max_iter: int = 100, rtol: float = 1e-7, progress: bool = True, residual_first: bool = True
    ) -> MatchResult:
        """Coordinate descent until a sweep changes nothing (or ``max_iter`` sweeps).

        The order of the groups is a seeded random permutation per sweep, except that the first
        sweep starts with the residual stream when ``residual_first``: its cost has a large term
        that no other permutation touches (embeddings, norms, lm_head), so it is the best-informed
        first step from the identity, and every later group is then solved in the right basis.
        """
        s = self.spec
        t0 = time.perf_counter()
        groups: list[tuple[str, int]] = [("residual", -1)]
        for l in range(s.num_layers):
            groups += [("mlp", l), ("heads", l), ("v_dims", l)]

        def deps(gr):
            kind, l = gr
            if kind == "residual":
                return [g for g in groups if g[0] != "residual"]
            if kind == "mlp":
                return [("residual", -1)]
            other = ("v_dims", l) if kind == "heads" else ("heads", l)
            return [("residual", -1), other]

        dep = {g: deps(g) for g in groups}
        version = {g: 0 for g in groups}
        solved_at: dict = {}
        rng = np.random.default_rng(seed)
        history, steps, converged, it = [], 0, False, 0
        bar = tqdm(total=max_iter, desc="weight matching", unit="sweep", disable=not progress, leave=False)
        for it in range(1, max_iter + 1):
            ts = time.perf_counter()
            changed, solved, gained = [], 0, 0.0
            order = [int(i) for i in rng.permutation(len(groups))]
            if it == 1 and residual_first:  # groups[0] is the residual stream
                order.remove(0)
                order.insert(0, 0)
            for i in order:
                gr = groups[i]
                snap = tuple(version[d] for d in dep[gr])
                if solved_at.get(gr) == snap:
                    continue
                solved_at[gr] = snap
                solved += 1
                new, cur, apply = self._solve(gr)
                gain = new - cur
                if gain > rtol * max(abs(new), abs(cur)) + 1e-30:
                    apply()
                    version[gr] += 1
                    changed.append(f"{gr[0]}{'' if gr[1] < 0 else gr[1]}")
                    gained += gain
            steps += solved
            history.append(
                {"sweep": it, "solved": solved, "changed": len(changed), "gain": gained, "seconds": time.perf_counter() - ts}
            )
            log.debug("sweep %d: solved %d groups, %d changed, gain %.6g", it, solved, len(changed), gained)
            bar.update(1)
            bar.set_postfix(changed=len(changed))
            if not changed:
                converged = True
                break
        bar.close()
        for l in range(s.num_layers):
            self._sync_vdims(l)
        pm = PermMap(s, {k: v.clone() for k, v in self.perm.tensors.items()})
        return MatchResult(pm, it, steps, converged, time.perf_counter() - t0, history)

    def _solve(self, gr):
        """Solve one group's assignment: (new score, current score, function applying it)."""
        kind, l = gr
        if kind in ("residual", "mlp"):
            key = "residual" if kind == "residual" else f"layers.{l}.mlp"
            C = self.residual_score() if kind == "residual" else self.mlp_score(l)
            p = solve_lap(C)
            return assignment_score(C, p), assignment_score(C, self.perm.tensors[key]), lambda: self._set(key, p)
        if kind == "heads":
            new, cur, q, kv = self.solve_heads(l)

            def apply():
                self._set(f"layers.{l}.q_heads", q)
                self._set(f"layers.{l}.kv_heads", kv)
                self._sync_vdims(l)

            return new, cur, apply
        new, cur, rho = self.solve_vdims(l)

        def apply_v():
            self.rho[l] = rho
            self._sync_vdims(l)

        return new, cur, apply_v


@contextmanager
def torch_threads(n: int | None):
    """Temporarily set torch's intra-op thread count (``None``: leave it)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def weight_matching(
    spec: ArchSpec,
    reference: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
    *,
    seed: int = 0,
    max_iter: int = 100,
    progress: bool = True,
    threads: int | None = 1,
) -> MatchResult:
    """Permutations of ``model`` onto ``reference`` maximising ``Σ⟨W_ref, P(W_model)⟩``.

    ``threads`` defaults to 1: the search is many medium-sized matmuls, gathers and (single-threaded)
    assignments, and on the 2-core reference machine, shared with other jobs, SmolLM2-135M took
    10-15 s with one thread against 49-64 s with two (OpenMP threads waiting on each other).
    """
    with torch_threads(threads):
        matcher = WeightMatcher(spec, reference, model)
        res = matcher.run(seed=seed, max_iter=max_iter, progress=progress)
    res.perm_map.meta.update(
        {"method": "weight_matching", "seed": seed, "iterations": res.iterations, "lap_steps": res.steps,
         "converged": res.converged, "history": res.history}
    )
    return res
