"""Linear mode connectivity: loss along the straight line between two models.

For endpoints ``θ_A`` and ``θ_B`` (optionally ``P(θ_B)``, model B moved into A's basis by a
permutation map) and a grid of ``α ∈ [0, 1]``::

    θ(α) = (1 − α) θ_A + α θ_B
    L(α) = mean next-token cross-entropy of θ(α) over the held-out tokens
    barrier = max_α [ L(α) − ((1 − α) L(0) + α L(1)) ]

A pair is linearly mode-connected when the barrier is ≈ 0. Permuting B is function-preserving,
so ``L(1)`` is the same with and without alignment; only the interior of the path changes.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from mergesweep.align.apply import load_perm_map, permute_tensor
from mergesweep.align.data import load_causal_lm, load_tokenizer, model_id_of, read_texts, tokenize_batches
from mergesweep.align.permmap import PermMap
from mergesweep.align.spec import AlignError, arch_spec, check_compatible

log = logging.getLogger(__name__)


def barrier(alphas: Sequence[float], losses: Sequence[float]) -> float:
    """``max_i [L_i − ((1 − α_i) L_first + α_i L_last)]`` (0 at the endpoints by construction)."""
    l0, l1 = losses[0], losses[-1]
    return max(l - ((1 - a) * l0 + a * l1) for a, l in zip(alphas, losses))


@torch.no_grad()
def mean_loss(model, batches) -> tuple[float, int]:
    """Token-weighted mean next-token cross-entropy over right-padded batches: (loss, tokens)."""
    total, count = 0.0, 0
    for ids, mask in batches:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = ids[:, 1:]
        valid = mask[:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits[valid], target[valid], reduction="sum")
        total += float(nll)
        count += int(valid.sum())
    return total / max(count, 1), count


def interpolation_losses(model, state_a: dict, state_b: dict, alphas: Sequence[float], batches, desc: str) -> list[float]:
    """``L(α)`` for every α, loading ``(1 − α) A + α B`` into ``model`` in place."""
    losses = []
    for a in tqdm(alphas, desc=desc, unit="point", leave=False):
        mixed = {k: torch.lerp(state_a[k], state_b[k], float(a)) for k in state_a}
        model.load_state_dict(mixed, strict=True)
        losses.append(mean_loss(model, batches)[0])
    return losses


def linear_mode_connectivity(
    model_a: str | os.PathLike,
    model_b: str | os.PathLike,
    data: str | os.PathLike,
    *,
    perm: str | os.PathLike | PermMap | None = None,
    points: int = 11,
    max_examples: int = 64,
    batch_size: int = 8,
    max_length: int = 128,
) -> dict[str, Any]:
    """Loss along the linear path A → B (and A → P(B) when ``perm`` maps B onto A); see module doc."""
    t0 = time.perf_counter()
    if points < 2:
        raise AlignError(f"--points: need at least 2 interpolation points, got {points}")
    alphas = [i / (points - 1) for i in range(points)]
    texts = read_texts(data, max_examples=max_examples)
    batches = tokenize_batches(load_tokenizer(model_a), texts, batch_size, max_length)
    ma, mb = load_causal_lm(model_a), load_causal_lm(model_b)
    cfg_a, cfg_b = ma.config.to_dict(), mb.config.to_dict()
    state_a = {k: v.detach().clone() for k, v in ma.state_dict().items()}
    state_b = {k: v.detach().clone() for k, v in mb.state_dict().items()}
    del mb
    if state_a.keys() != state_b.keys() or any(state_a[k].shape != state_b[k].shape for k in state_a):
        raise AlignError(f"{model_a} and {model_b} do not have the same parameters; no linear path between them")
    out: dict[str, Any] = {
        "model_a": str(model_a), "model_b": str(model_b), "model_a_id": model_id_of(model_a),
        "model_b_id": model_id_of(model_b), "data": str(data), "alphas": alphas,
    }
    out["loss"] = interpolation_losses(ma, state_a, state_b, alphas, batches, "lmc")
    out["barrier"] = barrier(alphas, out["loss"])
    if perm is not None:
        pm = perm if isinstance(perm, PermMap) else load_perm_map(perm)
        spec_a, spec_b = arch_spec(cfg_a, str(model_a)), arch_spec(cfg_b, str(model_b))
        check_compatible(spec_b, spec_a, str(model_b), str(model_a))
        aligned = {k: permute_tensor(k, v, pm, cfg_b) for k, v in state_b.items()}
        out["loss_aligned"] = interpolation_losses(ma, state_a, aligned, alphas, batches, "lmc aligned")
        out["barrier_aligned"] = barrier(alphas, out["loss_aligned"])
        out["perm"] = None if isinstance(perm, PermMap) else str(perm)
        out["perm_method"] = pm.meta.get("method")
        out["perm_identity_fraction"] = pm.identity_fraction()["overall"]
    n_tokens = sum(int(m[:, 1:].sum()) for _, m in batches)
    out.update(
        {
            "points": points,
            "n_examples": len(texts),
            "n_tokens": n_tokens,
            "loss_a": out["loss"][0],
            "loss_b": out["loss"][-1],
            "runtime_s": round(time.perf_counter() - t0, 3),
        }
    )
    log.info(
        "lmc %s <-> %s: barrier %.4f%s", model_a, model_b, out["barrier"],
        f", aligned {out['barrier_aligned']:.4f}" if "barrier_aligned" in out else "",
    )
    return out


def plot_curves(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Loss along the path (and along the aligned path) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mergesweep.atomic import atomic_file

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    a = result["alphas"]
    ax.plot(a, result["loss"], "o-", label=f"naive (barrier {result['barrier']:.3f})")
    if "loss_aligned" in result:
        ax.plot(a, result["loss_aligned"], "s-", label=f"aligned (barrier {result['barrier_aligned']:.3f})")
    ax.plot([a[0], a[-1]], [result["loss"][0], result["loss"][-1]], "k:", lw=1, label="linear in loss")
    ax.set_xlabel("α  (0 = model A, 1 = model B)")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"{Path(result['model_a']).name} ↔ {Path(result['model_b']).name}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
