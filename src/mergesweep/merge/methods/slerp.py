"""Spherical linear interpolation between two models, tensor by tensor.

Each tensor is treated as one vector. With v0, v1 the two endpoints (the base and the one
expert, or the two experts when no base is given) and Omega the angle between them,

    cos Omega = <v0, v1> / (|v0| |v1|)
    slerp(t)  = sin((1 - t) Omega) / sin Omega * v0 + sin(t Omega) / sin Omega * v1

and when the vectors are (anti)parallel to within |cos Omega| > 0.9995, or one is zero, plain
linear interpolation ``(1 - t) v0 + t v1``. ``t = 0`` returns v0 and ``t = 1`` returns v1 exactly.

Paper: Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985 (the formula);
used for LLM merging by mergekit (Goddard et al. 2024, arXiv:2403.13257).
"""

from __future__ import annotations

import math

from mergesweep.errors import ConfigError
from mergesweep.merge.spec import Identity, MethodSpec, Param

DOT_THRESHOLD = 0.9995


def slerp(v0, v1, t: float):
    """Slerp of two float32 tensors (each one vector)."""
    import torch

    if t == 0.0:
        return v0.clone()
    if t == 1.0:
        return v1.clone()
    n0 = float(torch.linalg.vector_norm(v0, dtype=torch.float64))
    n1 = float(torch.linalg.vector_norm(v1, dtype=torch.float64))
    if n0 > 0 and n1 > 0:
        dot = float(torch.sum(v0.double() * v1.double())) / (n0 * n1)
        dot = max(-1.0, min(1.0, dot))
    else:
        dot = 1.0
    if abs(dot) > DOT_THRESHOLD:
        return torch.lerp(v0, v1, t)
    omega = math.acos(dot)
    s = math.sin(omega)
    c0 = math.sin((1.0 - t) * omega) / s
    c1 = math.sin(t * omega) / s
    return v0.mul(c0).add_(v1, alpha=c1)


def _merge(base, experts, p, ctx):
    v0, v1 = (base, experts[0]) if base is not None else (experts[0], experts[1])
    return slerp(v0, v1, p["t"])


def _validate(p, n, has_base):
    if has_base and n != 1:
        raise ConfigError(f"experts: slerp with a base interpolates base -> one expert; got {n} experts")
    if not has_base and n != 2:
        raise ConfigError(f"experts: slerp without a base needs exactly 2 experts, got {n}")


SPEC = MethodSpec(
    name="slerp",
    summary="spherical interpolation between two models (base -> expert, or expert 0 -> expert 1)",
    paper="Shoemake 1985 (slerp); as used in mergekit (arXiv:2403.13257)",
    params=(Param("t", "float", 0.5, "interpolation position: 0 = first model, 1 = second", low=0.0, high=1.0),),
    merge=_merge,
    base="optional",
    min_experts=1,
    max_experts=2,
    validate=_validate,
    doc=__doc__,
    formula="`sin((1-t)W)/sin W * v0 + sin(tW)/sin W * v1` (lerp when nearly parallel)",
    order_invariant=False,  # t measures from the first model: swapping the two is t -> 1 - t
    identities=(Identity({"t": 0.0}, "base", 1), Identity({"t": 1.0}, "expert", 1)),
    deviations="a scalar `t` (mergekit's per-layer gradients are not supported)",
    mergekit="a scalar `t` only (mergekit also takes per-layer gradients); without a base the first expert is "
             "the start point (mergekit requires a base)",
)
