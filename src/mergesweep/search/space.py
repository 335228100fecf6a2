"""The search space: the unit cube ``[0, 1]^d`` mapped onto a base method's parameters.

A search varies some of a merge method's numeric parameters between bounds the user gives::

    SearchSpace.from_config("ties",
                            {"weight": {"per_expert": True, "low": 0.1, "high": 1.0},
                             "density": {"low": 0.1, "high": 0.9},
                             "lambda": {"low": 0.5, "high": 1.5}},
                            experts=["math", "code"], key="search[0]")

Each coordinate ``x_k`` of a vector ``x`` in ``[0, 1]^d`` is one scalar of the merge: a parameter
without ``per_expert`` is one coordinate; a ``per_expert: true`` parameter is one coordinate per
expert, in expert order. The coordinates follow the order of the method's parameters in its
:class:`~mergesweep.merge.spec.MethodSpec` (not the order of the config mapping), so the same
config always gives the same space. The map is affine::

    v_k = low_k + x_k * (high_k - low_k)

then rounded to ``digits`` significant digits (4 by default; ``int`` parameters to the nearest
integer) and clamped to ``[low_k, high_k]``, so two proposals closer than the rounding are the
same merge and get the same content id (see :mod:`mergesweep.ids`). :meth:`SearchSpace.to_params`
returns the merge parameters (per-expert values as lists in expert order, the unsearched ``fixed``
parameters added); :meth:`SearchSpace.to_vector` maps them back (exactly, up to the rounding).

Checks, each a :class:`~mergesweep.errors.ConfigError` whose message starts with the key path
(``<key>.params.<name>``):

* a parameter the base method does not have (the message lists the method's parameters);
* a parameter that cannot be searched (``bool``/``str``), or given a value as well as bounds;
* bounds missing, not finite, ``low >= high``, or outside the method's own range (``density`` of
  ties lies in ``[0, 1]``; a bound on an open end of the method's range must lie strictly inside);
* ``per_expert: true`` on a parameter the method does not let vary per expert;
* unknown keys in a parameter's spec;
* a space whose lowest, central or highest point is not a valid merge of the method (its
  cross-parameter checks, e.g. linear with ``normalize: true`` divides by the sum of the
  weights, so per-expert ``weight.low: 0`` is refused there). Points inside the box are not all
  checked: :meth:`SearchSpace.validate` checks one proposal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from mergesweep.errors import ConfigError

#: significant digits a proposal's parameters are rounded to (part of a space's config)
DEFAULT_DIGITS = 4

_SPEC_KEYS = ("low", "high", "per_expert")


@dataclass(frozen=True)
class Dimension:
    """One coordinate of the space: parameter ``param`` (of expert ``expert`` for a per-expert
    parameter, else ``None``) between ``low`` and ``high``."""

    param: str
    expert: str | None
    low: float
    high: float
    kind: str = "float"

    @property
    def name(self) -> str:
        return self.param if self.expert is None else f"{self.param}[{self.expert}]"


def round_significant(value: float, digits: int) -> float:
    """``value`` rounded to ``digits`` significant digits (0 stays 0)."""
    if value == 0 or not math.isfinite(value):
        return float(value)
    exponent = math.floor(math.log10(abs(value)))
    out = round(value, digits - 1 - exponent)
    return float(out) + 0.0  # no -0.0


@dataclass(frozen=True)
class SearchSpace:
    """``[0, 1]^d`` -> parameters of ``method`` (see the module docstring)."""

    method: str
    experts: tuple[str, ...]
    dims: tuple[Dimension, ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    digits: int = DEFAULT_DIGITS
    per_expert: tuple[str, ...] = ()  # the searched parameters that vary per expert

    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        method: str,
        params_spec: Mapping[str, Any],
        experts: Sequence[str],
        key: str = "search",
        *,
        fixed: Mapping[str, Any] | None = None,
        digits: int = DEFAULT_DIGITS,
        has_base: bool = True,
    ) -> "SearchSpace":
        """Validate ``params_spec`` (``{name: {low, high} | {per_expert: true, low, high}}``)
        against ``method``'s spec; ``fixed`` are the method's other parameters, held constant
        (validated too). ``key`` prefixes every error message (e.g. ``search[0]``)."""
        from mergesweep.merge.methods import REGISTRY

        if method not in REGISTRY:
            raise ConfigError(
                f"{key}.method: unknown merge method {method!r} (known: {', '.join(sorted(REGISTRY))})"
            )
        spec = REGISTRY[method]
        experts = tuple(str(e) for e in experts)
        if not experts:
            raise ConfigError(f"{key}.experts: a search needs at least one expert")
        if len(set(experts)) != len(experts):
            raise ConfigError(f"{key}.experts: expert names repeat ({', '.join(experts)})")
        if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 12:
            raise ConfigError(f"{key}.digits: expected an integer between 1 and 12, got {digits!r}")
        if not isinstance(params_spec, Mapping) or not params_spec:
            raise ConfigError(f"{key}.params: expected a mapping of at least one parameter to its bounds")
        known = [p.name for p in spec.params]
        for name in params_spec:
            if name not in known:
                raise ConfigError(
                    f"{key}.params.{name}: {method} has no parameter {name!r} "
                    f"(its parameters: {', '.join(known)})"
                )
        fixed = dict(fixed or {})
        for name in fixed:
            if name not in known:
                raise ConfigError(
                    f"{key}.fixed.{name}: {method} has no parameter {name!r} (its parameters: {', '.join(known)})"
                )
            if name in params_spec:
                raise ConfigError(f"{key}.fixed.{name}: {name!r} is searched (in {key}.params); it cannot also be fixed")

        dims: list[Dimension] = []
        per_expert: list[str] = []
        for p in spec.params:  # the method's order: the same space whatever the mapping's order
            if p.name not in params_spec:
                continue
            where = f"{key}.params.{p.name}"
            s = params_spec[p.name]
            if not isinstance(s, Mapping):
                raise ConfigError(f"{where}: expected {{low, high}} (and optionally per_expert: true), got {s!r}")
            unknown = [k for k in s if k not in _SPEC_KEYS]
            if unknown:
                raise ConfigError(
                    f"{where}.{unknown[0]}: unknown key (a searched parameter takes {', '.join(_SPEC_KEYS)})"
                )
            if p.kind not in ("float", "int"):
                raise ConfigError(f"{where}: {method}'s {p.name!r} is a {p.kind} parameter; only numbers can be searched")
            pe = s.get("per_expert", False)
            if not isinstance(pe, bool):
                raise ConfigError(f"{where}.per_expert: expected true or false, got {pe!r}")
            if pe and not p.per_expert:
                raise ConfigError(
                    f"{where}.per_expert: {method}'s {p.name!r} cannot vary per expert (one value for the whole merge)"
                )
            low, high = _bound(s, "low", where), _bound(s, "high", where)
            if p.kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
                raise ConfigError(f"{where}: {p.name!r} is an integer parameter; give integer bounds")
            if not low < high:
                raise ConfigError(f"{where}: low ({low:g}) must be smaller than high ({high:g})")
            for name, v in (("low", low), ("high", high)):
                outside = (
                    (p.low is not None and (v < p.low or (p.low_open and v == p.low)))
                    or (p.high is not None and (v > p.high or (p.high_open and v == p.high)))
                )
                if outside:
                    raise ConfigError(
                        f"{where}.{name}: {v:g} is outside {method}'s range for {p.name!r} {p.range_text()}"
                    )
            if pe:
                per_expert.append(p.name)
                dims += [Dimension(p.name, e, low, high, p.kind) for e in experts]
            else:
                dims.append(Dimension(p.name, None, low, high, p.kind))

        space = cls(method=method, experts=experts, dims=tuple(dims), fixed=fixed, digits=digits,
                    per_expert=tuple(per_expert))
        for label, x in (("lowest", 0.0), ("central", 0.5), ("highest", 1.0)):
            params = space.to_params(np.full(space.d, x))
            try:
                space.validate(params, has_base=has_base)
            except ConfigError as e:
                raise ConfigError(
                    f"{key}.params: the {label} point of the space is not a valid {method} merge ({e})"
                ) from None
        return space

    # ---------------------------------------------------------------------------------------
    @property
    def d(self) -> int:
        return len(self.dims)

    @property
    def names(self) -> list[str]:
        """The coordinates' names, e.g. ``["weight[math]", "weight[code]", "lambda"]``."""
        return [dim.name for dim in self.dims]

    def _check_x(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        if x.shape != (self.d,):
            raise ValueError(f"expected a vector of {self.d} coordinates ({', '.join(self.names)}), got shape {x.shape}")
        if not np.all(np.isfinite(x)) or np.any(x < -1e-9) or np.any(x > 1 + 1e-9):
            raise ValueError(f"a point of the search space lies in [0, 1]^{self.d}; got {x.tolist()}")
        return np.clip(x, 0.0, 1.0)

    def _value(self, dim: Dimension, xk: float) -> float | int:
        v = dim.low + xk * (dim.high - dim.low)
        if dim.kind == "int":
            return int(min(max(round(v), dim.low), dim.high))
        v = round_significant(v, self.digits)
        return float(min(max(v, dim.low), dim.high))

    def to_params(self, x) -> dict:
        """The merge parameters of point ``x`` (searched ones rounded; ``fixed`` ones added).
        Per-expert parameters are lists in expert order."""
        x = self._check_x(x)
        out: dict = dict(self.fixed)
        lists: dict[str, list] = {name: [] for name in self.per_expert}
        for dim, xk in zip(self.dims, x):
            v = self._value(dim, float(xk))
            if dim.expert is None:
                out[dim.param] = v
            else:
                lists[dim.param].append(v)
        out.update(lists)
        return out

    def to_vector(self, params: Mapping[str, Any]) -> np.ndarray:
        """The point of ``params`` in ``[0, 1]^d`` (a scalar given for a per-expert parameter
        applies to every expert). Values outside the bounds raise ``ValueError``."""
        out = np.empty(self.d)
        for k, dim in enumerate(self.dims):
            if dim.param not in params:
                raise ValueError(f"params has no {dim.param!r} (the space searches {', '.join(self.names)})")
            v = params[dim.param]
            if dim.expert is not None and isinstance(v, (list, tuple)):
                if len(v) != len(self.experts):
                    raise ValueError(f"params.{dim.param}: {len(v)} values for {len(self.experts)} experts")
                v = v[self.experts.index(dim.expert)]
            v = float(v)
            if not dim.low - 1e-12 <= v <= dim.high + 1e-12:
                raise ValueError(f"params.{dim.name}: {v:g} is outside the searched range [{dim.low:g}, {dim.high:g}]")
            out[k] = min(max((v - dim.low) / (dim.high - dim.low), 0.0), 1.0)
        return out

    def snap(self, x) -> np.ndarray:
        """The point actually evaluated for ``x``: ``to_vector(to_params(x))``."""
        return self.to_vector(self.to_params(x))

    def validate(self, params: Mapping[str, Any], has_base: bool = True) -> None:
        """Raise ConfigError if ``params`` is not a valid merge of the method (its spec's checks)."""
        from mergesweep.merge.methods import REGISTRY
        from mergesweep.merge.spec import resolve_params

        resolve_params(REGISTRY[self.method], params, len(self.experts), list(self.experts), has_base=has_base)

    # ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON form (recorded in every generation file; a resumed search checks it)."""
        return {
            "method": self.method,
            "experts": list(self.experts),
            "digits": self.digits,
            "fixed": dict(self.fixed),
            "per_expert": list(self.per_expert),
            "dims": [{"param": d.param, "expert": d.expert, "low": d.low, "high": d.high, "kind": d.kind}
                     for d in self.dims],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SearchSpace":
        return cls(
            method=data["method"],
            experts=tuple(data["experts"]),
            dims=tuple(Dimension(d["param"], d["expert"], float(d["low"]), float(d["high"]), d.get("kind", "float"))
                       for d in data["dims"]),
            fixed=dict(data.get("fixed", {})),
            digits=int(data.get("digits", DEFAULT_DIGITS)),
            per_expert=tuple(data.get("per_expert", ())),
        )


def _bound(spec: Mapping[str, Any], name: str, where: str) -> float:
    if name not in spec:
        raise ConfigError(f"{where}.{name}: missing (a searched parameter needs low and high)")
    v = spec[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise ConfigError(f"{where}.{name}: expected a finite number, got {v!r}")
    return float(v)
