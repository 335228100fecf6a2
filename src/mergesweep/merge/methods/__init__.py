"""The merge-method library: one module per method, each a pure tensor kernel plus a
:class:`~mergesweep.merge.spec.MethodSpec`. ``REGISTRY`` maps method name -> spec.

Adding a method = one module exporting ``SPEC`` + its tests, and one line in ``_MODULES`` below
(kernels shared by several methods live in helper modules such as ``dare``/``_common``).
"""

from __future__ import annotations

import importlib

from mergesweep.errors import ConfigError
from mergesweep.merge.spec import MethodSpec

_MODULES = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "breadcrumbs",
    "slerp",
    "model_stock",
    "consensus",
    "tsv",
    "pcb",
    "layer_swap",
)


def _build() -> dict[str, MethodSpec]:
    registry: dict[str, MethodSpec] = {}
    for mod_name in _MODULES:
        mod = importlib.import_module(f"{__name__}.{mod_name}")
        spec = mod.SPEC
        if spec.name != mod_name or spec.name in registry:
            raise RuntimeError(f"merge method module '{mod_name}' registers '{spec.name}'")
        registry[spec.name] = spec
    return registry


REGISTRY: dict[str, MethodSpec] = _build()


def get_method(name: str) -> MethodSpec:
    """The spec of ``name``; ConfigError listing the known methods otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"method: unknown merge method {name!r} (known: {', '.join(sorted(REGISTRY))})") from None
