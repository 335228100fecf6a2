"""The merge-method library: one module per method, each a kernel plus a
:class:`~mergesweep.merge.spec.MethodSpec` named ``SPEC``. ``REGISTRY`` maps method name -> spec.

Every module of this package whose name does not start with ``_`` is a method and must define
``SPEC`` with ``SPEC.name`` equal to the module name; ``_``-prefixed modules are shared helpers
(``_common``: parameters and checks, ``_taskvector``: the task-vector family built from parts,
``_parts``: the tensor code of those parts). Adding a method = one module + its tests.

Importing the registry imports no torch (the workflow plan only validates parameters); method
modules import torch inside their kernels.
"""

from __future__ import annotations

import importlib
import pkgutil

from mergesweep.errors import ConfigError
from mergesweep.merge.spec import MethodSpec


def method_modules() -> list[str]:
    """Names of the method modules of this package, sorted (``_`` helpers excluded)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def _build() -> dict[str, MethodSpec]:
    registry: dict[str, MethodSpec] = {}
    for mod_name in method_modules():
        mod = importlib.import_module(f"{__name__}.{mod_name}")
        spec = getattr(mod, "SPEC", None)
        if not isinstance(spec, MethodSpec):
            raise RuntimeError(
                f"merge method module '{mod_name}' defines no SPEC (name helper modules with a leading '_')"
            )
        if spec.name != mod_name:
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
