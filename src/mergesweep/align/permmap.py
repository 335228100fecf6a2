"""Permutation maps: which hidden unit of a model sits where in the reference's basis.

Every permutation is a **gather index**: aligned tensor ``new[..., i, ...] = old[..., P[i], ...]``
along the permuted axis. A map stores, for a model with ``L`` layers,

===========================  ===================  ==============================================
key                          shape                meaning
===========================  ===================  ==============================================
``residual``                 ``[hidden]``         residual stream
``layers.{l}.mlp``           ``[intermediate]``   MLP hidden units of layer ``l``
``layers.{l}.q_heads``       ``[heads]``          query heads (GQA-respecting, see below)
``layers.{l}.kv_heads``      ``[kv_heads]``       key/value heads
``layers.{l}.v_dims``        ``[kv_heads, hd]``   dims inside value head at *new* position a
===========================  ===================  ==============================================

Validity (checked on load): each is a permutation; ``q_heads[j] // g == kv_heads[j // g]`` (a query
head stays with the kv head it reads); every row of ``v_dims`` is a permutation of ``head_dim``.

Expanded row/column indices (``hd`` = head_dim, ``g`` = query heads per kv head):

* q rows: ``q_heads[j] * hd + d``;  k rows: ``kv_heads[a] * hd + d``
* v rows: ``kv_heads[a] * hd + v_dims[a, d]``
* o_proj columns: ``q_heads[j] * hd + v_dims[j // g, d]``

On disk: a safetensors file of int64 tensors with the JSON metadata (method, iterations,
objective before/after, identity fraction per group, architecture) under the header key
``mergesweep_align``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from mergesweep.align.spec import AlignError, ArchSpec

FORMAT = "mergesweep-permmap/1"
META_KEY = "mergesweep_align"


def _is_perm(t: torch.Tensor, n: int) -> bool:
    return t.dim() == 1 and t.numel() == n and torch.equal(torch.sort(t).values, torch.arange(n, dtype=t.dtype))


@dataclass
class PermMap:
    """A validated set of permutations for one architecture (see the module docstring)."""

    spec: ArchSpec
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    validate: bool = True
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.tensors = {k: v.to(torch.int64).contiguous() for k, v in self.tensors.items()}
        if self.validate:
            self.check()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def identity(cls, spec: ArchSpec, meta: Mapping[str, Any] | None = None) -> "PermMap":
        t = {"residual": torch.arange(spec.hidden)}
        for l in range(spec.num_layers):
            t[f"layers.{l}.mlp"] = torch.arange(spec.intermediate)
            t[f"layers.{l}.q_heads"] = torch.arange(spec.num_heads)
            t[f"layers.{l}.kv_heads"] = torch.arange(spec.num_kv_heads)
            t[f"layers.{l}.v_dims"] = torch.arange(spec.head_dim).repeat(spec.num_kv_heads, 1)
        return cls(spec, t, dict(meta or {}))

    @classmethod
    def random(cls, spec: ArchSpec, seed: int = 0) -> "PermMap":
        """A uniformly random *valid* map (every group, GQA structure respected)."""
        gen = torch.Generator().manual_seed(seed)
        rp = lambda n: torch.randperm(n, generator=gen)  # noqa: E731
        g = spec.group_size
        t = {"residual": rp(spec.hidden)}
        for l in range(spec.num_layers):
            t[f"layers.{l}.mlp"] = rp(spec.intermediate)
            kv = rp(spec.num_kv_heads)
            t[f"layers.{l}.kv_heads"] = kv
            t[f"layers.{l}.q_heads"] = torch.cat([kv[a] * g + rp(g) for a in range(spec.num_kv_heads)])
            t[f"layers.{l}.v_dims"] = torch.stack([rp(spec.head_dim) for _ in range(spec.num_kv_heads)])
        return cls(spec, t, {"method": "random", "seed": seed})

    # -- validation -----------------------------------------------------------------------------
    def check(self) -> None:
        s = self.spec
        expected = {"residual": (s.hidden,)}
        for l in range(s.num_layers):
            expected[f"layers.{l}.mlp"] = (s.intermediate,)
            expected[f"layers.{l}.q_heads"] = (s.num_heads,)
            expected[f"layers.{l}.kv_heads"] = (s.num_kv_heads,)
            expected[f"layers.{l}.v_dims"] = (s.num_kv_heads, s.head_dim)
        missing = sorted(set(expected) - set(self.tensors))
        extra = sorted(set(self.tensors) - set(expected))
        if missing or extra:
            raise AlignError(f"permutation map: missing {missing[:5]} / unexpected {extra[:5]} entries")
        for k, shape in expected.items():
            t = self.tensors[k]
            if tuple(t.shape) != shape:
                raise AlignError(f"permutation map: '{k}' has shape {tuple(t.shape)}, expected {shape}")
            rows = t if t.dim() == 2 else t[None]
            for r in rows:
                if not _is_perm(r, shape[-1]):
                    raise AlignError(f"permutation map: '{k}' is not a permutation of {shape[-1]}")
        g = s.group_size
        for l in range(s.num_layers):
            q, kv = self.tensors[f"layers.{l}.q_heads"], self.tensors[f"layers.{l}.kv_heads"]
            if not torch.equal(q // g, kv.repeat_interleave(g)):
                raise AlignError(
                    f"permutation map: layers.{l}.q_heads moves a query head away from the key/value "
                    f"head it shares (grouped-query attention, {g} query heads per kv head)"
                )

    # -- expanded indices -----------------------------------------------------------------------
    def index(self, kind: str, layer: int | None = None) -> torch.Tensor:
        """The gather index along one axis: kind in residual|mlp|q|kv|v|o (see module docstring)."""
        key = (kind, layer)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        s, hd, g = self.spec, self.spec.head_dim, self.spec.group_size
        ar = torch.arange(hd)
        if kind == "residual":
            idx = self.tensors["residual"]
        elif kind == "mlp":
            idx = self.tensors[f"layers.{layer}.mlp"]
        else:
            q = self.tensors[f"layers.{layer}.q_heads"]
            kv = self.tensors[f"layers.{layer}.kv_heads"]
            vd = self.tensors[f"layers.{layer}.v_dims"]
            if kind == "q":
                idx = (q[:, None] * hd + ar).reshape(-1)
            elif kind == "kv":
                idx = (kv[:, None] * hd + ar).reshape(-1)
            elif kind == "v":
                idx = (kv[:, None] * hd + vd).reshape(-1)
            elif kind == "o":
                idx = (q[:, None] * hd + vd[torch.arange(s.num_heads) // g]).reshape(-1)
            else:
                raise ValueError(kind)
        self._cache[key] = idx
        return idx

    # -- algebra --------------------------------------------------------------------------------
    def inverse(self) -> "PermMap":
        """The map that undoes this one: ``apply(inverse, apply(self, W)) == W``."""
        s = self.spec
        t = {"residual": torch.argsort(self.tensors["residual"])}
        for l in range(s.num_layers):
            t[f"layers.{l}.mlp"] = torch.argsort(self.tensors[f"layers.{l}.mlp"])
            t[f"layers.{l}.q_heads"] = torch.argsort(self.tensors[f"layers.{l}.q_heads"])
            kv_inv = torch.argsort(self.tensors[f"layers.{l}.kv_heads"])
            t[f"layers.{l}.kv_heads"] = kv_inv
            vd = self.tensors[f"layers.{l}.v_dims"]
            t[f"layers.{l}.v_dims"] = torch.stack([torch.argsort(vd[kv_inv[b]]) for b in range(s.num_kv_heads)])
        return PermMap(s, t, {"method": "inverse"}, validate=self.validate)

    def identity_fraction(self) -> dict[str, float]:
        """Fraction of units left in place, per group and over all units."""
        s = self.spec
        fixed: dict[str, list[int]] = {"residual": [0, 0], "mlp": [0, 0], "attn_heads": [0, 0], "v_dims": [0, 0]}

        def add(group: str, p: torch.Tensor) -> None:
            ident = torch.arange(p.shape[-1]).expand_as(p)
            fixed[group][0] += int((p == ident).sum())
            fixed[group][1] += p.numel()

        add("residual", self.tensors["residual"])
        for l in range(s.num_layers):
            add("mlp", self.tensors[f"layers.{l}.mlp"])
            add("attn_heads", self.tensors[f"layers.{l}.q_heads"])
            add("v_dims", self.tensors[f"layers.{l}.v_dims"])
        out = {k: (a / b if b else 1.0) for k, (a, b) in fixed.items()}
        tot = sum(b for _, b in fixed.values())
        out["overall"] = sum(a for a, _ in fixed.values()) / tot if tot else 1.0
        return out

    def equals(self, other: "PermMap") -> bool:
        return self.tensors.keys() == other.tensors.keys() and all(
            torch.equal(v, other.tensors[k]) for k, v in self.tensors.items()
        )

    # -- I/O ------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        meta = dict(self.meta)
        meta["arch"] = self.spec.as_dict()
        meta["identity_fraction"] = self.identity_fraction()
        header = {"format": FORMAT, META_KEY: json.dumps(meta, sort_keys=True, default=str)}
        return save(self.tensors, metadata=header)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary sibling, then rename)."""
        from mergesweep.atomic import atomic_file

        with atomic_file(path, "wb") as f:
            f.write(self.to_bytes())


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a map file, without reading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except FileNotFoundError as e:
        raise AlignError(f"{path}: permutation map not found") from e
    except Exception as e:
        raise AlignError(f"{path}: cannot be read as a safetensors permutation map ({e})") from e
    if header.get("format") != FORMAT or META_KEY not in header:
        raise AlignError(f"{path}: not a mergesweep permutation map (header format {header.get('format')!r})")
    return json.loads(header[META_KEY])


def load(path: str | os.PathLike) -> PermMap:
    from safetensors.torch import load_file

    meta = read_meta(path)
    arch = meta.pop("arch", None)
    if not arch:
        raise AlignError(f"{path}: permutation map has no 'arch' in its metadata")
    spec = ArchSpec(**arch)
    try:
        return PermMap(spec, load_file(str(path)), meta)
    except AlignError as e:
        raise AlignError(f"{path}: {e}") from e
