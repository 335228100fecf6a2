"""Evaluate one model on its suites with lm-eval and write our own result JSON per suite.

One evaluation job loads the model once and runs every suite of the plan on it
(:func:`evaluate_suites`; the workflow passes the suites as a spec file, :func:`read_spec`).

lm-eval's own output files carry timestamps in their names; we load the model with lm-eval's HF
backend (``HFLM``), run ``lm_eval.simple_evaluate`` on it and write
``results/evals/<model_id>/<suite>.json`` at a fixed path, one per suite. The JSON
holds ``model_id``, ``suite``, ``status`` (``ok``/``error``), ``error``, ``model`` (the model's
record, its ``mergesweep.json``), ``model_path``, ``results`` (one row per lm-eval task, metric,
filter and split: ``task``, ``lm_eval_task``, ``metric``, ``filter``, ``split``, ``value``,
``stderr``, ``n``), ``task_versions``, ``num_fewshot``, ``lm_eval_config``, ``device`` (the one
used) and ``requested_device``,
``chat_template``, ``log_samples`` (and ``samples_file``), library ``versions``, ``runtime_s`` and
``peak_rss_mb``, ``load_s`` (loading the model, once per job and dtype); an error adds a short
``traceback``. ``evaluated_as`` is ``dense`` or ``adapter``; ``adapter`` is null for a dense
model and, for a PEFT adapter evaluated over its base (:func:`load_model`), ``{path, base_path,
base_fingerprint, base_model_id, tokenizer, loader}``. ``settings`` holds the suite's effective
evaluation settings (``dtype``, ``apply_chat_template``, ``num_fewshot``, ``limit``,
``batch_size``, ``validation``: ``{size, seed}`` for lm-eval suites, else null); ``splits``
(lm-eval suites; null for generated suites, whose tasks are one per split) records per leaf
lm-eval task which examples form each split (:mod:`mergesweep.evaluate.splits`: ``rule``,
``fewshot_split``, ``validation``, ``test``).

A model directory that is a PEFT LoRA adapter (``adapter_config.json``; format owned by
:mod:`mergesweep.lora.adapter`) is evaluated over its base (``--base``): lm-eval's HF backend
loads the base and applies the adapter with ``peft=`` (``PeftModel.from_pretrained``), so a merged
LoRA is scored without a dense copy ever being written. The LoRA layers compute
``W x + (alpha/r) B (A x)``, which equals the dense ``(W + (alpha/r) B A) x`` up to float rounding.

Two kinds of failure, kept apart (docs/evaluate.md):

* **The evaluation could not run** — the model directory is missing or not a checkpoint, its
  model record is malformed, the model cannot be loaded, an argument is wrong (batch size,
  device, dtype, tasks directory, an lm-eval task name), memory ran out, CUDA failed, lm-eval
  (or a module a task needs) cannot be imported, the network is unreachable.
  :class:`EvaluationError` is raised, **no JSON is written** for that suite (the workflow deletes
  the job's other outputs too) and ``mergesweep evaluate`` exits 1 with one line naming the path or argument, so Snakemake
  retries the job (and, if it keeps failing, stops with that message). Everything that can be
  checked without loading lm-eval or the model is checked first.
* **The model ran and the evaluation failed** — a task that fails to build or raises while
  scoring, or a model whose weights or log-likelihoods are not finite (NaN/inf). The JSON records
  ``status: "error"`` and the message for that suite only, the other suites go on, the command exits 0 (unless ``--fail-on-error``) and the
  sweep goes on; the tables show the failure. A non-finite model is never given a score.
"""

from __future__ import annotations

import errno
from contextlib import contextmanager
import json
import logging
import math
import os
import re
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergesweep.atomic import atomic_file, write_json
from mergesweep.errors import MergesweepError
from mergesweep.record import RecordError, library_versions, peak_rss_mb, read_record

log = logging.getLogger(__name__)

#: the dtypes ``--dtype`` accepts (passed to ``from_pretrained``)
DTYPES = ("float32", "float16", "bfloat16", "auto")
_BATCH_RE = re.compile(r"^(auto(:[1-9][0-9]*)?|[1-9][0-9]*)$")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")
#: weight files that make a directory a checkpoint (one of them must exist)
_WEIGHT_GLOBS = ("*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin")


class EvaluationError(MergesweepError):
    """The evaluation could not run (infrastructure or arguments): nothing is written and the
    command exits non-zero, so the workflow retries the job. The message is one line naming the
    path or argument."""

    def __init__(self, message: str):
        super().__init__(_one_line(message))


class NonFiniteError(RuntimeError):
    """The model's weights or log-likelihoods are NaN or infinite: recorded as ``status: error``."""


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


# ------------------------------------------------------------------------------------ arguments


def parse_batch_size(text: str | int) -> int | str:
    """``--batch-size``: a positive integer, ``auto`` or ``auto:N`` (lm-eval's automatic search,
    re-run N times)."""
    s = str(text).strip()
    if not _BATCH_RE.match(s):
        raise EvaluationError(f"--batch-size {str(text)!r}: expected a positive integer, 'auto' or 'auto:N'")
    return int(s) if s.isdigit() else s


def check_arguments(*, device: str, dtype: str, limit: int | None, num_fewshot: int | None) -> None:
    """The arguments that need no import: device spelling, dtype, limit, few-shot count."""
    if not _DEVICE_RE.match(str(device)):
        raise EvaluationError(f"--device {device!r}: unknown device (expected auto, cpu, cuda, cuda:N or mps)")
    if dtype not in DTYPES:
        raise EvaluationError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if limit is not None and limit < 1:
        raise EvaluationError(f"--limit {limit}: must be a positive number of examples per task")
    if num_fewshot is not None and num_fewshot < 0:
        raise EvaluationError(f"--num-fewshot {num_fewshot}: must be 0 or more")


def check_device(device: str) -> None:
    """The device exists on this machine (imports torch)."""
    import torch

    kind, _, index = str(device).partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise EvaluationError(f"--device {device}: CUDA is not available on this machine "
                                  f"(torch {torch.__version__})")
        n = torch.cuda.device_count()
        if index and int(index) >= n:
            raise EvaluationError(f"--device {device}: this machine has {n} CUDA device(s)")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise EvaluationError(f"--device {device}: MPS is not available on this machine")


def is_adapter(path: Path) -> bool:
    """Whether ``path`` is a PEFT adapter directory (the format's one owner decides:
    :func:`mergesweep.lora.adapter.is_adapter`)."""
    from mergesweep.lora.adapter import is_adapter as _is_adapter

    return _is_adapter(path)


def check_model_dir(model_dir: Path, flag: str = "--model", *, adapters: bool = True) -> None:
    """The model directory exists and holds an HF checkpoint (config.json and weight files) or,
    with ``adapters``, a PEFT adapter (adapter_config.json and its weights)."""
    if not model_dir.exists():
        raise EvaluationError(f"{flag} {model_dir}: directory not found")
    if not model_dir.is_dir():
        raise EvaluationError(f"{flag} {model_dir}: not a directory")
    if is_adapter(model_dir):
        if not adapters:
            raise EvaluationError(f"{flag} {model_dir}: is a LoRA adapter (adapter_config.json), not a dense "
                                  "checkpoint")
        from mergesweep.lora.adapter import ADAPTER_WEIGHTS

        if not (model_dir / ADAPTER_WEIGHTS).is_file():
            raise EvaluationError(f"{flag} {model_dir}: LoRA adapter without weights (no {ADAPTER_WEIGHTS})")
        return
    if not (model_dir / "config.json").is_file():
        raise EvaluationError(f"{flag} {model_dir}: not a checkpoint (no config.json)")
    if not any(next(model_dir.glob(g), None) for g in _WEIGHT_GLOBS):
        raise EvaluationError(f"{flag} {model_dir}: not a checkpoint (no weight files: "
                              f"{', '.join(_WEIGHT_GLOBS)})")


def check_adapter_base(model_dir: Path, base: Path | None, backend: str) -> dict:
    """For a PEFT adapter ``model_dir``: the base it is evaluated over is given (``--base``), is a
    dense checkpoint and, when the adapter's record names the base's fingerprint
    (``adapter.base_fingerprint``), is that base; the backend can apply adapters. Returns the
    result JSON's ``adapter`` entry (without the loader, which :func:`load_model` decides)."""
    if backend == "vllm":
        raise EvaluationError(f"--model {model_dir} is a LoRA adapter: evaluation.backend vllm (--backend vllm) "
                              "does not evaluate adapters in mergesweep; use evaluation.backend hf")
    if base is None:
        raise EvaluationError(f"--model {model_dir} is a LoRA adapter; evaluating it needs --base "
                              "(the base it was trained on)")
    base = Path(base)
    check_model_dir(base, "--base", adapters=False)
    from mergesweep.checkpoints.layout import checkpoint_fingerprint
    from mergesweep.lora.adapter import adapter_record_fingerprint

    try:
        fingerprint = checkpoint_fingerprint(base)
        base_rec = read_record(base, required=False)
        expected = adapter_record_fingerprint(model_dir)
    except RecordError as e:
        raise EvaluationError(str(e)) from e
    except OSError as e:
        raise EvaluationError(f"--base {base}: cannot read ({_describe(e)})") from e
    if expected and expected != fingerprint:
        raise EvaluationError(f"--model {model_dir}: the adapter was made on a base with fingerprint {expected} "
                              f"(its {model_dir / 'mergesweep.json'}: adapter.base_fingerprint), but --base {base} "
                              f"has fingerprint {fingerprint}")
    return {"path": str(model_dir), "base_path": str(base), "base_fingerprint": fingerprint,
            "base_model_id": base_rec.model_id if base_rec is not None else None, "tokenizer": str(base)}


def suite_tasks(tasks_dir: Path, suite: str) -> list[tuple[str, str]]:
    """(task name, split) pairs for a suite, read from its task YAMLs' metadata.

    Raises :class:`EvaluationError` naming the directory or file when the directory is missing,
    a YAML cannot be read, or no YAML belongs to the suite."""
    import yaml

    tasks_dir = Path(tasks_dir)
    if not tasks_dir.is_dir():
        raise EvaluationError(f"--tasks-dir {tasks_dir}: directory not found")
    out = []
    for p in sorted(tasks_dir.glob("*.yaml")):
        try:
            spec = yaml.safe_load(p.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise EvaluationError(f"{p}: cannot read task YAML ({_describe(e)})") from e
        if not isinstance(spec, dict) or not isinstance(spec.get("task"), str):
            raise EvaluationError(f"{p}: not an lm-eval task YAML (no 'task' name)")
        meta = spec.get("metadata") or {}
        if meta.get("suite", suite) == suite:
            out.append((spec["task"], meta.get("split", "test")))
    if not out:
        raise EvaluationError(f"--tasks-dir {tasks_dir}: no task YAML for suite '{suite}'")
    return out


# ------------------------------------------------------------------------------------ failures


def is_infrastructure(e: BaseException) -> bool:
    """True for failures of the machine or environment rather than of the model or task: out of
    memory (host or GPU), CUDA/accelerator errors, missing modules, network, full or failing
    disks. Those are retried, never recorded."""
    if isinstance(e, (MemoryError, ImportError, ConnectionError, TimeoutError, EvaluationError)):
        return True
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EIO, errno.ENOMEM, errno.EDQUOT):
        return True
    try:
        import requests

        if isinstance(e, (requests.ConnectionError, requests.Timeout)):
            return True
    except ImportError:
        pass
    try:
        import torch
    except ImportError:
        return False
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None and isinstance(e, accel):
        return True
    if isinstance(e, RuntimeError):
        msg = str(e)
        return any(k in msg for k in ("CUDA error", "CUDA out of memory", "CUBLAS_STATUS", "cuDNN error",
                                      "NCCL error", "can't allocate memory", "out of memory"))
    return False


def nonfinite_parameters(model) -> list[str]:
    """Names of the model's parameters and buffers that hold a NaN or infinite value."""
    import torch

    bad = []
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(name)
    return bad


def guard_loglikelihoods(lm) -> None:
    """Make ``lm.loglikelihood`` and ``lm.loglikelihood_rolling`` raise :class:`NonFiniteError`
    when a result is NaN or infinite (non-finite logits), instead of letting lm-eval turn it into
    an accuracy. The wrappers are set on the instance; lm-eval calls them by name."""
    for name in ("loglikelihood", "loglikelihood_rolling"):
        fn = getattr(lm, name)

        def checked(requests, *args, _fn=fn, _name=name, **kwargs):
            out = _fn(requests, *args, **kwargs)
            for req, res in zip(requests, out):
                value = res[0] if isinstance(res, tuple) else res
                if not math.isfinite(float(value)):
                    raise NonFiniteError(
                        f"the model's log-likelihood is {value} ({_name} on task "
                        f"{getattr(req, 'task_name', '?')}, doc {getattr(req, 'doc_id', '?')}): "
                        "non-finite logits, no score is given")
            return out

        setattr(lm, name, checked)


# ------------------------------------------------------------------------------------ results


def _clean(x: Any) -> float | None:
    """A number, or None for lm-eval's "N/A" / null (missing stderr). Non-finite numbers are
    kept as they are so that :func:`nonfinite_results` sees them."""
    if x is None or isinstance(x, bool):
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def results_to_rows(raw: dict, task_splits: dict[str, str], suite: str) -> list[dict]:
    """Turn lm-eval's ``results`` dict into rows ``{task, metric, split, value, stderr, n}``.

    lm-eval keys metrics as ``"<metric>,<filter>"`` with the stderr under
    ``"<metric>_stderr,<filter>"``; sample counts come from ``n-samples``. A NaN stderr (lm-eval
    computes none for some aggregations or a single example) becomes null.
    """
    rows = []
    n_samples = raw.get("n-samples", {})
    for task, metrics in raw.get("results", {}).items():
        if task not in task_splits:
            continue  # group aggregates
        n = n_samples.get(task, {}).get("effective")
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or key.startswith("alias"):
                continue
            metric, filt = key.split(",", 1)
            se = _clean(metrics.get(f"{metric}_stderr,{filt}"))
            rows.append({
                "task": suite,
                "lm_eval_task": task,
                "metric": metric,
                "filter": filt,
                "split": task_splits[task],
                "value": _clean(value),
                "stderr": None if se is None or math.isnan(se) else se,
                "n": int(n) if n is not None else None,
            })
    return sorted(rows, key=lambda r: (r["split"], r["metric"]))


def nonfinite_results(rows: list[dict]) -> list[str]:
    """``task/metric=value`` for every row whose value is missing, NaN or infinite, or whose
    stderr is infinite."""
    bad = []
    for r in rows:
        v, se = r["value"], r["stderr"]
        if v is None or not math.isfinite(v) or (se is not None and not math.isfinite(se)):
            bad.append(f"{r['lm_eval_task']}/{r['metric']}={v}" + (f" (stderr {se})" if se is not None else ""))
    return bad


# ------------------------------------------------------------------------------------ evaluate


_MANAGERS: dict = {}  # indexing lm-eval's own tasks takes seconds: once per process and include paths


def lm_eval_task_manager(include_paths=(), names=(), key: str = "--lm-eval-tasks"):
    """A TaskManager that knows ``names``, every one checked against its index. With
    ``include_paths`` (the user's own task YAMLs, ``evaluation.include_paths``) and every name
    found there, the index holds those directories only (a fraction of a second); otherwise it
    holds lm-eval's own tasks too."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise EvaluationError(f"cannot import lm-eval ({_describe(e)})") from e
    paths = tuple(str(p) for p in include_paths or ())
    for p in paths:
        if not Path(p).is_dir():
            raise EvaluationError(f"include_paths: directory {p} not found")
    tm = None
    if paths:
        if (paths, False) not in _MANAGERS:
            _MANAGERS[(paths, False)] = TaskManager(include_path=list(paths), include_defaults=False)
        tm = _MANAGERS[(paths, False)]
        if not _self_contained(tm, names):
            tm = None
    if tm is None:
        if (paths, True) not in _MANAGERS:
            _MANAGERS[(paths, True)] = TaskManager(include_path=list(paths) or None)
        tm = _MANAGERS[(paths, True)]
    unknown = [t for t in names if t not in tm.all_tasks]
    if unknown:
        where = f" (nor in include_paths {', '.join(paths)})" if paths else ""
        raise EvaluationError(f"{key}: lm-eval has no task named {', '.join(unknown)}{where}")
    return tm


def _self_contained(tm, names) -> bool:
    """Whether ``names`` and, for groups, every member they name (recursively) are in ``tm``'s
    index, so lm-eval's own tasks are not needed."""
    from lm_eval.tasks._yaml_loader import load_yaml

    todo, seen = list(names), set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        entry = tm.task_index.get(n)
        if entry is None:
            return False
        if entry.kind.name == "GROUP" and entry.yaml_path:
            try:
                cfg = load_yaml(entry.yaml_path, resolve_func=False)
            except Exception:
                return False
            members = cfg.get("task") if isinstance(cfg, dict) else None
            for m in members if isinstance(members, list) else []:
                if isinstance(m, str):
                    todo.append(m)
                elif isinstance(m, dict) and isinstance(m.get("task"), str) and m["task"] in tm.task_index:
                    todo.append(m["task"])
    return True


def _task_manager(tasks_dir: Path, suite: str, extra_tasks: list[str] | None, include_paths=()):
    """(task -> split, TaskManager), every task name checked against lm-eval's index. For real
    lm-eval tasks the split of each is decided when the tasks are built (both splits are run)."""
    if extra_tasks:
        return {t: None for t in extra_tasks}, lm_eval_task_manager(include_paths, extra_tasks)
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise EvaluationError(f"cannot import lm-eval ({_describe(e)})") from e
    task_splits = dict(suite_tasks(tasks_dir, suite))
    tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    unknown = [t for t in task_splits if t not in tm.all_tasks]
    if unknown:
        raise EvaluationError(f"--tasks-dir {tasks_dir}: lm-eval does not index task(s) "
                              f"{', '.join(unknown)} (invalid task YAML?)")
    return task_splits, tm


def build_tasks(tm, names) -> list:
    """The top-level lm-eval objects (tasks, groups; a tag's tasks) for ``names``, built (their
    datasets loaded: from the cache, or downloaded when downloads are allowed)."""
    objs = []
    for n in names:
        loaded = tm.load([n])
        if n in loaded["groups"]:
            objs.append(loaded["groups"][n])
        elif n in loaded["tasks"]:
            objs.append(loaded["tasks"][n])
        else:  # a tag: its tasks
            objs.extend(loaded["tasks"].values())
    return objs


#: lm-eval model backends ``--backend`` accepts
BACKENDS = ("hf", "vllm")


def load_model(model_dir: Path, *, dtype: str, device: str, batch_size: int | str, backend: str = "hf",
               base: Path | None = None, adapter: dict | None = None):
    """lm-eval's HF backend (or its vLLM backend) on the checkpoint; any failure to load is an
    :class:`EvaluationError`.

    With ``base`` (``model_dir`` is a PEFT adapter, :func:`check_adapter_base`): the HF backend
    loads the base in ``dtype`` with the base's tokenizer and applies the adapter through lm-eval's
    ``peft=`` (``PeftModel.from_pretrained``; peft keeps the LoRA factors in float32 when the base is
    float16/bfloat16, so at those dtypes the scores differ by rounding from a dense copy's). One
    exception: when the base's ``vocab_size`` differs from its tokenizer's length (a padded
    vocabulary), lm-eval's ``peft=`` resizes the embeddings to the tokenizer — which changes the
    softmax over the vocabulary and so the scores against a dense copy — so the adapter is applied
    to the loaded base by the same ``PeftModel.from_pretrained`` call without the resize.
    ``adapter["loader"]`` records which (``lm_eval_peft`` or ``peft_model``)."""
    if backend not in BACKENDS:
        raise EvaluationError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if base is not None:
        if backend != "hf":  # check_adapter_base refused it already
            raise EvaluationError(f"--model {model_dir}: a LoRA adapter is evaluated with backend hf only")
        return _load_adapter(model_dir, Path(base), dtype=dtype, device=device, batch_size=batch_size,
                             adapter=adapter if adapter is not None else {})
    if backend == "vllm":
        if not str(device).startswith("cuda"):
            raise EvaluationError(f"--backend vllm runs on a GPU, but the device is {device}")
        try:
            import vllm  # noqa: F401
            from lm_eval.models.vllm_causallms import VLLM
        except ImportError as e:
            raise EvaluationError("--backend vllm needs vLLM, an optional extra "
                                  f"(pip install 'mergesweep[vllm]'): {_describe(e)}") from e
        factory = lambda: VLLM(pretrained=str(model_dir), dtype=dtype, batch_size=batch_size,  # noqa: E731
                               trust_remote_code=False)
    else:
        try:
            from lm_eval.models.huggingface import HFLM
        except ImportError as e:
            raise EvaluationError(f"cannot import lm-eval's HF backend ({_describe(e)})") from e
        factory = lambda: HFLM(pretrained=str(model_dir), dtype=dtype, device=device,  # noqa: E731
                               batch_size=batch_size, trust_remote_code=False)
    try:
        return factory()
    except Exception as e:
        if is_infrastructure(e):
            raise EvaluationError(f"--model {model_dir}: {_describe(e)} while loading the model "
                                  f"(device {device}, dtype {dtype})") from e
        raise EvaluationError(f"--model {model_dir}: cannot load the checkpoint ({_describe(e)})") from e


def _vocab_mismatch(base: Path) -> tuple[int, int] | None:
    """(config vocab_size, tokenizer length) of the base when they differ, else None."""
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(str(base), trust_remote_code=False)
    vocab = getattr(getattr(cfg, "text_config", None), "vocab_size", None) or getattr(cfg, "vocab_size", None)
    n = len(AutoTokenizer.from_pretrained(str(base), trust_remote_code=False))
    return (int(vocab), n) if vocab is not None and int(vocab) != n else None


def _load_adapter(model_dir: Path, base: Path, *, dtype: str, device: str, batch_size, adapter: dict):
    """lm-eval's HF backend on ``base`` with the PEFT adapter ``model_dir`` applied (see
    :func:`load_model`); sets ``adapter["loader"]``."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise EvaluationError(f"cannot import lm-eval's HF backend ({_describe(e)})") from e
    common = dict(pretrained=str(base), dtype=dtype, device=device, batch_size=batch_size, trust_remote_code=False)
    step = f"--base {base}"
    try:
        mismatch = _vocab_mismatch(base)
        if mismatch is None:
            adapter["loader"] = "lm_eval_peft"
            step = f"--model {model_dir}"
            return HFLM(**common, peft=str(model_dir))
        log.info("%s: vocab_size %d but %d tokens in its tokenizer: applying the adapter without lm-eval's "
                 "embedding resize", base, *mismatch)
        lm = HFLM(**common)
        from peft import PeftModel

        step = f"--model {model_dir}"
        adapter["loader"] = "peft_model"
        lm._model = PeftModel.from_pretrained(lm._model, str(model_dir))
        lm._model.eval()
        lm.peft = str(model_dir)  # lm-eval's model info (peft_sha), as with peft=
        return lm
    except Exception as e:
        if is_infrastructure(e):
            raise EvaluationError(f"{step}: {_describe(e)} while loading the LoRA adapter over its base "
                                  f"(device {device}, dtype {dtype})") from e
        what = "the LoRA adapter" if step.startswith("--model") else "the base"
        raise EvaluationError(f"{step}: cannot load {what} ({_describe(e)}; adapter {model_dir}, "
                              f"base {base})") from e


@dataclass(frozen=True)
class SuiteRun:
    """One suite as an evaluation job runs it: a generated suite (its task YAMLs in
    ``tasks_dir``) or real lm-eval tasks (``lm_eval_tasks``), with the suite's few-shot count and
    whether its tasks execute model-written code."""

    name: str
    tasks_dir: Path | None = None
    lm_eval_tasks: tuple[str, ...] = ()
    num_fewshot: int | None = None
    unsafe_code: bool = False
    # the suite's own settings; None: the spec's options (or the command line) decide
    apply_chat_template: bool | None = None
    limit: int | None = None
    batch_size: int | str | None = None
    dtype: str | None = None
    validation: dict | None = None  # {size, seed}, either may be missing

    def settings(self, options: dict) -> dict:
        """The suite's effective settings: its own values over the options'."""
        own = {"dtype": self.dtype, "apply_chat_template": self.apply_chat_template,
               "num_fewshot": self.num_fewshot, "limit": self.limit, "batch_size": self.batch_size}
        out = {k: (v if v is not None else options.get(k)) for k, v in own.items()}
        out["batch_size"] = parse_batch_size(out["batch_size"] if out["batch_size"] is not None else 16)
        out["dtype"] = out["dtype"] or "float32"
        out["apply_chat_template"] = bool(out["apply_chat_template"])
        if self.lm_eval_tasks:
            out["validation"] = {**SPEC_OPTIONS["validation"], **(options.get("validation") or {}),
                                 **(self.validation or {})}
        else:
            out["validation"] = None
        return out

    def check(self) -> None:
        """The cheap checks: a task source is given, a generated suite's task YAMLs are readable."""
        if not self.lm_eval_tasks:
            if self.tasks_dir is None:
                raise EvaluationError(f"suite {self.name}: --tasks-dir or --lm-eval-tasks is required")
            suite_tasks(Path(self.tasks_dir), self.name)
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise EvaluationError(f"suite {self.name}: num_fewshot {self.num_fewshot} must be 0 or more")
        if self.limit is not None and self.limit < 1:
            raise EvaluationError(f"suite {self.name}: limit {self.limit} must be a positive number of examples")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise EvaluationError(f"suite {self.name}: dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.batch_size is not None:
            try:
                parse_batch_size(self.batch_size)
            except EvaluationError as e:
                raise EvaluationError(f"suite {self.name}: {e}") from None
        _check_validation(self.validation or {}, f"suite {self.name}: validation")


#: the evaluation options a spec file may set (and their defaults, for a suite run by hand; the
#: workflow's spec carries the config's values, whose defaults the schema owns)
SPEC_OPTIONS = {"batch_size": 16, "device": "auto", "dtype": "float32", "limit": None, "log_samples": False,
                "apply_chat_template": False, "backend": "hf", "num_fewshot": None, "include_paths": [],
                "validation": {"size": 100, "seed": 0}}


def _check_validation(v, key: str) -> None:
    """``{size, seed}`` of a validation slice: size a positive integer, seed an integer."""
    if not isinstance(v, dict) or set(v) - {"size", "seed"}:
        raise EvaluationError(f"{key}: expected an object with 'size' and/or 'seed'")
    if "size" in v and (not isinstance(v["size"], int) or isinstance(v["size"], bool) or v["size"] < 1):
        raise EvaluationError(f"{key}.size: {v['size']!r} must be a positive integer")
    if "seed" in v and (not isinstance(v["seed"], int) or isinstance(v["seed"], bool)):
        raise EvaluationError(f"{key}.seed: {v['seed']!r} must be an integer")


def read_spec(path: str | os.PathLike) -> tuple[list[SuiteRun], dict]:
    """An evaluation spec (written by the workflow from its plan; see docs/evaluate.md) ->
    (suites in order, options). Every key is checked; errors name the file and key."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise EvaluationError(f"--spec {path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvaluationError(f"--spec {path}: cannot read ({_describe(e)})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("suites"), list) or not doc["suites"]:
        raise EvaluationError(f"--spec {path}: expected an object with a non-empty 'suites' list")
    unknown = set(doc) - {"suites", "options"}
    if unknown:
        raise EvaluationError(f"--spec {path}: unknown key(s) {', '.join(sorted(unknown))}")
    options = doc.get("options") or {}
    bad = set(options) - set(SPEC_OPTIONS)
    if not isinstance(options, dict) or bad:
        raise EvaluationError(f"--spec {path}: options: unknown key(s) {', '.join(sorted(bad or ['?']))}")
    _check_validation(options.get("validation", {}), f"--spec {path}: options.validation")
    paths = options.get("include_paths", [])
    if not isinstance(paths, list) or not all(isinstance(x, str) for x in paths):
        raise EvaluationError(f"--spec {path}: options.include_paths: expected a list of directories")
    runs, seen = [], set()
    fields = {"name", "tasks_dir", "lm_eval_tasks", "num_fewshot", "unsafe_code", "apply_chat_template", "limit",
              "batch_size", "dtype", "validation"}
    for i, s in enumerate(doc["suites"]):
        key = f"--spec {path}: suites[{i}]"
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not s["name"]:
            raise EvaluationError(f"{key}: expected an object with a 'name'")
        if set(s) - fields:
            raise EvaluationError(f"{key}: unknown key(s) {', '.join(sorted(set(s) - fields))}")
        if s["name"] in seen:
            raise EvaluationError(f"{key}: suite '{s['name']}' appears twice")
        seen.add(s["name"])
        tasks = s.get("lm_eval_tasks") or ()
        if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) for t in tasks):
            raise EvaluationError(f"{key}.lm_eval_tasks: expected a list of task names")
        runs.append(SuiteRun(s["name"], Path(s["tasks_dir"]) if s.get("tasks_dir") else None, tuple(tasks),
                             s.get("num_fewshot"), bool(s.get("unsafe_code", False)),
                             apply_chat_template=s.get("apply_chat_template"), limit=s.get("limit"),
                             batch_size=s.get("batch_size"), dtype=s.get("dtype"), validation=s.get("validation")))
    return runs, {**SPEC_OPTIONS, **options}


def evaluate(model_dir: str | os.PathLike, suite: str, tasks_dir: str | os.PathLike | None,
             out: str | os.PathLike, *, extra_tasks: list[str] | None = None, num_fewshot: int | None = None,
             confirm_run_unsafe_code: bool = False, **options) -> dict:
    """One model on one suite: :func:`evaluate_suites` with a single suite."""
    run = SuiteRun(suite, Path(tasks_dir) if tasks_dir else None, tuple(extra_tasks or ()), num_fewshot,
                   confirm_run_unsafe_code)
    return evaluate_suites(model_dir, [run], [out], **options)[0]


def evaluate_suites(
    model_dir: str | os.PathLike,
    suites: list[SuiteRun],
    outs: list[str | os.PathLike],
    *,
    batch_size: int | str = 16,
    device: str = "cpu",
    dtype: str = "float32",
    limit: int | None = None,
    log_samples: bool = False,
    apply_chat_template: bool = False,
    backend: str = "hf",
    num_fewshot: int | None = None,
    include_paths: list[str] | tuple = (),
    validation: dict | None = None,
    base: str | os.PathLike | None = None,
) -> list[dict]:
    """Load the model once per distinct dtype and run every suite on it; write each suite's result
    JSON atomically (``outs[i]`` for ``suites[i]``) as soon as it is done; return the records.

    The keyword options are the defaults of every suite; a suite's own settings
    (:meth:`SuiteRun.settings`) override them. Suites are run grouped by their dtype, the model
    loaded once per group, in the order the suites first need each dtype.

    Raises :class:`EvaluationError` when the evaluation cannot run: every cheap check (arguments,
    the model directory, each suite's task YAMLs, lm-eval's task index) is made for *all* suites
    before the model is loaded, and an infrastructure failure in any suite (out of memory, CUDA)
    stops the job (the workflow retries it). A model- or task-level failure after the model loaded
    is written for *that suite* with ``status: "error"`` and the other suites go on. A model whose
    weights are not finite gets ``status: "error"`` in every suite.

    ``base``: the dense base a PEFT adapter ``model_dir`` is evaluated over (required for an
    adapter, :func:`check_adapter_base`; ignored for a dense model).
    """
    model_dir = Path(model_dir)
    outs = [Path(o) for o in outs]
    if len(outs) != len(suites) or not suites:
        raise EvaluationError(f"{len(suites)} suite(s) but {len(outs)} --out path(s): give one output per suite")
    # ---- cheap checks first: no lm-eval, no model
    batch_size = parse_batch_size(batch_size)
    check_arguments(device=device, dtype=dtype, limit=limit, num_fewshot=num_fewshot)
    _check_validation(validation or {}, "validation")
    check_model_dir(model_dir)
    for s in suites:
        s.check()
    options = {"batch_size": batch_size, "dtype": dtype, "limit": limit, "apply_chat_template": apply_chat_template,
               "num_fewshot": num_fewshot, "validation": validation}
    settings = [s.settings(options) for s in suites]
    try:
        rec = read_record(model_dir, required=False)
    except RecordError as e:
        raise EvaluationError(str(e)) from e
    model_id = rec.model_id if rec else model_dir.name
    adapter = check_adapter_base(model_dir, base, backend) if is_adapter(model_dir) else None

    # ---- lm-eval, task index, device: failures here are the machine's or the inputs'
    with _infrastructure_errors(model_dir):
        managers = {s.name: _task_manager(Path(s.tasks_dir or "."), s.name, list(s.lm_eval_tasks) or None,
                                          include_paths) for s in suites}
        used_device = resolve(device)

    # ---- one model load per dtype, in the order the suites first need it
    by_dtype: dict[str, list[int]] = {}
    for i, st in enumerate(settings):
        by_dtype.setdefault(st["dtype"], []).append(i)
    records: list[dict] = [{}] * len(suites)
    for dt, indices in by_dtype.items():
        t0 = time.time()
        with _infrastructure_errors(model_dir):
            lm = load_model(model_dir, dtype=dt, device=used_device, batch_size=settings[indices[0]]["batch_size"],
                            backend=backend, base=Path(adapter["base_path"]) if adapter else None, adapter=adapter)
        load_s = round(time.time() - t0, 3)
        log.info("loaded %s (%s) on %s in %.1f s; %d suite(s)", model_id, dt, used_device, load_s, len(indices))

        # ---- the model is loaded: from here on a failure of the model or a task is recorded
        bad = nonfinite_parameters(lm.model) if backend == "hf" else []  # vLLM: the log-likelihood guard only
        weights_error = (f"the model's weights are not finite: {len(bad)} tensor(s) hold NaN/inf "
                         f"(e.g. {', '.join(bad[:3])}); no score is given") if bad else None
        guard_loglikelihoods(lm)
        for i in indices:
            suite = suites[i]
            log.info("suite %d/%d: %s", i + 1, len(suites), suite.name)
            task_splits, tm = managers[suite.name]
            records[i] = _run_suite(lm, suite, task_splits, tm, outs[i], model_dir=model_dir, model_id=model_id,
                                    rec=rec, device=used_device, requested_device=device, settings=settings[i],
                                    log_samples=log_samples, weights_error=weights_error, load_s=load_s,
                                    adapter=adapter)
        del lm
        _release_memory()
    return records


def _release_memory() -> None:
    """Free a model before loading it again in another dtype."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


@contextmanager
def _infrastructure_errors(model_dir: Path):
    """Before the model runs, a failure of the machine (out of memory, CUDA, network) becomes an
    :class:`EvaluationError` (nothing written, the job retried); anything else propagates."""
    try:
        yield
    except EvaluationError:
        raise
    except Exception as e:
        if is_infrastructure(e):
            raise EvaluationError(f"evaluation of {model_dir}: {_describe(e)}") from e
        raise


def resolve(device: str) -> str:
    """The device a ``--device`` value means on this machine (``auto``: CUDA when this process
    was given a GPU, else CPU; mergesweep.devices); an explicit device that is not there is an
    :class:`EvaluationError`."""
    from mergesweep.devices import resolve_device

    try:
        used = resolve_device(device, key=f"--device {device}")
    except MergesweepError as e:
        raise EvaluationError(str(e)) from e
    check_device(used)
    return used


def set_batch_size(lm, batch_size: int | str) -> None:
    """A loaded lm-eval model's batch size, per suite (lm-eval reads it when it batches requests)."""
    if hasattr(lm, "batch_size_per_gpu"):  # HFLM
        if str(batch_size).startswith("auto"):
            _, _, n = str(batch_size).partition(":")
            lm.batch_size_per_gpu = "auto"
            lm.batch_schedule = float(n) if n else 1
        else:
            lm.batch_size_per_gpu = int(batch_size)
    elif hasattr(lm, "batch_size"):  # vLLM
        lm.batch_size = "auto" if str(batch_size).startswith("auto") else int(batch_size)


def _simple_evaluate(lm, tasks, tm, settings: dict, *, device: str, log_samples: bool, unsafe_code: bool) -> dict:
    import lm_eval

    raw = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=tm,
        batch_size=settings["batch_size"],
        device=device,
        limit=settings["limit"],
        log_samples=log_samples,
        num_fewshot=settings["num_fewshot"],
        apply_chat_template=settings["apply_chat_template"],
        confirm_run_unsafe_code=unsafe_code,
    )
    if raw is None:
        raise RuntimeError("lm_eval.simple_evaluate returned nothing")
    return raw


def _run_lm_eval_suite(lm, suite: SuiteRun, tm, settings: dict, *, device: str, log_samples: bool):
    """Real lm-eval tasks, run on both splits: (rows, raw of the test run, splits record,
    {split: raw}). The tasks are built once (their datasets from the cache); each leaf task's
    split rule is :func:`mergesweep.evaluate.splits.plan_splits`."""
    from mergesweep.evaluate.splits import SPLITS, leaf_tasks, plan_splits, use_split

    objs = build_tasks(tm, suite.lm_eval_tasks)
    leaves = leaf_tasks(objs)
    v = settings["validation"]
    plans = {t.config.task: plan_splits(t, v["size"], v["seed"]) for t in leaves}
    rows, raws = [], {}
    for split in SPLITS:
        with use_split(leaves, plans, split):
            raw = _simple_evaluate(lm, objs, tm, settings, device=device, log_samples=log_samples,
                                   unsafe_code=suite.unsafe_code)
        raws[split] = raw
        rows += results_to_rows(raw, {name: split for name in plans}, suite.name)
    rows.sort(key=lambda r: (r["split"], r["lm_eval_task"], r["metric"]))
    return rows, raws["test"], {name: p.to_dict() for name, p in plans.items()}, raws


def _run_suite(lm, suite: SuiteRun, task_splits: dict, tm, out: Path, *, model_dir: Path, model_id: str, rec,
               device: str, requested_device: str, settings: dict, log_samples: bool,
               weights_error: str | None, load_s: float, adapter: dict | None = None) -> dict:
    """Run one suite on the loaded model and write its JSON; a model/task failure is recorded."""
    t0 = time.time()
    record: dict[str, Any] = {
        "model_id": model_id,
        "suite": suite.name,
        "status": "ok",
        "error": None,
        "model": rec.to_dict() if rec else {},
        "model_path": str(model_dir),
        "evaluated_as": "adapter" if adapter else "dense",
        "adapter": dict(adapter) if adapter else None,
        "results": [],
        "device": device,
        "requested_device": requested_device,
        "chat_template": settings["apply_chat_template"],
        "log_samples": bool(log_samples),
        "settings": settings,
        "splits": None,
        "versions": library_versions(),
    }
    try:
        if weights_error:
            raise NonFiniteError(weights_error)
        set_batch_size(lm, settings["batch_size"])
        if suite.lm_eval_tasks:
            rows, raw, splits, raws = _run_lm_eval_suite(lm, suite, tm, settings, device=device,
                                                         log_samples=log_samples)
            record["splits"] = splits
            names = set(splits)
        else:
            raw = _simple_evaluate(lm, list(task_splits), tm, settings, device=device, log_samples=log_samples,
                                   unsafe_code=suite.unsafe_code)
            rows = results_to_rows(raw, task_splits, suite.name)
            raws = {None: raw}
            names = set(task_splits)
        if not rows:
            raise RuntimeError("lm-eval returned no metrics for the suite's tasks")
        nonfinite = nonfinite_results(rows)
        if nonfinite:
            raise NonFiniteError(f"lm-eval reported non-finite scores: {', '.join(nonfinite[:4])}; "
                                 "no score is given")
        record["results"] = rows
        record["task_versions"] = {k: v for k, v in raw.get("versions", {}).items() if k in names}
        record["num_fewshot"] = {k: v for k, v in raw.get("n-shot", {}).items() if k in names}
        record["lm_eval_config"] = {k: raw.get("config", {}).get(k) for k in ("batch_size", "limit", "model")}
        if log_samples:
            samples_path = out.with_suffix(".samples.jsonl")
            with atomic_file(samples_path) as f:
                for split, r in raws.items():
                    for task, samples in r.get("samples", {}).items():
                        for s in samples:
                            extra = {"split": split} if split else {}
                            f.write(json.dumps({"task": task, **extra, **s}, default=str) + "\n")
            record["samples_file"] = str(samples_path)
    except Exception as e:
        if is_infrastructure(e) or isinstance(e, MergesweepError):
            raise EvaluationError(f"evaluation of {model_dir} on {suite.name}: {_describe(e)}") from e
        log.error("evaluation of %s on %s failed: %s", model_id, suite.name, e)
        record["status"] = "error"
        record["error"] = _one_line(f"{type(e).__name__}: {e}", 2000)
        record["traceback"] = traceback.format_exc(limit=5)
        record["results"] = []
    record["runtime_s"] = round(time.time() - t0, 3)
    record["load_s"] = load_s
    record["peak_rss_mb"] = peak_rss_mb()
    write_json(out, record)
    return record
