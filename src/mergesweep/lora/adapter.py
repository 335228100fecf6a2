"""PEFT LoRA adapters: reading, validating, and the dense view "base + ΔW" the merge engine streams.

An adapter directory is what ``peft`` writes with ``save_pretrained``: ``adapter_config.json``
(a :class:`peft.LoraConfig`) and ``adapter_model.safetensors`` holding, per adapted linear layer
``<module>`` of the base (e.g. ``model.layers.0.self_attn.q_proj``), the two factors

* ``base_model.model.<module>.lora_A.weight``  ``A`` of shape ``[r, in]``,
* ``base_model.model.<module>.lora_B.weight``  ``B`` of shape ``[out, r]``.

The weight it changes is the base's ``<module>.weight`` ``W`` (``[out, in]``); the adapted model
computes with (LoRA, Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models")

    W' = W + ΔW,   ΔW = s · B @ A,   s = α / r            (rsLoRA, ``use_rslora``: s = α / √r)

where ``r`` and ``α`` are the module's rank and ``lora_alpha``: the config's ``r`` / ``lora_alpha``
unless a key of ``rank_pattern`` / ``alpha_pattern`` matches the module name (peft's rule: key
``k`` matches module ``m`` when ``m`` is ``k`` or ends with ``.k``, ``k`` read as a regular
expression). With ``fan_in_fan_out`` (GPT-2's Conv1D layers) the stored weight is ``[in, out]``
and ΔW is transposed.

The config's fields that matter here are read from the JSON with peft's defaults for unset
ones (:data:`LORA_DEFAULTS`, checked against ``peft.LoraConfig()`` by the tests) - importing peft
costs ~7 s and ~160 MB of RSS (it imports transformers' modelling code), more than a streamed
merge of a 135M model needs; with ``peft=True`` (the fetch stage's verification) the config is
parsed by ``peft.LoraConfig.from_pretrained`` itself, so an adapter entering the workflow is one
peft accepts. Tensors are read one at a time with mergesweep's own safetensors reader
(:class:`mergesweep.checkpoints.layout.CheckpointReader`'s reads, no whole-file map). Features that
change the model other than by ``W + ΔW`` on linear weights are refused with an
:class:`AdapterError` naming the file and the key: ``modules_to_save``, DoRA (``use_dora``), bias
training (``bias`` other than ``"none"``, ``lora_bias``), embedding / convolution LoRA
(``lora_embedding_A``, non-2-D factors), trainable tokens, parameter targeting, activated LoRA,
QA-LoRA, layer replication and the other LoRA variants, and non-LoRA peft types.

:class:`LoraCheckpoint` presents base + adapter as one dense checkpoint with
:class:`~mergesweep.checkpoints.layout.CheckpointReader`'s interface: ``get(name)`` adds ΔW
(computed in float32 on the fly, then cast to the base tensor's dtype) to each adapted weight and
returns the base's tensor otherwise, so every streaming merge method runs on LoRA experts with
one tensor's ΔW live at a time, never a densified model. :func:`open_checkpoint` is how the
merge engine opens its inputs.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from mergesweep.checkpoints.layout import CheckpointError, CheckpointReader, read_safetensors_header

if TYPE_CHECKING:
    import torch

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LORA_DEFAULTS", "PEFT_PREFIX", "AdapterError", "AdapterReader",
           "LoraCheckpoint", "is_adapter", "open_checkpoint", "pattern_key", "require_dense_experts"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: what peft puts before a module name of the base model in the adapter's tensor keys
PEFT_PREFIX = "base_model.model."
_FACTOR_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
#: config fields whose (truthy) value makes the adapter more than W + ΔW on linear weights
_UNSUPPORTED = {
    "modules_to_save": "modules_to_save (fully trained copies of base modules)",
    "use_dora": "DoRA (use_dora: a learned magnitude rescales W + ΔW)",
    "lora_bias": "lora_bias (a trained bias in lora_B)",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens: active after given tokens only)",
    "use_qalora": "QA-LoRA (use_qalora: pooled inputs)",
    "layer_replication": "layer_replication (the adapted model has more layers than the base)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
}


class AdapterError(CheckpointError):
    """A LoRA adapter is missing, malformed, unsupported or does not fit its base. The message
    names the adapter's file and the key, module or tensor."""


def is_adapter(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PEFT adapter directory (it holds ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def pattern_key(keys, module: str) -> str | None:
    """The first key of a peft ``rank_pattern`` / ``alpha_pattern`` that matches ``module``
    (``re.match(rf"(.*\\.)?({key})$", module)``: the module's name or a dotted suffix of it, the key
    read as a regular expression - peft's ``get_pattern_key``), or None."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


#: the ``LoraConfig`` fields mergesweep reads, with peft's defaults for a config that omits them
#: (``tests/test_lora_adapter.py`` checks them against ``peft.LoraConfig()``)
LORA_DEFAULTS: dict[str, Any] = {
    "r": 8, "lora_alpha": 8, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
    "rank_pattern": {}, "alpha_pattern": {}, "target_modules": None, "base_model_name_or_path": None,
    "modules_to_save": None, "use_dora": False, "lora_bias": False, "trainable_token_indices": None,
    "target_parameters": None, "alora_invocation_tokens": None, "use_qalora": False, "layer_replication": None,
    "arrow_config": None, "use_bdlora": None, "velora_config": None, "monteclora_config": None, "kasa_config": None,
}


class LoraFields(SimpleNamespace):
    """The fields of :data:`LORA_DEFAULTS` of an ``adapter_config.json`` (attribute access, like a
    ``peft.LoraConfig``)."""


def _read_lora_fields(file: Path, raw: dict) -> LoraFields:
    """:data:`LORA_DEFAULTS` overridden by ``raw``; each value's type checked (error naming the key)."""
    vals = {k: (raw[k] if raw.get(k) is not None else (dict(d) if isinstance(d, dict) else d))
            for k, d in LORA_DEFAULTS.items()}
    r = vals["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(f"{file}: 'r' = {r!r}: expected a positive integer")
    if isinstance(vals["lora_alpha"], bool) or not isinstance(vals["lora_alpha"], (int, float)):
        raise AdapterError(f"{file}: 'lora_alpha' = {vals['lora_alpha']!r}: expected a number")
    for key, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        pat = vals[key]
        if not isinstance(pat, dict) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in pat.values()):
            raise AdapterError(f"{file}: '{key}' = {pat!r}: expected a mapping of module pattern -> number")
    tm = vals["target_modules"]
    if isinstance(tm, list):
        vals["target_modules"] = set(tm)
    return LoraFields(**vals)


def _peft_lora_config(path: Path):
    """``peft.LoraConfig.from_pretrained`` of the adapter directory ``path``."""
    from peft import LoraConfig

    try:
        return LoraConfig.from_pretrained(str(path))
    except (TypeError, ValueError, KeyError) as e:
        raise AdapterError(f"{path / ADAPTER_CONFIG}: not a valid peft LoraConfig ({e})") from e


class _WeightsFile(CheckpointReader):
    """One safetensors file read tensor by tensor with :class:`CheckpointReader`'s reads (its
    header parsed by :func:`read_safetensors_header`); no ``config.json`` is involved."""

    def __init__(self, file: Path, label: str):  # noqa: D107 - CheckpointReader's state, one file
        self.path = Path(file)
        self.label = label
        self.config = {}
        self.entries = read_safetensors_header(self.path)
        self._fds = {}


class AdapterReader:
    """A PEFT LoRA adapter directory, validated when opened, read one module at a time.

    ``modules()`` are the *base* weight names the adapter changes (``...q_proj.weight``);
    ``factors(name)`` gives ``(B [out, r], A [r, in])`` as stored (float32, unscaled) and
    ``delta(name)`` the update ``ΔW = s · B @ A`` (module docstring). Use as a context manager.
    Raises :class:`AdapterError` naming the file and key for anything it cannot represent.
    ``peft=True`` parses the config with ``peft.LoraConfig`` itself (slow import; module docstring).
    """

    def __init__(self, path: str | os.PathLike, label: str | None = None, *, peft: bool = False):
        self.path = Path(path)
        self.label = label or str(self.path)
        where = f"{label}: " if label else ""
        if not self.path.is_dir():
            raise AdapterError(f"{where}adapter directory {self.path} not found")
        self.config_file = self.path / ADAPTER_CONFIG
        self.weights_file = self.path / ADAPTER_WEIGHTS
        if not self.config_file.is_file():
            raise AdapterError(f"{where}{self.config_file}: missing: a PEFT adapter directory needs "
                               f"{ADAPTER_CONFIG} next to {ADAPTER_WEIGHTS}")
        if not self.weights_file.is_file():
            other = " (only safetensors adapters are read; adapter_model.bin is not)" \
                if (self.path / "adapter_model.bin").exists() else ""
            raise AdapterError(f"{where}{self.weights_file}: missing: a PEFT adapter directory needs "
                               f"{ADAPTER_WEIGHTS} next to {ADAPTER_CONFIG}{other}")
        try:
            raw = json.loads(self.config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterError(f"{self.config_file}: not valid JSON ({e})") from e
        if not isinstance(raw, dict):
            raise AdapterError(f"{self.config_file}: expected a JSON object")
        peft_type = raw.get("peft_type")
        if str(peft_type).upper() != "LORA":
            raise AdapterError(f"{self.config_file}: peft_type is {peft_type!r}; only LoRA adapters "
                               "(peft_type 'LORA') are read")
        self.config: dict = raw
        #: the config's fields (:data:`LORA_DEFAULTS`); a ``peft.LoraConfig`` with ``peft=True``
        self.lora_config = _peft_lora_config(self.path) if peft else _read_lora_fields(self.config_file, raw)
        self._check_features()
        self._file = _WeightsFile(self.weights_file, self.label)
        self._modules = self._pair_factors()

    # -- validation ---------------------------------------------------------------------------
    def _check_features(self) -> None:
        cfg = self.lora_config
        for key, what in _UNSUPPORTED.items():
            if getattr(cfg, key, None):
                raise AdapterError(f"{self.config_file}: '{key}' = {getattr(cfg, key)!r}: {what} is not "
                                   "supported (mergesweep merges adapters that only add ΔW = s·B·A to linear weights)")
        if (cfg.bias or "none") != "none":
            raise AdapterError(f"{self.config_file}: 'bias' = {cfg.bias!r}: trained biases are not supported "
                               "(only bias: 'none')")

    def _pair_factors(self) -> dict[str, dict]:
        """``{base weight name: {"module", "A", "B" (keys), "rank"}}``, every key checked."""
        found: dict[str, dict[str, str]] = {}
        for key in self._file.keys():
            if not key.startswith(PEFT_PREFIX):
                raise AdapterError(f"{self.weights_file}: tensor '{key}' is not a PEFT LoRA key "
                                   f"(expected '{PEFT_PREFIX}<module>.lora_A.weight' / '.lora_B.weight')")
            rest = key[len(PEFT_PREFIX):]
            m = _FACTOR_RE.match(rest)
            if m is None:
                if ".lora_embedding_" in rest:
                    what = "embedding LoRA (lora_embedding_A/B)"
                elif ".lora_magnitude_vector" in rest:
                    what = "DoRA (lora_magnitude_vector)"
                elif rest.endswith(".bias"):
                    what = "a trained bias"
                else:
                    what = "a tensor that is not a LoRA factor (modules_to_save, trainable tokens?)"
                raise AdapterError(f"{self.weights_file}: tensor '{key}' is {what}; not supported")
            found.setdefault(m["module"], {})[m["which"]] = key
        modules: dict[str, dict] = {}
        for module in sorted(found, key=_natural_key):
            keys = found[module]
            for which, other in (("A", "B"), ("B", "A")):
                if which not in keys:
                    raise AdapterError(f"{self.weights_file}: module '{module}' has lora_{other} "
                                       f"('{keys[other]}') but no lora_{which}")
            sa, sb = self._file.shape(keys["A"]), self._file.shape(keys["B"])
            if len(sa) != 2 or len(sb) != 2:
                raise AdapterError(f"{self.weights_file}: module '{module}': lora_A {list(sa)} / lora_B {list(sb)} "
                                   "are not matrices (convolution LoRA is not supported)")
            if sa[0] != sb[1]:
                raise AdapterError(f"{self.weights_file}: module '{module}': rank mismatch: lora_A '{keys['A']}' "
                                   f"has {sa[0]} rows but lora_B '{keys['B']}' has {sb[1]} columns")
            want, key = self._configured(module, "rank_pattern", "r")
            if sa[0] != want:
                src = f"rank_pattern['{key}']" if key is not None else "r"
                raise AdapterError(f"{self.weights_file}: module '{module}': lora_A/lora_B have rank {sa[0]} but "
                                   f"{self.config_file.name} says {src} = {want}")
            if not self._file.is_floating_point(keys["A"]) or not self._file.is_floating_point(keys["B"]):
                raise AdapterError(f"{self.weights_file}: module '{module}': LoRA factors must be floating point")
            modules[module + ".weight"] = {"module": module, "A": keys["A"], "B": keys["B"], "rank": sa[0]}
        if not modules:
            raise AdapterError(f"{self.weights_file}: holds no LoRA factors")
        return modules

    def _configured(self, module: str, pattern: str, default: str) -> tuple[Any, str | None]:
        pat = getattr(self.lora_config, pattern) or {}
        key = pattern_key(pat.keys(), module)
        return (pat[key], key) if key is not None else (getattr(self.lora_config, default), None)

    def _module(self, name: str) -> dict:
        m = self._modules.get(name)
        if m is None:
            raise AdapterError(f"{self.label}: tensor '{name}' is not adapted by {self.weights_file}")
        return m

    # -- metadata -----------------------------------------------------------------------------
    def modules(self) -> list[str]:
        """The base weight names the adapter changes (``model.layers.0.self_attn.q_proj.weight``),
        in natural order (layer numbers compared as numbers)."""
        return list(self._modules)

    def __contains__(self, name: str) -> bool:
        return name in self._modules

    def rank(self, name: str) -> int:
        """``r`` of the module changing base weight ``name`` (its factors' inner dimension)."""
        return int(self._module(name)["rank"])

    def alpha(self, name: str) -> float:
        """``lora_alpha`` of the module (``alpha_pattern`` first, then the config's)."""
        return float(self._configured(self._module(name)["module"], "alpha_pattern", "lora_alpha")[0])

    def scaling(self, name: str) -> float:
        """``s = α / r`` (``use_rslora``: ``α / √r``)."""
        r = self.rank(name)
        return self.alpha(name) / (math.sqrt(r) if self.lora_config.use_rslora else r)

    def delta_shape(self, name: str) -> tuple[int, int]:
        """The shape of ΔW, i.e. of the base weight: ``[out, in]`` (``[in, out]`` with fan_in_fan_out)."""
        m = self._module(name)
        out, inp = self._file.shape(m["B"])[0], self._file.shape(m["A"])[1]
        return (inp, out) if self.lora_config.fan_in_fan_out else (out, inp)

    def summary(self) -> dict:
        """What a model record says about the adapter (``adapter`` key of ``mergesweep.json``)."""
        cfg = self.lora_config
        tm = cfg.target_modules
        tm = sorted(tm) if isinstance(tm, (set, list, tuple)) else tm
        return {
            "r": cfg.r,
            "lora_alpha": cfg.lora_alpha,
            "use_rslora": bool(cfg.use_rslora),
            "target_modules": tm,
            "rank_pattern": dict(cfg.rank_pattern or {}),
            "alpha_pattern": dict(cfg.alpha_pattern or {}),
            "modules": len(self._modules),
            "base_model_name_or_path": cfg.base_model_name_or_path,
        }

    # -- reads --------------------------------------------------------------------------------
    def factors(self, name: str) -> tuple["torch.Tensor", "torch.Tensor"]:
        """``(B [out, r], A [r, in])`` of base weight ``name``: float32, CPU, unscaled."""
        import torch

        m = self._module(name)
        return self._file.get(m["B"]).to(torch.float32), self._file.get(m["A"]).to(torch.float32)

    def delta(self, name: str, device: "torch.device | str | None" = None) -> "torch.Tensor":
        """``ΔW = s · B @ A`` of base weight ``name`` in float32 (on ``device``, default CPU);
        transposed with ``fan_in_fan_out``."""
        b, a = self.factors(name)
        if device is not None:
            b, a = b.to(device), a.to(device)
        d = b @ a
        d *= self.scaling(name)  # peft's order: (B @ A) · s
        return d.T if self.lora_config.fan_in_fan_out else d

    def check_base(self, base: "CheckpointReader | str | os.PathLike") -> None:
        """Every adapted module exists in the base (a reader or a directory) as a weight of ΔW's
        shape; raises :class:`AdapterError` naming the module, this adapter's file and the base."""
        if isinstance(base, CheckpointReader):
            self._check_base(base)
        else:
            with CheckpointReader(base, "base") as reader:
                self._check_base(reader)

    def _check_base(self, base: CheckpointReader) -> None:
        for name, m in self._modules.items():
            if name not in base:
                raise AdapterError(f"{self.weights_file}: adapts module '{m['module']}' but the base {base.path} "
                                   f"has no tensor '{name}' (an adapter for another architecture?)")
            want = self.delta_shape(name)
            if tuple(base.shape(name)) != tuple(want):
                raise AdapterError(f"{self.weights_file}: module '{m['module']}': lora_B @ lora_A is {list(want)} "
                                   f"but '{name}' in the base {base.path} is {list(base.shape(name))}")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "AdapterReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------------------------
# the dense view
# --------------------------------------------------------------------------------------------
class LoraCheckpoint:
    """Base + LoRA adapter as one dense checkpoint, with :class:`CheckpointReader`'s interface.

    ``keys()``, ``shape()``, ``dtype()``, ``config``, ``default_dtype``, ``tied_embeddings`` ... are
    the base's; ``get(name)`` is ``W + ΔW`` for an adapted weight - computed in float32 as
    ``W.float() + s · B @ A`` and cast to ``W``'s dtype, exactly what a densified copy of the
    adapter stores - and the base's tensor otherwise. ``path`` is the adapter's directory (what
    error messages name), ``base_path`` the base's.

    Opening checks that the adapter fits the base (:meth:`AdapterReader.check_base`) and, when
    the adapter's record carries ``adapter.base_fingerprint``, that it is this base's fingerprint.
    """

    use_mmap = True

    def __init__(self, adapter_dir: str | os.PathLike, base_dir: str | os.PathLike, label: str | None = None):
        self.path = Path(adapter_dir)
        self.label = label or str(self.path)
        self.base_path = Path(base_dir)
        self.adapter = AdapterReader(self.path, label)
        try:
            _check_base_fingerprint(self.path, self.base_path, self.label)
            self.base = CheckpointReader(self.base_path, f"base of {self.label}")
            try:
                self.adapter.check_base(self.base)
            except BaseException:
                self.base.close()
                raise
        except BaseException:
            self.adapter.close()
            raise
        self.config: dict = self.base.config
        self.entries = self.base.entries

    # -- metadata: the base's -----------------------------------------------------------------
    def keys(self) -> list[str]:
        return self.base.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> "torch.dtype":
        return self.base.dtype(name)

    def is_floating_point(self, name: str) -> bool:
        return self.base.is_floating_point(name)

    def file_of(self, name: str) -> Path:
        """The adapter's weights file for an adapted tensor, else the base's file holding it."""
        return self.adapter.weights_file if name in self.adapter else self.base.file_of(name)

    def is_adapted(self, name: str) -> bool:
        return name in self.adapter

    @property
    def declared_dtype_name(self) -> str | None:
        return self.base.declared_dtype_name

    @property
    def default_dtype_name(self) -> str:
        return self.base.default_dtype_name

    @property
    def default_dtype(self) -> "torch.dtype":
        return self.base.default_dtype

    torch_dtype = default_dtype

    @property
    def tied_embeddings(self) -> bool:
        return self.base.tied_embeddings

    # -- reads --------------------------------------------------------------------------------
    def get(self, name: str) -> "torch.Tensor":
        """``W + ΔW`` (float32 sum, cast to ``W``'s dtype) for an adapted weight, else ``W``."""
        import torch

        w = self.base.get(name)
        if name not in self.adapter:
            return w
        out = w.to(torch.float32) if w.dtype != torch.float32 else w.clone()
        out += self.adapter.delta(name)
        return out.to(w.dtype)

    def close(self) -> None:
        self.base.close()
        self.adapter.close()

    def __enter__(self) -> "LoraCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def adapter_record_fingerprint(adapter_dir: str | os.PathLike) -> str | None:
    """``adapter.base_fingerprint`` of the adapter's record (``mergesweep.json``), if any."""
    from mergesweep.record import read_record

    rec = read_record(adapter_dir, required=False)
    if rec is None:
        return None
    info = rec.extra.get("adapter")
    return info.get("base_fingerprint") if isinstance(info, dict) else None


def _check_base_fingerprint(adapter_dir: Path, base_dir: Path, label: str) -> None:
    want = adapter_record_fingerprint(adapter_dir)
    if not want:
        return
    from mergesweep.checkpoints.layout import checkpoint_fingerprint

    got = checkpoint_fingerprint(base_dir)
    if got != want:
        raise AdapterError(f"{label}: the record of adapter {adapter_dir} says it was made on a base with "
                           f"fingerprint {want}, but the base given, {base_dir}, has fingerprint {got} "
                           "(another base, or a changed one)")


def open_checkpoint(path: str | os.PathLike, label: str | None = None,
                    base: str | os.PathLike | None = None) -> "CheckpointReader | LoraCheckpoint":
    """An input of a merge: a :class:`LoraCheckpoint` (base + ΔW) for a PEFT adapter directory,
    which needs ``base`` (the directory of the model it was trained on), else a
    :class:`CheckpointReader`."""
    if is_adapter(path):
        if base is None:
            where = f"{label}: " if label else ""
            raise AdapterError(f"{where}{path} is a LoRA adapter: merging it needs the base it was trained on "
                               "(give a base model)")
        return LoraCheckpoint(path, base, label)
    return CheckpointReader(path, label)


def require_dense_experts(method: str, whole_model: bool, inputs) -> None:
    """Refuse LoRA experts (:class:`LoraCheckpoint` inputs) for a method that runs its experts as
    models (``whole_model``: forward passes on calibration data, e.g. RegMean++, PLeaS): those load
    each expert directory with transformers, which an adapter directory is not. MergeError naming
    the expert."""
    if not whole_model:
        return
    from mergesweep.errors import MergeError

    for inp in inputs:
        if isinstance(inp, LoraCheckpoint):
            raise MergeError(f"{inp.label}: {inp.path} is a LoRA adapter, but method '{method}' runs the experts "
                             "as models (calibration forward passes); LoRA experts are merged by streaming "
                             "methods only (task_arithmetic, ties, tsv, ...) or the LoRA-native ones")
