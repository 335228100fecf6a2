"""Parameter grids: ``{density: [0.2, 0.5], lambda: [0.5, 1.0]}`` -> four merge jobs.

A list value is a grid axis (one job per element, cartesian product over axes, the first key
varying slowest). Per-expert values are written ``{per_expert: [...]}`` or as a mapping by
expert name, and are never axes. A per-expert axis is a list of such mappings.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping

from mergesweep.errors import ConfigError


def expand_grid(params: Mapping[str, Any] | None) -> list[dict]:
    """Expand list-valued parameters into the cartesian product of points (``[{}]`` for none)."""
    if params is None:
        return [{}]
    if not isinstance(params, Mapping):
        raise ConfigError(f"params: expected a mapping of parameter -> value, got {type(params).__name__}")
    axes = [(k, v) for k, v in params.items() if isinstance(v, (list, tuple))]
    for k, v in axes:
        if not v:
            raise ConfigError(f"params.{k}: an empty list gives no grid points")
    points = []
    for combo in itertools.product(*(v for _, v in axes)):
        point = dict(params)
        point.update(zip((k for k, _ in axes), combo))
        points.append(point)
    return points
