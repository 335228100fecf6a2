"""Declarative method specs: parameters (type, default, valid range), inputs, statistics.

A merge method is a pure tensor kernel plus a :class:`MethodSpec`. The engine never looks
inside a kernel: it reads the spec to validate parameters, check the inputs (base required?
how many experts?), and decide whether extra streaming passes are needed for whole-model
statistics (a global top-k threshold, a global quantile), and then calls
``spec.merge(base, experts, params, ctx)`` once per parameter name.

This module and the method registry import no torch: the workflow plan validates every merge's
parameters on each snakemake call, and loading torch for that cost seconds. Kernels import
torch when first called; the per-tensor context lives in :mod:`mergesweep.merge.context`.

Parameter values given by users are resolved by :func:`resolve_params`:

* a scalar applies to every expert;
* a per-expert value (only for parameters declared ``per_expert``) is a list in expert order,
  ``{per_expert: [...]}``, or a mapping by expert name (experts not named get the default);
* unknown names, wrong types and out-of-range values raise :class:`ConfigError` naming
  ``params.<name>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from mergesweep.errors import ConfigError

PER_EXPERT_KEY = "per_expert"


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One method parameter.

    ``kind`` is ``"float"``, ``"int"``, ``"bool"`` or ``"str"``. ``low``/``high`` bound numeric
    values (``*_open`` makes a bound exclusive); ``choices`` restricts strings. A
    ``per_expert`` parameter may take a different value for each expert.
    """

    name: str
    kind: str
    default: Any
    help: str
    per_expert: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None

    def range_text(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.kind == "bool":
            return "true/false"
        if self.low is None and self.high is None:
            return "any"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        lb = "(" if (self.low_open or self.low is None) else "["
        hb = ")" if (self.high_open or self.high is None) else "]"
        return f"{lb}{lo}, {hi}{hb}"

    def check(self, value: Any, where: str) -> Any:
        """Type-check and range-check one scalar value; return it normalised."""
        if value is None and self.default is None:
            return None  # "automatic" (the method documents what that means)
        k = self.kind
        if k == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected true or false, got {value!r}")
            return value
        if k == "str":
            if not isinstance(value, str):
                raise ConfigError(f"{where}: expected a string, got {value!r}")
            if self.choices and value not in self.choices:
                raise ConfigError(f"{where}: {value!r} is not {self.range_text()}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if k == "int":
            if isinstance(value, float):
                if not value.is_integer():
                    raise ConfigError(f"{where}: expected an integer, got {value!r}")
                value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"{where}: {value!r} is not a finite number")
        bad = (
            (self.low is not None and (value < self.low or (self.low_open and value == self.low)))
            or (self.high is not None and (value > self.high or (self.high_open and value == self.high)))
        )
        if bad:
            raise ConfigError(f"{where}: {value!r} is out of range {self.range_text()}")
        return value


# --------------------------------------------------------------------------------------------
# whole-model statistics
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StatRequest:
    """A whole-model quantity a method needs before it can merge any tensor.

    ``kind``:
      * ``"kth"``  - per expert, the value of ascending rank ``rank(n, i)`` (0-based) among all
        ``n`` elements the method's ``stat_values`` produced for expert ``i`` over the model;
      * ``"max"`` / ``"min"`` - per expert, the maximum / minimum of those values;
      * ``"sum"`` - per expert, the sum of those values (float64; a global norm: sum of squares).

    Requests of a later ``stage`` may use the results of earlier stages (``ctx.stats``). The
    engine computes ``kth`` exactly with a two-pass radix select over the float bit patterns
    (memory: one 65536-bin histogram per request and expert, never the values themselves).
    """

    key: str
    kind: str = "kth"
    stage: int = 0
    rank: Callable[[int, int], int] | None = None


# --------------------------------------------------------------------------------------------
# identity points
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    """A parameter point at which a method returns one of its inputs unchanged.

    ``params`` (merged over the defaults) applied to ``n_experts`` experts returns the base
    (``returns="base"``) or expert 0 (``returns="expert"``). ``atol``: 0 means bit for bit;
    otherwise the largest absolute error allowed on standard-normal test tensors (float32
    rounding: ``base + (expert - base)`` is not always ``expert``; an SVD is not exact). The
    registry tests check every declared point on random tensors.
    """

    params: Mapping[str, Any]
    returns: str
    n_experts: int = 1
    atol: float = 0.0

    def __post_init__(self):
        if self.returns not in ("base", "expert"):
            raise ValueError(f"Identity.returns must be 'base' or 'expert', not {self.returns!r}")

    def describe(self) -> str:
        pts = ", ".join(f"{k} {_short(v)}" for k, v in self.params.items()) or "defaults"
        who = "the base" if self.returns == "base" else ("the expert" if self.n_experts == 1 else "expert 0")
        experts = "one expert" if self.n_experts == 1 else f"{self.n_experts} experts"
        return f"{pts}, {experts}: {who}" + ("" if self.atol == 0 else f" (to {self.atol:g})")


def _short(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value) if not isinstance(value, str) else repr(value)


# --------------------------------------------------------------------------------------------
# the spec
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    """Everything the engine, the planner, the CLI and the tests need to know about a method.

    ``base``: ``"required"``, ``"optional"`` or ``"unused"``. ``merge(base, experts, params, ctx)``
    is the kernel adapter: float32 tensors in, one float32 tensor out (``ctx`` is a
    :class:`mergesweep.merge.context.TensorContext`). It must import torch only when called:
    the registry is imported to validate parameters, without torch. ``statistics(params, n)``
    lists the whole-model quantities needed (may be empty for some parameter values) and
    ``stat_values(key, base, experts, params, ctx)`` returns, per expert, the tensor whose
    elements enter statistic ``key`` for one parameter name. ``validate(params, n_experts,
    has_base)`` performs cross-parameter checks and raises :class:`ConfigError`;
    ``check_layout(params, num_layers)`` checks parameters against the model (layer indices).
    ``inputs_for(name, params, n_experts)``, when given, lists the experts whose tensor ``name``
    the kernel reads (the others are not read and arrive as ``None``).

    Declarations checked over the whole registry by ``tests/test_methods_registry.py`` (a method
    without them fails it):

    * ``formula``: one line for the methods table; ``doc``: the module docstring (formula and
      paper in full);
    * ``order_invariant``: whether the merged tensor is (mathematically) the same when the
      experts are permuted together with their per-expert parameters. Methods whose random
      masks are seeded by expert index are not;
    * ``identities``: parameter points at which the method returns the base or the expert
      unchanged (:class:`Identity`).

    ``composition`` names the shared parts a task-vector method is built from (sparsify, sign
    election, combine, rescale); ``mergekit`` lists where it departs from mergekit 0.1.5's
    method of the same name (``""``: no such method in mergekit).
    """

    name: str
    summary: str
    paper: str
    params: tuple[Param, ...]
    merge: Callable
    base: str = "required"
    min_experts: int = 1
    max_experts: int | None = None
    statistics: Callable[[dict, int], list[StatRequest]] | None = None
    stat_values: Callable | None = None
    validate: Callable[[dict, int, bool], None] | None = None
    check_layout: Callable[[dict, int | None], None] | None = None
    inputs_for: Callable[[str, dict, int], Sequence[int]] | None = None
    deviations: str = ""
    doc: str = ""
    formula: str = ""
    order_invariant: bool | None = None
    identities: tuple[Identity, ...] = ()
    composition: Mapping[str, str] | None = None
    mergekit: str = ""
    #: part of every merged model id of this method: bump it when the kernel's output changes for
    #: the same parameters, so merges cached under the old ids are not reused
    revision: int = 1
    #: data-aware methods: ``data_stats(params) -> ("gram", "fisher", ...)``, the kinds of the
    #: ``stats`` stage this method reads *per expert* for these parameters (empty: none). The plan
    #: schedules one stats job per (expert, kind, calibration data, settings); the engine opens
    #: each expert's statistics file and hands the kernel, for the tensor it merges,
    #: ``ctx.expert_stats[kind][i]`` (None where expert i's file has no entry for that tensor).
    data_stats: Callable[[dict], Sequence[str]] | None = None
    #: whole-model methods (forward passes through the models being merged: RegMean++, PLeaS,
    #: Localize-and-Stitch's mask training): ``merge_model(inputs) -> WholeModelResult``
    #: (:mod:`mergesweep.merge.whole`). ``whole_model(params)`` says whether these parameters use
    #: it (None: always, when ``merge_model`` is given); the plan then gives the merge job each
    #: expert's calibration data instead of streaming it tensor by tensor.
    merge_model: Callable | None = None
    whole_model: Callable[[dict], bool] | None = None
    #: LoRA-native methods (LoRA-LEGO, RMM, KnOTS): they read each expert's low-rank factors, not
    #: dense tensors, and write an adapter (or another low-rank artefact).
    #: ``merge_adapters(inputs) -> result`` (:mod:`mergesweep.merge.lora_merge`): the engine hands the
    #: whole merge to :func:`mergesweep.merge.lora_merge.merge_adapters` when this is set.
    merge_adapters: Callable | None = None
    #: a reversible merge (RMM): the output is a basis plus per-task coefficients, not a model; the
    #: workflow reverts each expert's task from it (``mergesweep revert``) and evaluates those
    reversible: bool = False

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def experts_text(self) -> str:
        if self.max_experts is None:
            return f">= {self.min_experts}"
        if self.max_experts == self.min_experts:
            return str(self.min_experts)
        return f"{self.min_experts}-{self.max_experts}"

    def check_inputs(self, n_experts: int, has_base: bool) -> None:
        """Raise ConfigError if the number of experts or the presence of a base is wrong."""
        if self.base == "required" and not has_base:
            raise ConfigError(f"base: method '{self.name}' needs a base model")
        if n_experts < self.min_experts or (self.max_experts is not None and n_experts > self.max_experts):
            raise ConfigError(
                f"experts: method '{self.name}' takes {self.experts_text()} experts, got {n_experts}"
            )

    def requests(self, params: dict, n_experts: int) -> list[StatRequest]:
        return list(self.statistics(params, n_experts)) if self.statistics else []

    def stats_kinds(self, params: dict) -> tuple[str, ...]:
        """The stats-stage kinds this method reads per expert with these (kernel) parameters."""
        return tuple(self.data_stats(params)) if self.data_stats else ()

    def uses_whole_model(self, params: dict) -> bool:
        """Whether these (kernel) parameters merge through ``merge_model`` (calibration data)."""
        if self.merge_model is None:
            return False
        return True if self.whole_model is None else bool(self.whole_model(params))


# --------------------------------------------------------------------------------------------
# parameter resolution
# --------------------------------------------------------------------------------------------
def resolve_params(
    spec: MethodSpec,
    params: Mapping[str, Any] | None,
    n_experts: int,
    expert_names: Sequence[str] | None = None,
    *,
    has_base: bool = True,
) -> tuple[dict, dict]:
    """Validate ``params`` against ``spec``.

    Returns ``(kernel_params, record_params)``: the first has every parameter, per-expert ones
    as lists of length ``n_experts``; the second is the canonical form recorded in metadata and
    hashed into model ids (defaults filled in, per-expert values as lists in expert order, a
    scalar kept scalar).
    """
    params = dict(params or {})
    names = list(expert_names) if expert_names is not None else [str(i) for i in range(n_experts)]
    known = {p.name for p in spec.params}
    for key in params:
        if key not in known:
            raise ConfigError(
                f"params.{key}: unknown parameter for method '{spec.name}' "
                f"(known: {', '.join(sorted(known)) or 'none'})"
            )
    kernel: dict = {}
    record: dict = {}
    for p in spec.params:
        where = f"params.{p.name}"
        value = params.get(p.name, p.default)
        if p.per_expert:
            if isinstance(value, Mapping):
                if set(value) == {PER_EXPERT_KEY}:
                    value = value[PER_EXPERT_KEY]
                    if not isinstance(value, (list, tuple)):
                        raise ConfigError(f"{where}.{PER_EXPERT_KEY}: expected a list in expert order")
                else:
                    unknown = [k for k in value if str(k) not in names]
                    if unknown:
                        raise ConfigError(
                            f"{where}: {unknown[0]!r} is not an expert name (experts: {', '.join(names)})"
                        )
                    by_name = {str(k): v for k, v in value.items()}
                    value = [by_name.get(n, p.default) for n in names]
            if isinstance(value, (list, tuple)):
                if len(value) != n_experts:
                    raise ConfigError(
                        f"{where}: {len(value)} per-expert values for {n_experts} experts"
                    )
                vals = [p.check(v, f"{where}[{i}]") for i, v in enumerate(value)]
                kernel[p.name] = vals
                record[p.name] = vals
            else:
                v = p.check(value, where)
                kernel[p.name] = [v] * n_experts
                record[p.name] = v
        else:
            if isinstance(value, (list, tuple, Mapping)):
                raise ConfigError(
                    f"{where}: expected a single value ({p.range_text()}); '{p.name}' cannot vary "
                    f"per expert in method '{spec.name}' (a list is a grid axis only in a sweep config)"
                )
            v = p.check(value, where)
            kernel[p.name] = v
            record[p.name] = v
    if spec.validate:
        spec.validate(kernel, n_experts, has_base)
    return kernel, record
