"""Merge settings that do not depend on torch: the one place that says which output dtypes,
vocabulary policies, devices and shard sizes are valid, with parsers whose errors name the key.

The workflow checks a config with these parsers at start-up (:mod:`mergesweep.plan`), and
``mergesweep merge`` checks its YAML with the same ones (:mod:`mergesweep.merge.config`), so a
bad value fails before any job runs, naming the key. The engine maps the canonical dtype names
to torch dtypes.
"""

from __future__ import annotations

import re
from typing import Any

from mergesweep import devices as _devices
from mergesweep.errors import ConfigError

#: canonical output dtype names, and the spellings accepted for each
DTYPES = {
    "float32": ("float32", "fp32", "float"),
    "float16": ("float16", "fp16", "half"),
    "bfloat16": ("bfloat16", "bf16"),
}
_DTYPE_ALIASES = {alias: name for name, aliases in DTYPES.items() for alias in aliases}
#: what to do when inputs' vocabularies (embedding rows) differ
VOCAB_POLICIES = ("error", "base", "truncate")
#: devices a stage may be given (``auto``: CUDA when this process was given a GPU, else CPU;
#: see :mod:`mergesweep.devices`, which resolves them when the job runs)
DEVICE_RE = _devices.DEVICE_RE
DEFAULT_SHARD_SIZE = "2GB"
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def canonical_dtype(value: Any, key: str = "dtype") -> str | None:
    """``bf16`` -> ``bfloat16``; ``None`` stays ``None`` (the base's dtype)."""
    if value is None:
        return None
    name = str(value).replace("torch.", "").lower()
    if name not in _DTYPE_ALIASES:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(DTYPES)}")
    return _DTYPE_ALIASES[name]


def check_vocab_policy(value: Any, key: str = "vocab_policy") -> str:
    if value not in VOCAB_POLICIES:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(VOCAB_POLICIES)}")
    return value


def check_device(value: Any, key: str = "device") -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (whether the device is there is
    checked when the job runs, by :func:`mergesweep.devices.resolve_device`). DeviceError (a
    ConfigError) naming ``key`` otherwise."""
    return _devices.check_device_spelling(value, key)


def parse_size(value: int | str, key: str = "shard_size") -> int:
    """``2GB`` -> 2_000_000_000 (decimal units as in transformers; ``GiB`` for binary)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size such as '2GB', got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE_RE.match(str(value))
        unit = m.group(2).upper() if m else None
        if not m or unit not in _UNITS:
            raise ConfigError(f"{key}: expected a size such as '2GB' or '500MB', got {value!r}")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ConfigError(f"{key}: must be positive, got {value!r}")
    return n


#: how much calibration data the stats stage and whole-model methods read per expert (the one
#: owner of these defaults: the workflow's ``stats`` section and a merge YAML's
#: ``calibration_settings`` are laid over them)
CALIBRATION_DEFAULTS = {"examples": 64, "max_length": 128, "batch_size": 8}


def check_calibration_settings(value: Any, key: str = "calibration_settings") -> dict:
    """``{examples, max_length, batch_size}`` (positive integers) over :data:`CALIBRATION_DEFAULTS`;
    ConfigError naming ``<key>.<name>``."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping with examples, max_length, batch_size")
    out = dict(CALIBRATION_DEFAULTS)
    for k, v in value.items():
        if k not in CALIBRATION_DEFAULTS:
            raise ConfigError(f"{key}.{k}: unknown key (allowed: {', '.join(CALIBRATION_DEFAULTS)})")
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{key}.{k}: expected a positive integer, got {v!r}")
        out[k] = v
    if out["max_length"] < 2:
        raise ConfigError(f"{key}.max_length: at least 2 tokens, got {out['max_length']}")
    return out
