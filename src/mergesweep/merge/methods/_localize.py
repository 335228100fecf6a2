"""Tensor code of Localize-and-Stitch (:mod:`.localize_stitch`): the stitch of one tensor, the
whole-model top-k threshold, and the data mode's mask training (a whole-model merge).

Imported only when a tensor is merged or a whole-model merge runs (it imports torch).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from tqdm.auto import tqdm

from mergesweep.errors import MergeError
from mergesweep.merge.names import is_embedding, is_lm_head


# --------------------------------------------------------------------------------------------
# which tensors are localised; the top-k threshold
# --------------------------------------------------------------------------------------------
def localised(name: str) -> bool:
    """Every tensor but the input embedding and the output head (these stay the base's)."""
    return not (is_embedding(name) or is_lm_head(name))


def threshold_rank(sparsity: float, n: int) -> int:
    """Ascending rank of the threshold ``t`` whose strict exceedance ``|tau| > t`` keeps the
    ``k = floor(sparsity n)`` largest magnitudes: the (k+1)-th largest, ``n - k - 1`` (``-1``
    when ``k = n``: no threshold, keep all; ``n - 1`` when ``k = 0``: the maximum, keep none)."""
    from mergesweep.merge.select import count_for_fraction

    return n - count_for_fraction(sparsity, n) - 1


def topk_threshold(magnitudes: Sequence[torch.Tensor], sparsity: float) -> float:
    """The threshold of :func:`threshold_rank` over the concatenation of ``magnitudes`` (exact;
    ``-inf``: keep all)."""
    from mergesweep.merge.select import kth_smallest

    n = sum(m.numel() for m in magnitudes)
    rank = threshold_rank(sparsity, n)
    if rank < 0:
        return -math.inf
    flat = torch.cat([m.reshape(-1) for m in magnitudes])
    return float(kth_smallest(flat, rank))


# --------------------------------------------------------------------------------------------
# stitch
# --------------------------------------------------------------------------------------------
def stitch_tensor(base: torch.Tensor, experts: Sequence[torch.Tensor], thresholds: Sequence[float]) -> torch.Tensor:
    """``base + sum_i m_i tau_i / max(1, sum_i m_i)`` with ``m_i = [|tau_i| > t_i]`` (``t_i``:
    ``-inf`` keeps every entry, ``inf`` none)."""
    num = torch.zeros_like(base)
    cnt = torch.zeros_like(base)
    for e, t in zip(experts, thresholds):
        d = e - base
        m = torch.gt(d.abs(), t).to(base.dtype)
        num.add_(d.mul_(m))
        cnt.add_(m)
    return base + num.div_(cnt.clamp_min_(1.0))


# --------------------------------------------------------------------------------------------
# data mode: mask training
# --------------------------------------------------------------------------------------------
def lm_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the real (non-padded) target tokens of one batch."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    target = input_ids[:, 1:]
    keep = attention_mask[:, 1:].bool()
    return torch.nn.functional.cross_entropy(logits[keep].float(), target[keep])


def _set_params(params: Sequence[torch.nn.Parameter], base: Sequence[torch.Tensor], tau: Sequence[torch.Tensor],
                scores: Sequence[torch.Tensor]) -> None:
    """``theta = theta_base + sigmoid(S) * tau`` written into the model's parameters."""
    with torch.no_grad():
        for p, b, t, s in zip(params, base, tau, scores):
            p.copy_(torch.addcmul(b, torch.sigmoid(s), t))


def objective(model, params, base, tau, scores, batches, learning_rate: float, l1_strength: float,
              grad: bool = False) -> tuple[float, float]:
    """``(J, loss)`` at mask logits ``scores``: loss = mean over batches of :func:`lm_loss` of
    ``theta_base + sigmoid(S) tau``, ``J = loss + (l1_strength / learning_rate) sum sigmoid(S)``.
    With ``grad`` the parameters' ``.grad`` hold d loss / d theta afterwards."""
    _set_params(params, base, tau, scores)
    total = 0.0
    for p in params:
        p.grad = None
    for ids, mask in batches:
        if grad:
            loss = lm_loss(model, ids, mask) / len(batches)
            loss.backward()
        else:
            with torch.no_grad():
                loss = lm_loss(model, ids, mask) / len(batches)
        total += float(loss.detach())
    if not math.isfinite(total):
        raise MergeError(f"localize_stitch: the calibration loss is {total} (a non-finite model output)")
    penalty = 0.0
    if l1_strength and learning_rate:
        penalty = (l1_strength / learning_rate) * sum(float(torch.sigmoid(s).sum(dtype=torch.float64)) for s in scores)
    return total + penalty, total


def train_mask(model, params: Sequence[torch.nn.Parameter], base: Sequence[torch.Tensor],
               tau: Sequence[torch.Tensor], batches, *, sparsity: float, sigmoid_bias: float,
               learning_rate: float, l1_strength: float, num_train_epochs: int,
               final_objective: bool = True, desc: str = "") -> tuple[list[torch.Tensor], dict]:
    """The paper's mask optimisation for one expert; returns ``(S, facts)``.

    ``S`` (real-valued mask logits, one per localised tensor) starts at ``+sigmoid_bias`` on the
    top-k entries of ``|tau|`` over all tensors (k = floor(sparsity n)) and ``-sigmoid_bias``
    elsewhere. Each epoch is one gradient step on the full calibration set (the authors' code:
    the gradient of the loss w.r.t. the weights, averaged over the batches, at
    ``theta = theta_base + sigmoid(S) tau``)::

        S <- S - learning_rate * (g * tau) * sigmoid'(S) - l1_strength * sigmoid'(S)

    i.e. a step of size ``learning_rate`` on ``J(S) = loss + (l1_strength / learning_rate)
    sum sigmoid(S)``. ``facts``: the objective and loss at the start of each epoch and (when
    ``final_objective``) after the last step; the fraction of entries with ``S > 0`` before and
    after.
    """
    n = sum(t.numel() for t in tau)
    t0 = topk_threshold([t.abs() for t in tau], sparsity)
    scores = [torch.where(t.abs() > t0, sigmoid_bias, -sigmoid_bias).to(t.dtype) for t in tau]
    facts: dict = {"initial_fraction": _fraction(scores, n), "objective": [], "loss": []}
    for _ in tqdm(range(num_train_epochs), desc=desc or "localize: train mask", leave=False, disable=None):
        j, loss = objective(model, params, base, tau, scores, batches, learning_rate, l1_strength, grad=True)
        facts["objective"].append(j)
        facts["loss"].append(loss)
        with torch.no_grad():
            for p, t, s in zip(params, tau, scores):
                g = p.grad if p.grad is not None else torch.zeros_like(t)
                sig = torch.sigmoid(s)
                deriv = sig * (1 - sig)
                s.sub_(deriv * (learning_rate * g * t + l1_strength))
        for p in params:
            p.grad = None
    if num_train_epochs and final_objective:
        j, loss = objective(model, params, base, tau, scores, batches, learning_rate, l1_strength)
        facts["objective"].append(j)
        facts["loss"].append(loss)
    facts["final_fraction"] = _fraction(scores, n)
    return scores, facts


def _fraction(scores: Sequence[torch.Tensor], n: int) -> float:
    return sum(int((s > 0).sum()) for s in scores) / max(n, 1)


# --------------------------------------------------------------------------------------------
# data mode: the whole-model merge
# --------------------------------------------------------------------------------------------
def merge_model_data(inputs):
    """Localize-and-Stitch with trained masks (``dataless: false``): see :mod:`.localize_stitch`."""
    from mergesweep.align.data import load_causal_lm
    from mergesweep.checkpoints.layout import CheckpointReader
    from mergesweep.merge.whole import WholeModelResult

    p = inputs.params
    if inputs.base is None:
        raise MergeError("localize_stitch: needs a base model")
    device = inputs.device
    with CheckpointReader(inputs.base, "base") as ref:
        names = ref.keys()
        state = {k: ref.get(k) for k in names}
    state = {k: (v.to(torch.float32) if v.is_floating_point() else v) for k, v in state.items()}
    loc = [k for k in names if state[k].is_floating_point() and localised(k)]
    if not loc:
        raise MergeError(f"localize_stitch: {inputs.base} has no tensor to localise (only embeddings/head)")

    model = load_causal_lm(inputs.base).to(device)
    model.config.use_cache = False
    for q in model.parameters():
        q.requires_grad_(False)
    params = []
    for k in loc:
        try:
            q = model.get_parameter(k)
        except AttributeError:
            raise MergeError(f"base ({inputs.base}): tensor '{k}' is not a parameter of the loaded model") from None
        q.requires_grad_(True)
        params.append(q)
    base = [state[k].to(device) for k in loc]
    tok = inputs.tokenizer("localize_stitch")
    num = [torch.zeros_like(b) for b in base]
    cnt = [torch.zeros_like(b) for b in base]
    n_loc = sum(b.numel() for b in base)
    info: dict = {"localised_parameters": n_loc, "experts": {}}
    with torch.inference_mode(False), torch.enable_grad():
        for i, path in enumerate(tqdm(inputs.experts, desc="localize_stitch: experts", leave=False, disable=None)):
            label = f"expert {i} ({inputs.names[i]})"
            with CheckpointReader(path, label) as ck:
                tau = []
                for k, b in zip(loc, base):
                    if k not in ck:
                        raise MergeError(f"{label}: {path} lacks tensor '{k}'")
                    e = ck.get(k).to(device=device, dtype=torch.float32)
                    if e.shape != b.shape:
                        raise MergeError(f"{label}: tensor '{k}' in {path} has shape {list(e.shape)}, the base's "
                                         f"is {list(b.shape)}")
                    tau.append(e - b)
            batches = inputs.batches(i, tok, device)
            scores, facts = train_mask(model, params, base, tau, batches, sparsity=p["sparsity"],
                                       sigmoid_bias=p["sigmoid_bias"], learning_rate=p["learning_rate"],
                                       l1_strength=p["l1_strength"], num_train_epochs=p["num_train_epochs"],
                                       desc=f"localize_stitch: mask of {inputs.names[i]}")
            for nm, c, t, s in zip(num, cnt, tau, scores):
                m = (s > 0).to(t.dtype)
                nm.add_(t * m)
                c.add_(m)
            info["experts"][inputs.names[i]] = {**facts, "batches": len(batches)}
            del tau, scores
    overlap = sum(int((c > 1).sum()) for c in cnt)
    info["overlap_fraction"] = overlap / max(n_loc, 1)
    out = dict(state)
    for k, b, nm, c in zip(loc, base, num, cnt):
        out[k] = (b + nm / c.clamp_min(1.0)).cpu()
    return WholeModelResult(state=out, info=info)
