"""The YAML of ``mergesweep merge --config FILE``: one merge, validated with errors naming keys.

.. code-block:: yaml

    method: ties
    base: resources/checkpoints/base
    experts: [resources/checkpoints/math, resources/checkpoints/code]
    params: {density: 0.2, weight: {per_expert: [1.0, 0.5]}}
    dtype: bfloat16          # optional, default: the base's
    device: auto             # optional: auto (CUDA when given a GPU, else CPU), cpu, cuda, cuda:N
    shard_size: 2GB          # optional
    vocab_policy: error      # optional: error | base | truncate
    tie_policy: error        # optional: error | allow (tied and untied lm_heads mixed)
    align: {1: results/align/abc/perm.safetensors}   # optional
    expert_names: [math, code]                        # optional, default: directory names
    stats: {math: results/stats/math--gram--1a2b3c4d5e}  # data-aware methods (regmean, fisher):
                                                      # each expert's `mergesweep stats` output
    calibration: {math: data/math.jsonl}              # whole-model methods (regmean_plus_plus, pleas,
                                                      # localize_stitch with data): per expert a JSONL
                                                      # file, or {path: ..., uid: ...}
    calibration_settings: {examples: 64, max_length: 128, batch_size: 8}   # optional

Relative paths are taken relative to the current directory (as for mergekit).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from mergesweep.errors import ConfigError, MergesweepError
from mergesweep.merge.methods import get_method
from mergesweep.merge.settings import (DEFAULT_SHARD_SIZE, canonical_dtype, check_calibration_settings, check_device,
                                       parse_size)
from mergesweep.merge.tensor_plan import check_policies
from mergesweep.merge.spec import resolve_params

KEYS = ("method", "base", "experts", "params", "dtype", "device", "shard_size", "vocab_policy", "tie_policy",
        "align", "expert_names", "stats", "calibration", "calibration_settings")
DEFAULTS = {"base": None, "params": {}, "dtype": None, "device": "auto", "shard_size": DEFAULT_SHARD_SIZE,
            "vocab_policy": "error", "tie_policy": "error", "align": None, "expert_names": None,
            "stats": None, "calibration": None, "calibration_settings": None}


def validate_merge_config(doc: Any, source: str = "config") -> dict:
    """Validate a merge mapping (as loaded from YAML); return it with defaults filled in."""
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{source}: expected a mapping with keys method, base, experts, params")
    unknown = [k for k in doc if k not in KEYS]
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key in {source} (allowed: {', '.join(KEYS)})")
    if "method" not in doc:
        raise ConfigError(f"method: missing in {source}")
    cfg = {**DEFAULTS, **dict(doc)}
    if not isinstance(cfg["method"], str):
        raise ConfigError(f"method: expected a method name, got {cfg['method']!r}")
    spec = get_method(cfg["method"])
    if cfg["base"] is not None and not isinstance(cfg["base"], (str, os.PathLike)):
        raise ConfigError(f"base: expected a checkpoint directory, got {cfg['base']!r}")
    experts = cfg.get("experts")
    if not isinstance(experts, list) or not experts:
        raise ConfigError("experts: expected a non-empty list of checkpoint directories")
    for i, e in enumerate(experts):
        if not isinstance(e, (str, os.PathLike)):
            raise ConfigError(f"experts[{i}]: expected a checkpoint directory, got {e!r}")
    for key, path in [("base", cfg["base"])] + [(f"experts[{i}]", e) for i, e in enumerate(experts)]:
        if path is not None and not Path(path).is_dir():
            raise ConfigError(f"{key}: checkpoint directory {path} not found")
    names = cfg["expert_names"]
    if names is not None and (not isinstance(names, list) or len(names) != len(experts)
                              or not all(isinstance(n, str) for n in names)):
        raise ConfigError(f"expert_names: expected a list of {len(experts)} strings")
    if names is None:
        names = [Path(e).name for e in experts]
    if not isinstance(cfg["params"], Mapping):
        raise ConfigError(f"params: expected a mapping of parameter -> value, got {cfg['params']!r}")
    spec.check_inputs(len(experts), cfg["base"] is not None)
    resolve_params(spec, cfg["params"], len(experts), names, has_base=cfg["base"] is not None)
    canonical_dtype(cfg["dtype"])
    check_device(cfg["device"])
    parse_size(cfg["shard_size"])
    check_policies(cfg["vocab_policy"], cfg["tie_policy"], has_base=cfg["base"] is not None)
    cfg["expert_names"] = list(names)
    cfg["align"] = align_by_index(cfg["align"], names)
    cfg["stats"] = by_expert_index(cfg["stats"], names, "stats", kind="dir")
    cfg["calibration"] = by_expert_index(cfg["calibration"], names, "calibration", kind="calibration")
    cfg["calibration_settings"] = check_calibration_settings(cfg["calibration_settings"])
    return cfg


def by_expert_index(value: Any, names: list[str], key: str, kind: str) -> dict | None:
    """``{expert index or name: entry}`` -> ``{index: entry}`` for the per-expert inputs of a merge:
    ``kind="map"`` (a permutation map file), ``"dir"`` (a statistics directory) or
    ``"calibration"`` (a JSONL file, or ``{path, uid}``). Errors name ``<key>.<expert>``; a listed
    path must exist."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        what = "permutation map file" if kind == "map" else "path"
        raise ConfigError(f"{key}: expected a mapping {{expert index or name: {what}}}")
    out: dict = {}
    for k, entry in value.items():
        if isinstance(k, int) or (isinstance(k, str) and k.isdigit()):
            idx = int(k)
            if not 0 <= idx < len(names):
                raise ConfigError(f"{key}.{k}: no expert with index {idx}")
        elif str(k) in names:
            idx = names.index(str(k))
        else:
            raise ConfigError(f"{key}.{k}: not an expert index or name (experts: {', '.join(names)})")
        if kind == "calibration" and isinstance(entry, Mapping):
            extra = [x for x in entry if x not in ("path", "uid")]
            if extra or "path" not in entry:
                raise ConfigError(f"{key}.{k}: expected a JSONL path or {{path, uid}}")
            path, uid = entry["path"], entry.get("uid")
            if uid is not None and not isinstance(uid, str):
                raise ConfigError(f"{key}.{k}.uid: expected a string")
        else:
            path, uid = entry, None
        if kind == "map" and (not isinstance(path, (str, os.PathLike)) or not Path(path).is_file()):
            raise ConfigError(f"{key}.{k}: permutation map {path} not found")
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"{key}.{k}: expected a path, got {path!r}")
        p = Path(path)
        if kind == "dir" and not p.is_dir():
            raise ConfigError(f"{key}.{k}: statistics directory {path} not found")
        if kind == "calibration" and not p.is_file():
            raise ConfigError(f"{key}.{k}: calibration file {path} not found")
        out[idx] = {"path": p, "uid": uid} if kind == "calibration" else p
    return out or None


def align_by_index(align: Any, names: list[str]) -> dict[int, Path] | None:
    """``{expert index or name: map file}`` -> ``{index: Path}``; errors name ``align.<key>``."""
    return by_expert_index(align, names, "align", kind="map")


def planned_model_id(cfg: Mapping[str, Any]) -> str:
    """The model id this merge will get (a validated config from :func:`validate_merge_config`):
    the same function the workflow's plan uses, fed with the inputs' recorded uids."""
    from mergesweep.merge.provenance import identify_merge

    from mergesweep.merge.identity import expert_data_uids

    data = expert_data_uids(len(cfg["experts"]), cfg.get("stats"), cfg.get("calibration"),
                            cfg["calibration_settings"])
    return identify_merge(cfg["method"], cfg["params"], cfg["expert_names"], cfg["base"], cfg["experts"],
                          cfg.get("align"), dtype=cfg["dtype"], vocab_policy=cfg["vocab_policy"],
                          data_uids=data).model_id


def load_merge_yaml(path: str | os.PathLike) -> dict:
    """Load and validate a merge YAML; returns a dict with every key of ``KEYS`` (defaults filled)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: file not found") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    try:
        return validate_merge_config(doc, str(path))
    except MergesweepError as e:
        raise ConfigError(f"{path}: {e}") from e
