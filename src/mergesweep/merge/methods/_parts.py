"""Tensor parts shared by the task-vector methods (imports torch; loaded when a kernel first runs).

A task-vector merge of one tensor is assembled from four parts
(:mod:`mergesweep.merge.methods._taskvector` declares which method uses which):

* **sparsify** - per expert, a *masker* that zeroes entries of ``tau_i = theta_i - theta_base``:
  magnitude top-k (:func:`magnitude_maskers`), DARE random drop (:func:`dare_maskers`), DELLA
  magnitude-ranked random drop (:func:`della_maskers`), the breadcrumbs band
  (:func:`breadcrumbs_maskers`), or none;
* **rescale** - the random maskers divide survivors by their keep probability (``rescale``);
* **sign election** - TIES: ``gamma = sign(sum_i w_i tau_i)``, only entries agreeing with it
  take part (:func:`elect_and_merge`), or none;
* **combine** - the weighted sum ``sum_i w_i tau_i``, divided by the sum of the weights that
  took part (``normalize``); the TALL consensus mask (:func:`tall_consensus`) may then filter it.

:func:`combine_task_vectors` runs them block by block (cache-sized slices of the flattened
tensor) and writes ``theta_base + scale * tau``. Maskers are prepared once per tensor (a
threshold, or a mask drawn over the whole tensor) and applied to each block, so the result
does not depend on the block size.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from mergesweep.merge.select import blocks, count_for_fraction, kth_smallest_of

#: applies a sparsifier to one block of a flattened task vector, in place: ``masker(d, sl)``
Masker = Callable[[torch.Tensor, slice], None]


# --------------------------------------------------------------------------------------------
# combine
# --------------------------------------------------------------------------------------------
def weighted_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """sum_i w_i * d_i, divided by sum_i w_i when ``normalize`` (block by block)."""
    scale = 1.0
    if normalize:
        total = float(sum(weights))
        if abs(total) >= 1e-12:
            scale = 1.0 / total
    out = torch.empty_like(deltas[0])
    o = out.view(-1)
    flats = [d.reshape(-1) for d in deltas]
    for sl in blocks(o.numel()):
        oc = o[sl]
        torch.mul(flats[0][sl], float(weights[0]) * scale, out=oc)
        for d, w in zip(flats[1:], weights[1:]):
            oc.add_(d[sl], alpha=float(w) * scale)
    return out


def _sum_in_place(deltas, weights: Sequence[float]) -> torch.Tensor:
    """``sum_i w_i d_i``, accumulated into the first delta (consumes an iterable of deltas)."""
    it = iter(deltas)
    acc = next(it).mul_(float(weights[0]))
    for d, w in zip(it, weights[1:]):
        acc.add_(d, alpha=float(w))
    return acc


def elect_and_merge(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool
) -> torch.Tensor:
    """TIES "elect sign" + "disjoint merge".

    With ``s_i = w_i * d_i``: the elected sign is ``gamma = +1 where sum_i s_i >= 0 else -1``;
    entry ``i`` takes part where ``sign(s_i) == gamma`` (zeros never take part). The result is
    ``sum_i [agree_i] s_i`` divided, when ``normalize``, by ``sum_i [agree_i] w_i`` (1 where no
    expert agrees) - the weighted disjoint mean of the TIES paper.

    With non-negative weights this runs on float arithmetic only (CPU boolean kernels are slow):
    ``relu(gamma * d_i)`` is ``|d_i|`` where expert i agrees and 0 elsewhere, so
    ``num = gamma * sum_i w_i relu(gamma d_i)`` and ``den = sum_i w_i sign(relu(gamma d_i))``.
    """
    ws = [float(w) for w in weights]
    if any(w < 0 for w in ws):
        return _elect_and_merge_signed(deltas, ws, normalize)
    total = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, ws):
        total.add_(d, alpha=w)
    gamma = torch.ones_like(total).copysign_(total)  # +1 where the sum is +0
    del total
    num = torch.zeros_like(gamma)
    den = torch.zeros_like(gamma) if normalize else None
    for d, w in zip(deltas, ws):
        if w == 0.0:
            continue
        agreeing = torch.mul(d, gamma).relu_()
        num.add_(agreeing, alpha=w)
        if den is not None:
            den.add_(agreeing.sign_(), alpha=w)
    num.mul_(gamma)
    if den is not None:
        positive = [w for w in ws if w > 0]
        if positive:
            # den is 0 exactly where num is 0; any sum of kept weights is >= the smallest weight
            num.div_(den.clamp_min_(min(positive)))
    return num


def _elect_and_merge_signed(deltas: Sequence[torch.Tensor], ws: Sequence[float], normalize: bool) -> torch.Tensor:
    total = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, ws):
        total.add_(d, alpha=w)
    sign = torch.where(total >= 0, 1.0, -1.0)
    del total
    out = torch.zeros_like(deltas[0])
    den = torch.zeros_like(deltas[0]) if normalize else None
    for d, w in zip(deltas, ws):
        if w == 0.0:
            continue
        prod = d * sign  # sign(w * d) == gamma  <=>  w * d * gamma > 0
        agree = (prod > 0 if w > 0 else prod < 0).to(d.dtype)
        del prod
        out.addcmul_(d, agree, value=w)
        if den is not None:
            den.add_(agree, alpha=w)
    if den is not None:
        # where nothing agrees num is 0 too. A zero sum of agreeing weights is rejected by
        # validation (mergesweep.merge.methods._common.check_kept_weight_sums); kept as a guard.
        den.masked_fill_(den == 0, 1.0)
        out.div_(den)
    return out


def tall_consensus(mask_lambdas: Sequence[float], k: int):
    """TALL-mask consensus (Wang et al. 2024) as a filter on the combined task vector:
    ``m_i = [|tau_i| > lambda_i |tau_MTL - tau_i|]`` (strict, as the reference code), keep the
    entries that at least ``k`` masks select. Returns ``filter(deltas, mtl) -> mask``."""

    def consensus_mask(deltas: Sequence[torch.Tensor], mtl: torch.Tensor) -> torch.Tensor:
        votes = torch.zeros(mtl.shape, dtype=torch.int32, device=mtl.device)
        for d, lam in zip(deltas, mask_lambdas):
            votes += d.abs() > (mtl - d).abs_().mul_(float(lam))
        return votes >= k

    return consensus_mask


def combine_task_vectors(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
    lam: float = 1.0,
    normalize: bool = False,
    maskers: Sequence[Masker | None] | None = None,
    elect: bool = False,
    consensus: Callable | None = None,
) -> torch.Tensor:
    """``theta_base + lam * combine(sparsify(theta_i - theta_base))``, block by block.

    ``maskers[i]`` sparsifies expert i's task vector (``None``: keep all). ``elect``: TIES sign
    election and disjoint merge (``normalize`` divides by the agreeing weights); otherwise the
    weighted sum (``normalize`` divides by the sum of all weights). ``consensus(deltas, tau)``
    returns a mask applied to the combined vector.
    """
    n = len(experts)
    maskers = list(maskers) if maskers is not None else [None] * n
    scale = float(lam)
    if normalize and not elect:
        total = float(sum(weights))
        if abs(total) >= 1e-12:
            scale = float(lam) / total
    out = torch.empty_like(base)
    o, b = out.view(-1), base.reshape(-1)
    flats = [e.reshape(-1) for e in experts]
    keep_list = elect or consensus is not None
    for sl in blocks(o.numel()):  # elementwise from here on: temporaries stay in cache
        bc = b[sl]
        deltas = (_sparsified(e[sl], bc, m, sl) for e, m in zip(flats, maskers))
        if keep_list:
            deltas = list(deltas)
        if elect:
            merged = elect_and_merge(deltas, weights, normalize)
        elif consensus is not None:
            merged = _sum_in_place([deltas[0].clone(), *deltas[1:]], weights)
        else:
            merged = _sum_in_place(deltas, weights)
        if consensus is not None:
            merged.mul_(consensus(deltas, merged))
        del deltas
        torch.add(bc, merged, alpha=scale, out=o[sl])
    return out


def _sparsified(e: torch.Tensor, b: torch.Tensor, masker: Masker | None, sl: slice) -> torch.Tensor:
    d = e - b
    if masker is not None:
        masker(d, sl)
    return d


# --------------------------------------------------------------------------------------------
# sparsify: maskers
# --------------------------------------------------------------------------------------------
def _keep_nothing(d: torch.Tensor, sl: slice) -> None:
    d.zero_()


def threshold_masker(low: float | None, high: float | None = None) -> Masker | None:
    """Keep ``low <= |d|`` (and ``|d| < high`` when given); ``None`` when that keeps everything."""
    if high is None and (low is None or low == float("-inf")):
        return None
    if low == float("inf"):
        return _keep_nothing

    def masker(d: torch.Tensor, sl: slice) -> None:
        # float masks: CPU boolean kernels are slow
        mag = d.abs()
        if low is not None:
            d.mul_(torch.ge(mag, low, out=torch.empty_like(d)))
        if high is not None:
            d.mul_(torch.lt(mag, high, out=torch.empty_like(d)))

    return masker


def random_masker(keep: torch.Tensor, divisor: float | torch.Tensor | None) -> Masker:
    """Zero the entries where ``keep`` (a mask over the whole tensor) is false; divide the
    survivors by ``divisor`` (the keep probability: rescale) when given."""
    keep_flat = keep.reshape(-1)
    div_flat = divisor.reshape(-1) if isinstance(divisor, torch.Tensor) else divisor

    def masker(d: torch.Tensor, sl: slice) -> None:
        d.mul_(keep_flat[sl])
        if div_flat is not None:
            d.div_(div_flat[sl] if isinstance(div_flat, torch.Tensor) else div_flat)

    return masker


def magnitude_threshold(expert: torch.Tensor, base: torch.Tensor, density: float) -> float | None:
    """The k-th largest ``|expert - base|``, k = floor(density * n), computed block by block
    without materialising the task vector. ``None``: keep everything; ``inf``: keep nothing."""
    return _kth_largest_delta(expert, base, count_for_fraction(density, expert.numel()))


def _kth_largest_delta(expert: torch.Tensor, base: torch.Tensor, k: int) -> float | None:
    e, b = expert.reshape(-1), base.reshape(-1)
    n = e.numel()
    if k >= n:
        return None
    if k <= 0:
        return float("inf")
    return float(kth_smallest_of(lambda s, t, step: (e[s:t:step] - b[s:t:step]).abs_(), n, n - k))


def magnitude_maskers(base, experts, p, ctx) -> list[Masker | None]:
    """TIES trim: keep ``|tau| >=`` the k-th largest magnitude, k = floor(density n), per tensor
    or (``scope: model``) the whole-model threshold the engine computed (ties are all kept)."""
    if p.get("scope") == "model":
        thresholds = ctx.stats["trim"]
    else:
        thresholds = [magnitude_threshold(e, base, d) for e, d in zip(experts, p["density"])]
    return [threshold_masker(t) for t in thresholds]


def breadcrumbs_band(expert: torch.Tensor, base: torch.Tensor, density: float, gamma: float):
    """``(low, high)`` magnitude thresholds of the breadcrumbs mask, keep ``low <= |tau| < high``:
    ``high`` = the n_top-th largest |tau| (n_top = floor(gamma n); none when 0), ``low`` = the
    (n_top + n_keep)-th largest (n_keep = floor(density n)). ``(None, None)``: keep all;
    ``(inf, None)``: keep nothing."""
    n = expert.numel()
    n_top = count_for_fraction(gamma, n)
    n_keep = min(count_for_fraction(density, n), n - n_top)
    if n_top == 0 and n_keep >= n:
        return None, None
    if n_keep <= 0:
        return float("inf"), None
    low = _kth_largest_delta(expert, base, n_top + n_keep)
    high = _kth_largest_delta(expert, base, n_top) if n_top > 0 else None
    return low, high


def breadcrumbs_maskers(base, experts, p, ctx) -> list[Masker | None]:
    return [threshold_masker(*breadcrumbs_band(e, base, d, g))
            for e, d, g in zip(experts, p["density"], p["gamma"])]


def random_keep_mask(shape, keep_prob, generator: torch.Generator, device) -> torch.Tensor:
    """Bernoulli(keep_prob) mask (``keep_prob`` a number or a tensor of per-entry probabilities)
    drawn on the CPU from ``generator`` (reproducible), on ``device``."""
    u = torch.rand(shape, generator=generator, dtype=torch.float32)
    if isinstance(keep_prob, torch.Tensor):
        return u.to(keep_prob.device) < keep_prob
    return (u < keep_prob).to(device)


def dare_masker(shape, density: float, generator: torch.Generator, device, rescale: bool = True) -> Masker | None:
    """DARE: keep each entry with probability ``density`` (rescale: divide survivors by it)."""
    if density >= 1.0:
        return None
    if density <= 0.0:
        return _keep_nothing
    return random_masker(random_keep_mask(shape, density, generator, device), density if rescale else None)


def dare_maskers(base, experts, p, ctx) -> list[Masker | None]:
    return [dare_masker(e.shape, d, ctx.generator(i), e.device, p["rescale"])
            for i, (e, d) in enumerate(zip(experts, p["density"]))]


def magprune_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA keep probabilities from magnitude ranks within each row (same shape as ``delta``):
    ``p_j = density - epsilon + 2 epsilon r_j / (m - 1)``, ``r_j`` = 0 (smallest) .. m-1 (largest).
    Rows: a 2-D tensor's rows, a higher-dimensional tensor's first index, a 1-D tensor is one row."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    m = rows.shape[1]
    if m == 1:
        return torch.full_like(delta, density)
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(rows)
    steps = torch.arange(m, dtype=rows.dtype, device=rows.device).expand_as(rows)
    ranks.scatter_(1, order, steps)
    del order
    probs = ranks.mul_(2.0 * epsilon / (m - 1)).add_(density - epsilon)
    return probs.reshape(delta.shape)


def della_masker(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator,
                 rescale: bool = True) -> Masker | None:
    """DELLA MAGPRUNE: keep entry j with probability p_j (:func:`magprune_probabilities`);
    rescale: divide survivors by p_j."""
    if density >= 1.0 and epsilon == 0.0:
        return None
    probs = magprune_probabilities(delta, density, epsilon)
    keep = random_keep_mask(delta.shape, probs, generator, delta.device)
    return random_masker(keep, probs if rescale else None)


def della_maskers(base, experts, p, ctx) -> list[Masker | None]:
    return [della_masker(e - base, d, eps, ctx.generator(i), p["rescale"])
            for i, (e, d, eps) in enumerate(zip(experts, p["density"], p["epsilon"]))]


# --------------------------------------------------------------------------------------------
# whole-tensor forms of the sparsifiers (for tests and interactive use)
# --------------------------------------------------------------------------------------------
def sparsify(delta: torch.Tensor, masker: Masker | None) -> torch.Tensor:
    """Apply a masker to a whole task vector, in place."""
    if masker is not None:
        flat = delta.view(-1)
        masker(flat, slice(0, flat.numel()))
    return delta


def dare_drop(delta: torch.Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """Random drop (keep probability ``density``) and rescale by ``1/density``; in place."""
    return sparsify(delta, dare_masker(delta.shape, density, generator, delta.device, rescale))


def magprune(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator,
             rescale: bool = True) -> torch.Tensor:
    """DELLA drop and rescale of a whole task vector (a new tensor)."""
    return sparsify(delta.clone(), della_masker(delta, density, epsilon, generator, rescale))


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """Boolean breadcrumbs mask of a task vector (:func:`breadcrumbs_band`); None = keep all."""
    low, high = breadcrumbs_band(delta, torch.zeros_like(delta), density, gamma)
    if low is None:
        return None
    mag = delta.abs()
    keep = mag >= low
    if high is not None:
        keep &= mag < high
    return keep
