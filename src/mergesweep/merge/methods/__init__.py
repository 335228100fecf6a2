"""The merge-method library: one module per method, each a pure tensor kernel plus a
:class:`~mergesweep.merge.spec.MethodSpec`. ``REGISTRY`` maps method name -> spec.

Adding a method = one module exporting ``SPEC`` (or ``SPECS`` for variants) + its tests, and
one line in ``_MODULES`` below.
"""

from __future__ import annotations

import importlib

from mergesweep.errors import ConfigError
from mergesweep.merge.spec import MethodSpec

_MODULES = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare",
    "della",
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
        specs = getattr(mod, "SPECS", None) or (mod.SPEC,)
        for spec in specs:
            if spec.name in registry:
                raise RuntimeError(f"merge method '{spec.name}' is registered twice")
            registry[spec.name] = spec
    return registry


REGISTRY: dict[str, MethodSpec] = _build()


def get_method(name: str) -> MethodSpec:
    """The spec of ``name``; ConfigError listing the known methods otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"method: unknown merge method {name!r} (known: {', '.join(sorted(REGISTRY))})") from None
