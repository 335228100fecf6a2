"""``align`` as a library call: checkpoints in, a permutation map (with its report) out."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from mergesweep.align.apply import permute_tensor
from mergesweep.align.data import (
    load_causal_lm,
    load_tokenizer,
    model_id_of,
    read_state,
    read_texts,
    tokenize_batches,
)
from mergesweep.align.permmap import PermMap
from mergesweep.align.spec import AlignError, arch_spec, check_compatible

log = logging.getLogger(__name__)

METHODS = ("weight_matching", "activation_matching")


def weight_stats(
    reference: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor], perm_map: PermMap | None, config: dict
) -> dict[str, float]:
    """Similarity of the reference and the (permuted) model over all shared tensors.

    ``inner`` = Σ⟨W_ref, P(W)⟩ (the weight-matching objective), ``cosine`` = inner / (‖W_ref‖‖W‖),
    ``l2`` = ‖W_ref − P(W)‖ (all tensors flattened into one vector).
    """
    inner = nr = nm = d2 = 0.0
    for name, r in reference.items():
        if name not in model:
            continue
        m = model[name].to(torch.float32)
        if perm_map is not None:
            m = permute_tensor(name, m, perm_map, config)
        r = r.to(torch.float32)
        inner += float((r * m).sum(dtype=torch.float64))
        nr += float((r * r).sum(dtype=torch.float64))
        nm += float((m * m).sum(dtype=torch.float64))
        d2 += float(((r - m) ** 2).sum(dtype=torch.float64))
    return {"inner": inner, "cosine": inner / math.sqrt(max(nr * nm, 1e-300)), "l2": math.sqrt(d2)}


def _versions() -> dict[str, str | None]:
    from mergesweep.record import library_versions

    return library_versions(("mergesweep", "torch", "transformers", "scipy"))


def align_checkpoints(
    model_dir: str | os.PathLike,
    reference_dir: str | os.PathLike,
    method: str = "weight_matching",
    *,
    seed: int = 0,
    data: str | os.PathLike | None = None,
    max_iter: int = 100,
    num_batches: int = 4,
    batch_size: int = 8,
    max_length: int = 128,
    progress: bool = True,
    threads: int | None = None,
) -> PermMap:
    """Compute the map that moves ``model_dir``'s hidden units into ``reference_dir``'s basis.

    The returned map's ``meta`` holds the method, iterations, objective (and cosine, L2 distance)
    before/after, identity fraction per group, runtime and versions.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise AlignError(f"--method: '{method}' is not one of {', '.join(METHODS)}")
    model_dir, reference_dir = Path(model_dir), Path(reference_dir)
    cfg_m, sd_m = read_state(model_dir)
    cfg_r, sd_r = read_state(reference_dir)
    spec_m = arch_spec(cfg_m, where=str(model_dir / "config.json"))
    spec_r = arch_spec(cfg_r, where=str(reference_dir / "config.json"))
    check_compatible(spec_m, spec_r, str(model_dir), str(reference_dir))
    before = weight_stats(sd_r, sd_m, None, cfg_m)
    if method == "weight_matching":
        from mergesweep.align.weight_matching import weight_matching

        res = weight_matching(spec_r, sd_r, sd_m, seed=seed, max_iter=max_iter, progress=progress, threads=threads or 1)
    else:
        from mergesweep.align.activation_matching import activation_matching

        if data is None:
            raise AlignError("--data: activation_matching needs a jsonl data file ('text' or 'prompt'+'target')")
        texts = read_texts(data, max_examples=num_batches * batch_size)
        batches = tokenize_batches(load_tokenizer(reference_dir), texts, batch_size, max_length)
        ref_model, model = load_causal_lm(reference_dir), load_causal_lm(model_dir)
        torch.manual_seed(seed)
        from mergesweep.align.weight_matching import torch_threads

        with torch_threads(threads):
            res = activation_matching(spec_r, ref_model, model, batches, progress=progress)
        del ref_model, model
    pm = res.perm_map
    after = weight_stats(sd_r, sd_m, pm, cfg_m)
    pm.meta.update(
        {
            "model": str(model_dir),
            "reference": str(reference_dir),
            "model_id": model_id_of(model_dir),
            "reference_id": model_id_of(reference_dir),
            "seed": seed,
            "data": None if data is None else str(data),
            "iterations": res.iterations,
            "converged": res.converged,
            "objective_before": before["inner"],
            "objective_after": after["inner"],
            "cosine_before": before["cosine"],
            "cosine_after": after["cosine"],
            "l2_before": before["l2"],
            "l2_after": after["l2"],
            "identity_fraction": pm.identity_fraction(),
            "runtime_s": round(time.perf_counter() - t0, 3),
            "versions": _versions(),
        }
    )
    log.info(
        "%s: %s onto %s in %d iteration(s), %.1f s; objective %.6g -> %.6g, cosine %.4f -> %.4f, identity %.3f",
        method, model_dir, reference_dir, res.iterations, pm.meta["runtime_s"], before["inner"], after["inner"],
        before["cosine"], after["cosine"], pm.meta["identity_fraction"]["overall"],
    )
    return pm


def summary(pm: PermMap) -> dict[str, Any]:
    """The map's metadata without the per-sweep history (what tables and reports need)."""
    out = {k: v for k, v in pm.meta.items() if k != "history"}
    out["arch"] = pm.spec.as_dict()
    return out
