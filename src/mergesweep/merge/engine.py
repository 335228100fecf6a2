"""The streaming merge engine.

For each parameter name of the reference checkpoint (the base, or the first expert when there
is no base) the engine reads that one tensor from the base and every expert, converts it to
float32 on the compute device, runs the method's kernel and writes the result, in the output
dtype, at its pre-planned offset in the output shard. Nothing else is held: peak memory is about
(inputs + 1) x the largest tensor plus the kernel's temporaries, whatever the model size.

Methods that need whole-model quantities (a global top-k threshold, a global quantile) declare
them (``MethodSpec.statistics``); the engine then makes the extra streaming passes first
(:mod:`mergesweep.merge.select`).

Output (written atomically): ``config.json`` (the reference's, with the output dtype),
``model.safetensors`` or shards + ``model.safetensors.index.json``, tokenizer files, a model
card ``README.md`` and ``mergesweep.json`` (see :func:`merge_checkpoints`).
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import platform
import queue
import re
import resource
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from mergesweep.atomic import atomic_dir, write_json
from mergesweep.checkpoints.layout import checkpoint_fingerprint, copy_non_weight_files
from mergesweep.errors import ConfigError, MergeError
from mergesweep.ids import merge_model_id
from mergesweep.merge.io import PlannedShardWriter, SafetensorsInput, parse_size
from mergesweep.merge.methods import get_method
from mergesweep.merge.methods.layer_swap import layer_index
from mergesweep.merge.select import StreamingKth
from mergesweep.merge.spec import MethodSpec, StatRequest, TensorContext, resolve_params

log = logging.getLogger(__name__)

VOCAB_POLICIES = ("error", "base", "truncate")

#: torch intra-op threads during a CPU merge unless ``threads`` says otherwise. The engine already
#: runs reading, computing and writing in three threads, and its block-wise kernels issue many
#: small ops, for which OpenMP fork/join costs more than it gains: on a busy 2-core machine a
#: TIES merge of SmolLM2-135M took 40 s with one intra-op thread and 370 s with two.
DEFAULT_CPU_THREADS = 1
_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
_EMBED_RE = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|embed_in)\.weight$")
_HEAD_RE = re.compile(r"(?:^|\.)(?:lm_head|embed_out)\.weight$")


# --------------------------------------------------------------------------------------------
# small parsers
# --------------------------------------------------------------------------------------------
def parse_dtype(value: Any, key: str = "dtype") -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).replace("torch.", "").lower()
    if name not in _DTYPE_NAMES:
        raise ConfigError(f"{key}: {value!r} is not one of float32, float16, bfloat16")
    return _DTYPE_NAMES[name]


def parse_device(value: Any, key: str = "device") -> torch.device:
    try:
        dev = torch.device(str(value))
    except RuntimeError as e:
        raise ConfigError(f"{key}: {value!r} is not a torch device such as 'cpu' or 'cuda'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: {value!r} requested but CUDA is not available (torch.cuda.is_available() is False)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"{key}: {value!r} is not supported (use 'cpu' or 'cuda')")
    return dev


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


_MALLOC_TUNED = False


def tune_malloc() -> None:
    """Let glibc recycle large freed blocks instead of returning them to the OS.

    By default every tensor above 32 MB is a fresh ``mmap`` whose pages fault in on first touch,
    which makes elementwise float32 kernels on embedding-sized tensors 3-7x slower than the
    arithmetic. Raising ``M_MMAP_THRESHOLD``/``M_TRIM_THRESHOLD`` (process-wide) keeps freed
    blocks for reuse; peak RSS is unchanged. Opt out with ``MERGESWEEP_MALLOC_TUNING=0``.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or os.environ.get("MERGESWEEP_MALLOC_TUNING", "1") == "0":
        return
    _MALLOC_TUNED = True
    if platform.system() != "Linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):  # not glibc
        pass


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("mergesweep", "torch", "safetensors", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


# --------------------------------------------------------------------------------------------
# planning: which tensor of which input feeds each output tensor
# --------------------------------------------------------------------------------------------
@dataclass
class _Source:
    name: str  # tensor name inside that input (differs for a tied lm_head)
    rows: int | None = None  # crop to / pad up to this many rows (vocabulary policy)


@dataclass
class _TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    merge: bool  # False: non-floating tensor copied from the reference
    sources: list[_Source | None] = field(default_factory=list)  # index 0 = base (or None), then experts


def _embedding_name(inp: SafetensorsInput) -> str | None:
    return next((k for k in inp.keys() if _EMBED_RE.search(k)), None)


def _plan(
    reference: SafetensorsInput,
    base: SafetensorsInput | None,
    experts: Sequence[SafetensorsInput],
    out_dtype: torch.dtype,
    vocab_policy: str,
) -> tuple[list[_TensorPlan], int | None]:
    """Check every input against the reference and decide shapes; returns (plan, new vocab rows)."""
    inputs: list[SafetensorsInput | None] = [base, *experts]
    ref_keys = reference.keys()
    ref_set = set(ref_keys)
    for inp in inputs:
        if inp is None or inp is reference:
            continue
        for k in inp.keys():
            if k in ref_set:
                continue
            if _HEAD_RE.search(k) and not any(_HEAD_RE.search(r) for r in ref_keys):
                log.info("%s: ignoring '%s' (the output ties lm_head to the embeddings, as %s does)",
                         inp.label, k, reference.label)
                continue
            raise MergeError(f"{inp.label}: has tensor '{k}' that {reference.label} ({reference.path}) lacks")
    plan: list[_TensorPlan] = []
    new_vocab: int | None = None
    for name in ref_keys:
        ref_shape = reference.shape(name)
        ref_dtype = reference.dtype(name)
        sources: list[_Source | None] = []
        shapes: list[tuple[int, ...]] = []
        for inp in inputs:
            if inp is None:
                sources.append(None)
                continue
            src = name
            if name not in inp:
                emb = _embedding_name(inp)
                if _HEAD_RE.search(name) and emb is not None:
                    src = emb  # tied checkpoint: lm_head is the embedding matrix
                else:
                    raise MergeError(
                        f"{inp.label}: tensor '{name}' is missing in {inp.path} (present in {reference.label})"
                    )
            sources.append(_Source(src))
            shapes.append(inp.shape(src))
        if not ref_dtype.is_floating_point:
            plan.append(_TensorPlan(name, ref_shape, ref_dtype, False, sources))
            continue
        out_shape = ref_shape
        if any(s != ref_shape for s in shapes):
            differing = [(inp, s) for inp, s in zip([i for i in inputs if i is not None], shapes) if s != ref_shape]
            only_rows = all(len(s) == len(ref_shape) and s[1:] == ref_shape[1:] for _, s in differing)
            is_vocab = only_rows and (_EMBED_RE.search(name) or _HEAD_RE.search(name))
            inp0, s0 = differing[0]
            desc = (
                f"tensor '{name}': {inp0.label} has shape {list(s0)} but {reference.label} has {list(ref_shape)}"
            )
            if not is_vocab:
                raise MergeError(f"{desc} (shape mismatch; the checkpoints are not the same architecture)")
            if vocab_policy == "error":
                raise MergeError(
                    f"{desc}: the vocabulary sizes differ. Set vocab_policy: base (keep the "
                    f"{reference.label}'s {ref_shape[0]} rows; rows an input lacks are taken from "
                    f"the {reference.label}) or vocab_policy: truncate (keep the rows all inputs share)"
                )
            rows = ref_shape[0] if vocab_policy == "base" else min(s[0] for s in shapes)
            out_shape = (rows,) + tuple(ref_shape[1:])
            for src, s in zip([s for s in sources if s is not None], shapes):
                if s[0] != rows:
                    src.rows = rows
            if rows != ref_shape[0]:
                new_vocab = rows
        plan.append(_TensorPlan(name, out_shape, out_dtype, True, sources))
    return plan, new_vocab


# --------------------------------------------------------------------------------------------
# the streaming loop
# --------------------------------------------------------------------------------------------
class _Loader:
    """Reads one output tensor's inputs as float32 on the device (vocab fix, alignment, checks)."""

    def __init__(self, reference, inputs, device, align_maps, config):
        self.reference = reference
        self.inputs = inputs  # [base or None, experts...]
        self.device = device
        self.align_maps = align_maps  # {expert index: perm map}
        self.config = config

    def load(self, tp: _TensorPlan, slot: int) -> torch.Tensor:
        inp = self.inputs[slot]
        src = tp.sources[slot]
        t = inp.read(src.name)
        if t.dtype != torch.float32:
            t = t.to(torch.float32)
        if src.rows is not None:
            have = t.shape[0]
            if have > src.rows:
                t = t[: src.rows]
            elif have < src.rows:
                ref_src = tp.sources[self.inputs.index(self.reference)]
                fill = self.reference.read(ref_src.name)[have : src.rows].to(torch.float32)
                t = torch.cat([t, fill], dim=0)
        expert = slot - 1
        if expert in self.align_maps:
            from mergesweep.align.apply import permute_tensor

            t = permute_tensor(tp.name, t, self.align_maps[expert], self.config)
            if tuple(t.shape) != tuple(tp.shape):
                raise MergeError(
                    f"{inp.label}: alignment changed the shape of '{tp.name}' to {list(t.shape)}"
                )
        t = t.to(self.device)
        bad = nonfinite(t)
        if bad:
            raise MergeError(f"{inp.label}: tensor '{src.name}' in {inp.path} contains {bad} values")
        return t


def _prefetched(items, load, depth: int = 1):
    """Yield ``(item, load(item))`` with ``load`` running one item ahead in a background thread
    (reads, dtype conversion and input checks overlap the kernel). Exceptions are re-raised in
    the caller, in order; leaving the loop early stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put((item, load(item), None))
        except BaseException as e:  # handed to the consumer
            q.put((None, None, e))
            return
        q.put((done, None, None))

    thread = threading.Thread(target=work, name="mergesweep-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, value, err = q.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item, value
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


def nonfinite(t: torch.Tensor) -> str | None:
    """``"NaN"``/``"inf"`` if ``t`` has such values, else None. One summing pass; the exact check
    runs only when the sum is not finite (NaN/inf present, or a float32 overflow)."""
    if t.numel() == 0 or math.isfinite(float(t.sum(dtype=torch.float32))):
        return None
    if bool(torch.isnan(t).any()):
        return "NaN"
    if bool(torch.isinf(t).any()):
        return "inf"
    return None


def _statistics(spec, kparams, requests, plan, loader, uses_base, n_experts, num_layers, seed, device):
    """Streaming passes for whole-model statistics; returns {key: [value per expert]}."""
    stats: dict[str, list[float]] = {}
    work = [tp for tp in plan if tp.merge]
    for stage in sorted({r.stage for r in requests}):
        reqs = [r for r in requests if r.stage == stage]
        accs = {(r.key, i): StreamingKth(device) for r in reqs for i in range(n_experts)}
        needs_pass2 = any(r.kind == "kth" for r in reqs)

        def load_all(tp):
            return (loader.load(tp, 0) if uses_base else None), [loader.load(tp, i + 1) for i in range(n_experts)]

        def stream(pass_no: int):
            bar = tqdm(work, desc=f"{spec.name}: statistics stage {stage} pass {pass_no}", leave=False, disable=None)
            with closing(_prefetched(bar, load_all)) as items:
                for tp, (base_t, exps) in items:
                    _stat_step(tp, base_t, exps, pass_no)

        def _stat_step(tp, base_t, exps, pass_no):
            ctx = TensorContext(tp.name, n_experts, layer_index(tp.name), num_layers, seed, stats, device)
            values = spec.stat_values(stage, base_t, exps, kparams, ctx)
            for r in reqs:
                for i, v in enumerate(values[r.key]):
                    if v is None:
                        continue
                    acc = accs[(r.key, i)]
                    if pass_no == 1:
                        acc.add_pass1(v)
                    elif r.kind == "kth":
                        acc.add_pass2(v)

        stream(1)
        ranks: dict[tuple[str, int], int] = {}
        for r in reqs:
            for i in range(n_experts):
                acc = accs[(r.key, i)]
                if r.kind == "kth" and acc.count:
                    rank = r.rank(acc.count, i)
                    if 0 <= rank < acc.count:
                        acc.locate(rank)
                    ranks[(r.key, i)] = rank
        if needs_pass2:
            stream(2)
        for r in reqs:
            vals = []
            for i in range(n_experts):
                acc = accs[(r.key, i)]
                if r.kind == "max":
                    vals.append(acc.max)
                elif r.kind == "min":
                    vals.append(acc.min)
                else:
                    rank = ranks.get((r.key, i))
                    if rank is None or rank >= acc.count:
                        vals.append(math.inf)
                    elif rank < 0:
                        vals.append(-math.inf)
                    else:
                        vals.append(acc.result())
            stats[r.key] = vals
    return stats


def _describe_input(path: Path, name: str, role: str) -> dict:
    meta = {}
    mpath = path / "mergesweep.json"
    if mpath.exists():
        try:
            meta = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError):
            meta = {}
    desc = {
        "role": role,
        "name": name,
        "path": str(path),
        "model_id": meta.get("model_id"),
        "fingerprint": checkpoint_fingerprint(path),
    }
    for key in ("source", "revision", "domain"):
        if meta.get(key) is not None:
            desc[key] = meta[key]
    return desc


def _default_names(experts: Sequence[Path]) -> list[str]:
    names = [p.name or str(p) for p in experts]
    if len(set(names)) != len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    return names


def _normalize_align(align, names: Sequence[str]) -> dict[int, Path]:
    if not align:
        return {}
    if not isinstance(align, Mapping):
        raise ConfigError("align: expected a mapping {expert index or name: permutation map file}")
    out: dict[int, Path] = {}
    for key, path in align.items():
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            idx = int(key)
            if not 0 <= idx < len(names):
                raise ConfigError(f"align.{key}: no expert with index {idx}")
        elif str(key) in names:
            idx = names.index(str(key))
        else:
            raise ConfigError(f"align.{key}: not an expert index or name (experts: {', '.join(names)})")
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"align.{key}: permutation map {p} not found")
        out[idx] = p
    return out


def _write_fingerprint_cache(path: Path, digest: str) -> None:
    """Record the fingerprint computed while writing where ``checkpoint_fingerprint`` looks for
    it (``.mergesweep-sha256``: the weight/JSON files' names, sizes and mtimes, then the digest),
    so later readers of this checkpoint do not hash it again."""
    files = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".json"} and p.name != "mergesweep.json")
    stamp = ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    try:
        (path / ".mergesweep-sha256").write_text(f"{stamp}\n{digest}")
    except OSError:
        pass


def _file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------
def merge_checkpoints(
    method: str,
    base: str | os.PathLike | None,
    experts: Sequence[str | os.PathLike],
    params: Mapping[str, Any] | None,
    out_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    shard_size: int | str = "2GB",
    align: Mapping | None = None,
    vocab_policy: str = "error",
    expert_names: Sequence[str] | None = None,
    extra_meta: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> dict:
    """Merge ``experts`` (and ``base``) with ``method`` into the HF checkpoint ``out_dir``.

    ``params`` are the method's parameters (see ``mergesweep methods``); per-expert values are
    lists in expert order, ``{per_expert: [...]}`` or a mapping by expert name
    (``expert_names``, default: the directory names). ``dtype`` is the output dtype (default:
    the reference's declared dtype); computation is float32 on ``device``. ``align`` maps
    expert index (or name) -> permutation map file, applied to that expert while streaming.
    ``vocab_policy``: ``error`` (default), ``base`` (keep the base's embedding rows; an expert's
    extra rows are dropped, missing ones taken from the base) or ``truncate`` (keep the rows every
    input has). ``threads`` sets torch's intra-op threads for the duration of the merge (default on
    CPU: :data:`DEFAULT_CPU_THREADS`). Returns the metadata written to ``out_dir/mergesweep.json``.

    Raises :class:`ConfigError` for invalid parameters/options and :class:`MergeError` /
    ``CheckpointError`` for unusable inputs; ``out_dir`` is then left untouched.
    """
    if threads is None and str(device).startswith("cpu"):
        threads = DEFAULT_CPU_THREADS
    if threads is not None and threads != torch.get_num_threads():
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads: expected a positive integer, got {threads!r}")
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return merge_checkpoints(method, base, experts, params, out_dir, dtype=dtype, device=device,
                                     shard_size=shard_size, align=align, vocab_policy=vocab_policy,
                                     expert_names=expert_names, extra_meta=extra_meta)
        finally:
            torch.set_num_threads(previous)
    t0 = time.perf_counter()
    tune_malloc()
    spec: MethodSpec = get_method(method)
    if isinstance(experts, (str, os.PathLike)) or not experts:
        raise ConfigError("experts: expected a non-empty list of checkpoint directories")
    expert_paths = [Path(e) for e in experts]
    base_path = Path(base) if base is not None else None
    n = len(expert_paths)
    names = [str(x) for x in expert_names] if expert_names is not None else _default_names(expert_paths)
    if len(names) != n:
        raise ConfigError(f"expert_names: {len(names)} names for {n} experts")
    spec.check_inputs(n, base_path is not None)
    kparams, rparams = resolve_params(spec, params, n, names, has_base=base_path is not None)
    out_dtype_req = parse_dtype(dtype)
    dev = parse_device(device)
    shard_bytes = parse_size(shard_size)
    if vocab_policy not in VOCAB_POLICIES:
        raise ConfigError(f"vocab_policy: {vocab_policy!r} is not one of {', '.join(VOCAB_POLICIES)}")
    align_paths = _normalize_align(align, names)

    opened: list[SafetensorsInput] = []
    try:
        base_in = SafetensorsInput(base_path, "base") if base_path is not None else None
        if base_in:
            opened.append(base_in)
        expert_ins = []
        for i, p in enumerate(expert_paths):
            expert_ins.append(SafetensorsInput(p, f"expert {i} ({names[i]})"))
            opened.append(expert_ins[-1])
        reference = base_in or expert_ins[0]
        out_dtype = out_dtype_req or reference.declared_dtype or next(
            (reference.dtype(k) for k in reference.keys() if reference.dtype(k).is_floating_point), torch.float32
        )
        plan, new_vocab = _plan(reference, base_in, expert_ins, out_dtype, vocab_policy)
        config = dict(reference.config)
        num_layers = config.get("num_hidden_layers") or config.get("n_layer")
        if spec.check_layout:
            spec.check_layout(kparams, num_layers)
        align_maps = {}
        if align_paths:
            from mergesweep.align.apply import load_perm_map

            align_maps = {i: load_perm_map(p) for i, p in align_paths.items()}
        uses_base = spec.base != "unused" and base_in is not None
        inputs = [base_in, *expert_ins]
        loader = _Loader(reference, inputs, dev, align_maps, config)
        seed = int(kparams.get("seed", 0) or 0)
        requests: list[StatRequest] = spec.requests(kparams, n)
        inputs_desc = ([_describe_input(base_path, base_path.name, "base")] if base_path else []) + [
            _describe_input(p, names[i], "expert") for i, p in enumerate(expert_paths)
        ]

        with torch.inference_mode():
            stats = (
                _statistics(spec, kparams, requests, plan, loader, uses_base, n, num_layers, seed, dev)
                if requests else {}
            )
            with atomic_dir(out_dir) as tmp:
                out_config = dict(config)
                for key in ("dtype", "torch_dtype"):
                    if key in out_config or (key == "torch_dtype" and "dtype" not in out_config):
                        out_config[key] = dtype_name(out_dtype)
                if new_vocab is not None:
                    out_config["vocab_size"] = new_vocab
                (tmp / "config.json").write_text(json.dumps(out_config, indent=2, sort_keys=True) + "\n")
                copied = copy_non_weight_files(reference.path, tmp)
                writer = PlannedShardWriter(tmp, [(tp.name, tp.shape, tp.dtype) for tp in plan], shard_bytes)
                writer.start(fingerprint=True)
                items = None
                try:
                    def load_inputs(tp):
                        if not tp.merge:
                            return reference.read(tp.name), None
                        needed = set(spec.inputs_for(tp.name, kparams, n)) if spec.inputs_for else None
                        base_t = loader.load(tp, 0) if uses_base else None
                        exps = [
                            loader.load(tp, i + 1) if needed is None or i in needed else None for i in range(n)
                        ]
                        return base_t, exps

                    bar = tqdm(plan, desc=f"merge {spec.name}", leave=False, disable=None)
                    items = _prefetched(bar, load_inputs)
                    for tp, (base_t, exps) in items:
                        if not tp.merge:
                            writer.write(tp.name, base_t)  # non-floating tensor copied from the reference
                            continue
                        ctx = TensorContext(tp.name, n, layer_index(tp.name), num_layers, seed, stats, dev)
                        out = spec.merge(base_t, exps, kparams, ctx)
                        del base_t, exps
                        if tuple(out.shape) != tuple(tp.shape):
                            raise MergeError(
                                f"tensor '{tp.name}': method '{spec.name}' returned shape {list(out.shape)}, "
                                f"expected {list(tp.shape)}"
                            )
                        out = out.to(tp.dtype)
                        if nonfinite(out):
                            raise MergeError(
                                f"tensor '{tp.name}': method '{spec.name}' produced NaN/inf values (or values "
                                f"beyond the range of {dtype_name(tp.dtype)}) with params {rparams}; inputs are finite"
                            )
                        writer.write(tp.name, out.cpu())
                        del out
                    items.close()
                    files = writer.close()
                except BaseException:
                    if items is not None:
                        items.close()
                    writer.abort()
                    raise
                fingerprint = writer.digest or checkpoint_fingerprint(tmp)
                _write_fingerprint_cache(tmp, fingerprint)

                align_record = (
                    {str(i): {"path": str(p), "sha256": _file_digest(p)} for i, p in sorted(align_paths.items())}
                    if align_paths else None
                )
                base_fp = inputs_desc[0]["fingerprint"] if base_path else None
                expert_fps = [d["fingerprint"] for d in inputs_desc if d["role"] == "expert"]
                extra = dict(extra_meta or {})
                model_id = extra.get("model_id") or merge_model_id(
                    spec.name, rparams, base_fp, expert_fps,
                    {k: v["sha256"] for k, v in align_record.items()} if align_record else None,
                )
                num_params = sum(math.prod(tp.shape) for tp in plan)
                meta: dict[str, Any] = {
                    "model_id": model_id,
                    "role": "merged",
                    "method": spec.name,
                    "params": rparams,
                    "base": (inputs_desc[0]["model_id"] or inputs_desc[0]["name"]) if base_path else None,
                    "experts": [d["model_id"] or d["name"] for d in inputs_desc if d["role"] == "expert"],
                    "expert_names": names,
                    "inputs": inputs_desc,
                    "align": align_record,
                    "dtype": dtype_name(out_dtype),
                    "device": str(dev),
                    "vocab_policy": vocab_policy,
                    "shard_size": shard_bytes,
                    "files": files + ["config.json"] + copied,
                    "num_tensors": len(plan),
                    "num_parameters": num_params,
                    "statistics": stats or None,
                    "versions": library_versions(),
                }
                meta["fingerprint"] = fingerprint
                meta["runtime_s"] = round(time.perf_counter() - t0, 3)
                meta["peak_rss_mb"] = peak_rss_mb()
                meta.update(extra)
                from mergesweep.merge.card import render_model_card

                (tmp / "README.md").write_text(render_model_card(spec, meta, base_path, expert_paths))
                write_json(tmp / "mergesweep.json", meta)
    finally:
        for inp in opened:
            inp.close()
    log.info(
        "merged %s with %s into %s in %.1f s (peak RSS %.0f MB)",
        ", ".join(names), spec.name, out_dir, meta["runtime_s"], meta["peak_rss_mb"],
    )
    return meta


def canonical_params(method: str, params: Mapping[str, Any] | None, n_experts: int,
                     expert_names: Sequence[str] | None = None, has_base: bool = True) -> dict:
    """The parameters as recorded in ``mergesweep.json`` and hashed into the model id (defaults
    filled in, per-expert values as lists). Lets a workflow compute ids before merging."""
    spec = get_method(method)
    return resolve_params(spec, params, n_experts, expert_names, has_base=has_base)[1]
