"""`mergesweep evaluate` keeps failures apart: an evaluation that cannot run (missing model, bad
argument, out of memory, CUDA, missing module) writes nothing and exits 1 with one line naming the
path or argument, so Snakemake retries it; a model or task that fails after the model loaded is
recorded as ``status: error`` (exit 0); a model with non-finite weights or logits never gets a
score. Real lm-eval, a real tiny Llama checkpoint with a tokenizer and a model record, and the
embedded skill tasks made by `mergesweep make-data`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_pipeline import tiny_eval_model
from mergesweep.cli import main

SUITE = "arithmetic"
MODEL_ID = "tiny-eval"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Skill data and task YAMLs (make-data), a random tiny Llama with a tokenizer and a record,
    and two broken copies: NaN weights, and finite weights whose logits overflow to inf."""
    from safetensors.torch import load_file, save_file

    from mergesweep.record import ModelRecord, write_record

    root = tmp_path_factory.mktemp("tiny_eval")
    model = tiny_eval_model(root, [SUITE], MODEL_ID)

    def broken(name: str, change) -> Path:
        d = root / "models" / name
        shutil.copytree(model, d)
        sd = load_file(d / "model.safetensors")
        for k in sd:
            change(k, sd[k])
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        write_record(d, ModelRecord(model_id=name, role="base", stage="pretrain", uid=f"{name}@0"))
        return d

    nan = broken("tiny-nan", lambda k, t: t.fill_(float("nan")) if ".mlp." in k else None)
    # every weight finite, but the final norm scales hidden states past float32: logits are inf/NaN
    huge = broken("tiny-huge", lambda k, t: t.fill_(3e38) if k == "model.norm.weight" else None)
    return {"root": root, "tasks": root / "tasks" / SUITE, "model": model, "nan": nan, "huge": huge}


def args(tiny, out: Path, **over) -> list[str]:
    a = {"--model": tiny["model"], "--suite": SUITE, "--tasks-dir": tiny["tasks"], "--out": out,
         "--limit": "2", "--batch-size": "4", "--threads": "1"}
    a.update(over)
    flat = ["evaluate"]
    for k, v in a.items():
        if v is not None:
            flat += [k, str(v)]
    return flat


def out_path(tmp_path: Path, model_id: str = MODEL_ID) -> Path:
    return tmp_path / "evals" / model_id / f"{SUITE}.json"


def assert_refused(rc: int, err: str, out: Path, pattern: str) -> str:
    """Exit 1, one error line naming the path/argument, no JSON (nor anything else) written."""
    assert rc == 1, err[-2000:]
    lines = [l for l in err.splitlines() if l.startswith("mergesweep evaluate: error: ")]
    assert len(lines) == 1, err[-2000:]
    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists() and not out.with_suffix(".samples.jsonl").exists()
    return lines[0]


# ------------------------------------------------------------------ checked before lm-eval/model


def _no_weights(tiny, tmp):
    d = tmp / "noweights"
    d.mkdir()
    shutil.copy(tiny["model"] / "config.json", d)
    return d


def _bad_record(tiny, tmp):
    d = tmp / "badrecord"
    shutil.copytree(tiny["model"], d)
    (d / "mergesweep.json").write_text('{"model_id": "x", "role": "teacher", "stage": "merge"}')
    return d


def _file(tiny, tmp):
    p = tmp / "afile"
    p.write_text("x")
    return p


def _broken_yaml(tiny, tmp):
    d = tmp / "tasks"
    shutil.copytree(tiny["tasks"], d)
    (d / "ms_arithmetic_test.yaml").write_text("task: [unclosed\n")
    return d


def _other_suite_tasks(tiny, tmp):
    return tiny["tasks"]  # holds only arithmetic's YAMLs; evaluated as suite 'reverse' below


CHEAP = [
    ("missing model dir", lambda t, tmp: {"--model": tmp / "no-such-model"}, r"--model \S*no-such-model: directory not found"),
    ("model path is a file", lambda t, tmp: {"--model": _file(t, tmp)}, r"--model \S*afile: not a directory"),
    ("not a checkpoint (no config.json)", lambda t, tmp: {"--model": t["tasks"]}, r"--model \S*tasks/arithmetic: not a checkpoint \(no config.json\)"),
    ("checkpoint without weights", lambda t, tmp: {"--model": _no_weights(t, tmp)}, r"--model \S*noweights: not a checkpoint \(no weight files"),
    ("malformed model record", lambda t, tmp: {"--model": _bad_record(t, tmp)}, r"badrecord/mergesweep.json: role: 'teacher' is not one of"),
    ("batch size not a number", lambda t, tmp: {"--batch-size": "lots"}, r"--batch-size 'lots': expected a positive integer, 'auto' or 'auto:N'"),
    ("batch size 0", lambda t, tmp: {"--batch-size": "0"}, r"--batch-size '0'"),
    ("unknown device", lambda t, tmp: {"--device": "gpu"}, r"--device 'gpu': unknown device"),
    ("dtype", lambda t, tmp: {"--dtype": "float64"}, r"--dtype 'float64': expected one of float32"),
    ("limit 0", lambda t, tmp: {"--limit": "0"}, r"--limit 0: must be a positive number"),
    ("threads 0", lambda t, tmp: {"--threads": "0"}, r"--threads 0: must be 1 or more"),
    ("missing tasks dir", lambda t, tmp: {"--tasks-dir": tmp / "no-tasks"}, r"--tasks-dir \S*no-tasks: directory not found"),
    ("no task YAML for the suite", lambda t, tmp: {"--suite": "reverse", "--tasks-dir": _other_suite_tasks(t, tmp)},
     r"--tasks-dir \S*tasks/arithmetic: no task YAML for suite 'reverse'"),
    ("unreadable task YAML", lambda t, tmp: {"--tasks-dir": _broken_yaml(t, tmp)}, r"ms_arithmetic_test.yaml: cannot read task YAML"),
    ("no tasks at all", lambda t, tmp: {"--tasks-dir": None}, r"--tasks-dir or --lm-eval-tasks is required"),
]


@pytest.mark.parametrize("case, change, pattern", CHEAP, ids=[c[0] for c in CHEAP])
def test_cheap_checks_refuse_without_loading_anything(tiny, tmp_path, capsys, monkeypatch, case, change, pattern):
    # lm-eval is made unimportable: these checks must not need it (nor load the model)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    out = out_path(tmp_path)
    rc = main(args(tiny, out, **change(tiny, tmp_path)))
    assert_refused(rc, capsys.readouterr().err, out, pattern)


def test_missing_model_is_a_failed_process_not_a_record(tiny, tmp_path):
    # the real process: non-zero exit status for Snakemake, the path named, no hub "Repo id" message
    out = out_path(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mergesweep", *args(tiny, out, **{"--model": tmp_path / "gone"})],
                          capture_output=True, text=True, env=env)
    line = assert_refused(proc.returncode, proc.stderr, out, rf"--model {re.escape(str(tmp_path / 'gone'))}: directory not found")
    assert "Repo id" not in proc.stderr and "Traceback" not in proc.stderr, line


# ------------------------------------------------------------------ need lm-eval / the model


def test_unknown_device_index(tiny, tmp_path, capsys):
    out = out_path(tmp_path)
    rc = main(args(tiny, out, **{"--device": "cuda:99"}))
    assert_refused(rc, capsys.readouterr().err, out,
                   r"--device cuda:99: .cuda:99. requested but (torch cannot use CUDA|this machine has \d+ CUDA device)")


def test_unreadable_weights(tiny, tmp_path, capsys):
    d = tmp_path / "corrupt"
    shutil.copytree(tiny["model"], d)
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    out = out_path(tmp_path)
    rc = main(args(tiny, out, **{"--model": d}))
    assert_refused(rc, capsys.readouterr().err, out, r"--model \S*corrupt: cannot load the checkpoint \(")


def test_unknown_lm_eval_task(tiny, tmp_path, capsys):
    out = out_path(tmp_path)
    rc = main(args(tiny, out, **{"--tasks-dir": None}) + ["--lm-eval-tasks", "arc_easy", "no_such_task_xyz"])
    assert_refused(rc, capsys.readouterr().err, out, r"--lm-eval-tasks: lm-eval has no task named no_such_task_xyz$")


def test_lm_eval_import_error(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)  # as if lm-eval were broken or absent
    out = out_path(tmp_path)
    rc = main(args(tiny, out))
    assert_refused(rc, capsys.readouterr().err, out, r"cannot import lm-eval \((ModuleNotFoundError|ImportError)")


def _raise_in_forward(monkeypatch, exc):
    from lm_eval.models.huggingface import HFLM

    def boom(self, *a, **k):
        raise exc

    monkeypatch.setattr(HFLM, "_model_call", boom)


@pytest.mark.parametrize("case, exc, pattern", [
    ("host out of memory", lambda: MemoryError(), r"MemoryError"),
    ("GPU out of memory", lambda: __import__("torch").cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.19 GiB total capacity)\nmore lines"),
     r"OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"),
    ("CUDA error", lambda: RuntimeError("CUDA error: an illegal memory access was encountered"),
     r"RuntimeError: CUDA error: an illegal memory access"),
    ("allocator", lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
     r"can't allocate memory"),
    ("module a task needs is missing", lambda: ModuleNotFoundError("No module named 'langdetect'"),
     r"ModuleNotFoundError: No module named 'langdetect'"),
], ids=["MemoryError", "cuda OOM", "CUDA error", "CPU allocator", "ImportError"])
def test_machine_failures_during_scoring_are_retried(tiny, tmp_path, capsys, monkeypatch, case, exc, pattern):
    """Raised from the model's forward pass while lm-eval scores (after the model loaded)."""
    _raise_in_forward(monkeypatch, exc())
    out = out_path(tmp_path)
    rc = main(args(tiny, out))
    line = assert_refused(rc, capsys.readouterr().err, out, rf"evaluation of \S*{MODEL_ID} on {SUITE}: .*{pattern}")
    assert "more lines" not in line


# ------------------------------------------------------------------ recorded: the model ran


def _read(out: Path) -> dict:
    return json.loads(out.read_text())


def test_ok_run_and_the_aggregate_reads_it(tiny, tmp_path):
    """Real process, real lm-eval: status ok, scores in range, and the aggregation accepts the file."""
    from mergesweep.aggregate.scores import rows_from_eval_json

    out = out_path(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mergesweep", *args(tiny, out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = _read(out)
    assert doc["status"] == "ok" and doc["error"] is None and doc["model_id"] == MODEL_ID
    assert doc["model"]["stage"] == "pretrain" and doc["model"]["fingerprint"]  # the model's own record
    assert doc["versions"]["lm_eval"] and doc["versions"]["torch"]
    accs = {r["split"]: r["value"] for r in doc["results"] if r["metric"] == "acc"}
    assert set(accs) == {"validation", "test"} and all(0 <= v <= 1 for v in accs.values())
    assert all(r["n"] == 2 for r in doc["results"])
    rows = rows_from_eval_json(out)
    assert {r["status"] for r in rows} == {"ok"} and len(rows) == len(doc["results"])


def test_nan_weights_are_an_error_never_a_score(tiny, tmp_path):
    """The JSON says status error and why; no result row; exit 0 (recorded, not retried)."""
    out = out_path(tmp_path, "tiny-nan")
    assert main(args(tiny, out, **{"--model": tiny["nan"]})) == 0
    doc = _read(out)
    assert doc["status"] == "error" and doc["results"] == [] and doc["model_id"] == "tiny-nan"
    assert "weights are not finite" in doc["error"] and "mlp" in doc["error"]


def test_nonfinite_logits_from_finite_weights(tiny, tmp_path, capsys):
    # the log-likelihood guard, not the weight check, catches it; --fail-on-error exits 1 but records
    out = out_path(tmp_path, "tiny-huge")
    rc = main(args(tiny, out, **{"--model": tiny["huge"]}) + ["--fail-on-error"])
    assert rc == 1
    doc = _read(out)
    assert doc["status"] == "error" and doc["results"] == []
    assert "log-likelihood is nan" in doc["error"] or "log-likelihood is inf" in doc["error"] \
        or "log-likelihood is -inf" in doc["error"], doc["error"]
    assert "non-finite logits" in doc["error"]


def test_task_that_fails_to_build_is_recorded(tiny, tmp_path, capsys):
    import yaml

    tasks = tmp_path / "tasks"
    shutil.copytree(tiny["tasks"], tasks)
    y = tasks / "ms_arithmetic_test.yaml"
    spec = yaml.safe_load(y.read_text())
    spec["dataset_kwargs"]["data_files"]["test"] = str(tmp_path / "missing.jsonl")
    y.write_text(yaml.safe_dump(spec))
    out = out_path(tmp_path)
    assert main(args(tiny, out, **{"--tasks-dir": tasks})) == 0
    doc = _read(out)
    assert doc["status"] == "error" and "missing.jsonl" in doc["error"] and doc["results"] == []
    assert "\n" not in doc["error"]
