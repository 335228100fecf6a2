"""Devices: ``mergesweep.devices`` (auto / explicit / SLURM allocation / precision), and that the
device a stage runs on never changes what a CPU machine computes: training with ``--device
auto`` and ``--device cpu`` gives the same weights here, and ``mergesweep merge`` with device
``auto`` writes the bytes of a ``cpu`` merge, under the same model id.

The CUDA branches of :func:`resolve_device` are our own logic (which GPU a job may take), tested
by patching torch's answers; whether CUDA itself computes the same is ``benchmarks/cuda_check.py``'s
job on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import in_background
from mergesweep import devices
from mergesweep.devices import (autocast_dtype, check_device_spelling, device_summary, resolve_device,
                                slurm_gpus_allocated)
from mergesweep.errors import ConfigError, DeviceError, MergesweepError

SLURM_VARS = ("SLURM_JOB_ID", *devices.SLURM_GPU_VARS)


@pytest.fixture
def clean_env(monkeypatch):
    """No SLURM job and no CUDA_VISIBLE_DEVICES in this process's environment."""
    for var in SLURM_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def fake_cuda(clean_env):
    """torch says it has two CUDA devices, both with bf16 (nothing is ever run on them)."""
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "device_count", lambda: 2)
    clean_env.setattr(devices, "_cuda_bf16", lambda device: True)
    clean_env.setattr(devices, "_cuda_name", lambda device: "Fake GPU")
    return clean_env


# --------------------------------------------------------------------------------------------
# resolve_device on this (CPU-only) machine
# --------------------------------------------------------------------------------------------
def test_auto_is_cpu_without_cuda(clean_env):
    assert not torch.cuda.is_available()
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"


def test_auto_is_cpu_in_a_slurm_job_without_gpus(clean_env):
    clean_env.setenv("SLURM_JOB_ID", "42")
    clean_env.setenv("SLURM_GPUS_ON_NODE", "0")
    assert slurm_gpus_allocated() is False
    assert resolve_device("auto") == "cpu"


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_explicit_cuda_without_cuda_is_an_error_naming_the_option(clean_env, spec):
    with pytest.raises(DeviceError) as e:
        resolve_device(spec, "--device")
    msg = str(e.value)
    assert msg.startswith(f"--device: {spec!r} requested but "), msg
    assert f"torch {torch.__version__}" in msg and ("CPU-only" in msg or "no CUDA device" in msg), msg
    assert isinstance(e.value, ConfigError) and isinstance(e.value, MergesweepError)


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "cuda:", "cuda:x", "cpu\n", " cpu", "cuda:-1", "", None, 0])
def test_bad_spelling_names_the_value(clean_env, bad):
    with pytest.raises(DeviceError) as e:
        resolve_device(bad, "merge.device")
    assert str(e.value).startswith(f"merge.device: {bad!r} is not a device"), str(e.value)
    assert "auto, cpu, cuda, cuda:N" in str(e.value)


def test_mps_is_a_spelling_but_checked_when_resolved(clean_env):
    assert check_device_spelling("mps") == "mps"
    if not torch.backends.mps.is_available():
        with pytest.raises(DeviceError, match=r"^--device: 'mps' requested but MPS is not available"):
            resolve_device("mps", "--device")


def test_merge_settings_share_the_spellings():
    from mergesweep.merge.settings import check_device

    for ok in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert check_device(ok, "evaluation.device") == ok
    with pytest.raises(ConfigError, match=r"^evaluation\.device: 'gpu' is not a device"):
        check_device("gpu", "evaluation.device")


def test_importing_devices_does_not_import_torch():
    code = ("import sys, mergesweep.devices as d, mergesweep.merge.settings as s; d.check_device_spelling('cuda:1'); "
            "d.slurm_gpus_allocated(); s.check_device('auto'); assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_device_summary_on_cpu():
    assert device_summary("cpu").startswith("cpu (")
    info = devices.device_info("cpu")
    assert info["device"] == "cpu" and info["torch"] == torch.__version__ and info["threads"] >= 1


# --------------------------------------------------------------------------------------------
# the CUDA branches (torch's answers patched): which GPU a process may take
# --------------------------------------------------------------------------------------------
def test_auto_takes_cuda_outside_slurm(fake_cuda):
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda") == "cuda" and resolve_device("cuda:1") == "cuda:1"


@pytest.mark.parametrize("env, want", [
    ({}, "cpu"),                                             # a job that asked no GPU: all empty
    ({"SLURM_GPUS_ON_NODE": "0"}, "cpu"),                    # a count of zero
    ({"CUDA_VISIBLE_DEVICES": ""}, "cpu"),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, "cpu"),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, "cpu"),
    ({"SLURM_JOB_GPUS": "", "SLURM_STEP_GPUS": " "}, "cpu"),
    ({"CUDA_VISIBLE_DEVICES": "0"}, "cuda"),                 # GPU index 0, not a count
    ({"SLURM_JOB_GPUS": "2,3"}, "cuda"),
    ({"SLURM_STEP_GPUS": "1"}, "cuda"),
    ({"SLURM_GPUS_ON_NODE": "1"}, "cuda"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-5e3c1a2b"}, "cuda"),      # UUIDs
])
def test_auto_under_slurm_takes_a_gpu_only_when_allocated(fake_cuda, env, want):
    fake_cuda.setenv("SLURM_JOB_ID", "7")
    for k, v in env.items():
        fake_cuda.setenv(k, v)
    assert resolve_device("auto") == want


def test_environ_argument_overrides_the_process_environment(fake_cuda):
    assert resolve_device("auto", environ={"SLURM_JOB_ID": "1"}) == "cpu"
    assert resolve_device("auto", environ={"SLURM_JOB_ID": "1", "SLURM_JOB_GPUS": "0"}) == "cuda"
    assert slurm_gpus_allocated({}) is None


def test_explicit_cuda_under_slurm_without_gpus_is_honoured_with_a_warning(fake_cuda, caplog):
    fake_cuda.setenv("SLURM_JOB_ID", "7")
    with caplog.at_level(logging.WARNING, logger="mergesweep.devices"):
        assert resolve_device("cuda", "--device") == "cuda"
    assert "allocated no GPU" in caplog.text and "--device" in caplog.text


def test_cuda_index_out_of_range_names_what_the_machine_has(fake_cuda):
    with pytest.raises(DeviceError, match=r"^--device: 'cuda:2' requested but this machine has 2 CUDA device\(s\) "
                                          r"\(cuda:0\.\.cuda:1\)$"):
        resolve_device("cuda:2", "--device")


def test_auto_is_cpu_when_cuda_reports_no_device(fake_cuda):
    fake_cuda.setattr(torch.cuda, "device_count", lambda: 0)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(DeviceError):
        resolve_device("cuda")


# --------------------------------------------------------------------------------------------
# training precision
# --------------------------------------------------------------------------------------------
def test_precision_on_cpu(clean_env):
    assert autocast_dtype("cpu", "auto") is None
    assert autocast_dtype("cpu", "fp32") is None and autocast_dtype("cpu", "float32") is None
    assert autocast_dtype("cpu", "bf16") is torch.bfloat16  # torch's CPU autocast


def test_precision_on_cuda(fake_cuda):
    assert autocast_dtype("cuda", "auto") is torch.bfloat16
    assert autocast_dtype("cuda:1", "bf16") is torch.bfloat16
    assert autocast_dtype("cuda", "fp32") is None
    fake_cuda.setattr(devices, "_cuda_bf16", lambda device: False)  # e.g. a V100
    assert autocast_dtype("cuda", "auto") is None
    with pytest.raises(DeviceError, match=r"^--precision: 'bf16' requested but cuda \(Fake GPU\) does not support"):
        autocast_dtype("cuda", "bf16", "--precision")


@pytest.mark.parametrize("bad", ["fp16", "half", "", None])
def test_bad_precision_names_the_value(bad):
    with pytest.raises(DeviceError, match=r"^--precision: .* is not a precision \(expected one of auto, fp32, bf16\)"):
        autocast_dtype("cpu", bad, "--precision")


def test_bf16_on_mps_is_refused():
    with pytest.raises(DeviceError, match="not supported on device 'mps'"):
        autocast_dtype("mps", "bf16")


# --------------------------------------------------------------------------------------------
# training: --device auto == --device cpu on this machine (real tiny model, one thread)
# --------------------------------------------------------------------------------------------
def _args(module, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(argv)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from mergesweep.zoo import skills

    d = tmp_path_factory.mktemp("data") / "arithmetic"
    d.mkdir()
    recs = skills.generate_splits("arithmetic", {"train": 120, "validation": 1, "test": 1}, 0)["train"]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


TINY_PRETRAIN = ["--hidden", "32", "--layers", "1", "--heads", "4", "--kv-heads", "2", "--intermediate", "64",
                 "--vocab-size", "300", "--steps", "8", "--batch-size", "8", "--threads", "1"]


def _pretrain(data: Path, out: Path, *extra: str) -> Path:
    from mergesweep.zoo import cli_pretrain

    assert cli_pretrain.run(_args(cli_pretrain, ["--data-dirs", str(data), "--name", "tiny", "--uid", "tiny@0",
                                                 "--out", str(out), *TINY_PRETRAIN, *extra])) == 0
    return out


def _finetune(base: Path, data: Path, out: Path, *extra: str) -> Path:
    from mergesweep.zoo import cli_finetune

    assert cli_finetune.run(_args(cli_finetune, ["--base", str(base), "--data", str(data / "train.jsonl"),
                                                 "--domain", "arithmetic", "--name", "ex", "--uid", "ex@0",
                                                 "--out", str(out), "--steps", "6", "--batch-size", "4",
                                                 "--threads", "1", *extra])) == 0
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == torch.float32 and torch.equal(wa[k], wb[k]), k


def test_training_auto_equals_cpu_here(tiny_data, tmp_path, clean_env, one_torch_thread):
    from mergesweep.record import read_record

    base_cpu = _pretrain(tiny_data, tmp_path / "base_cpu", "--device", "cpu", "--precision", "fp32")
    base_auto = _pretrain(tiny_data, tmp_path / "base_auto")  # the defaults: auto, auto
    _same_weights(base_cpu, base_auto)
    rec_cpu, rec_auto = read_record(base_cpu), read_record(base_auto)
    assert rec_cpu.fingerprint == rec_auto.fingerprint and rec_cpu.uid == rec_auto.uid == "tiny@0"
    compute = rec_auto.extra["compute"]
    assert (compute["device"], compute["requested_device"], compute["precision"], compute["requested_precision"]) \
        == ("cpu", "auto", "fp32", "auto")
    assert compute["hardware"].startswith("cpu (")
    assert rec_auto.extra["train"]["device"] == "cpu" and rec_auto.extra["train"]["precision"] == "fp32"

    ex_cpu = _finetune(base_cpu, tiny_data, tmp_path / "ex_cpu", "--device", "cpu")
    ex_auto = _finetune(base_cpu, tiny_data, tmp_path / "ex_auto", "--device", "auto")
    _same_weights(ex_cpu, ex_auto)
    assert read_record(ex_auto).extra["compute"]["device"] == "cpu"


def test_training_bf16_autocast_runs_and_saves_float32(tiny_data, tmp_path, clean_env, one_torch_thread):
    """The autocast path (CPU bf16 here, CUDA bf16 on a GPU): it learns nothing different in kind,
    and what is saved is float32, like any other run."""
    from mergesweep.record import read_record

    base = _pretrain(tiny_data, tmp_path / "base_bf16", "--device", "cpu", "--precision", "bf16")
    rec = read_record(base)
    assert rec.extra["compute"]["precision"] == "bf16" and rec.extra["train"]["precision"] == "bf16"
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in _weights(base).values())


def test_training_with_unavailable_cuda_fails_before_loading(tiny_data, tmp_path, clean_env):
    from mergesweep.zoo import cli_finetune

    args = _args(cli_finetune, ["--base", str(tmp_path / "absent"), "--data", str(tiny_data / "train.jsonl"),
                                "--domain", "a", "--name", "ex", "--out", str(tmp_path / "o"), "--device", "cuda:1"])
    with pytest.raises(DeviceError, match=r"^--device: 'cuda:1' requested but"):
        cli_finetune.run(args)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
# merge: device auto == device cpu, byte for byte, same id
# --------------------------------------------------------------------------------------------
@in_background()  # three merge processes; each gets its environment explicitly
def test_merge_device_auto_writes_the_cpu_bytes(tmp_path, clean_env):
    from helpers_merge import make_family

    from mergesweep.merge.config import load_merge_yaml, planned_model_id

    base, experts = make_family(tmp_path / "family", n_experts=2)
    env = {k: v for k, v in os.environ.items() if k not in SLURM_VARS}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    outs, ids = {}, {}
    for device in ("cpu", "auto", None):  # None: the YAML's default
        doc = {"method": "ties", "base": str(base), "experts": [str(e) for e in experts],
               "params": {"density": 0.5}}
        if device:
            doc["device"] = device
        cfg = tmp_path / f"merge_{device}.yaml"
        cfg.write_text(json.dumps(doc))
        ids[device] = planned_model_id(load_merge_yaml(cfg))
        out = tmp_path / f"out_{device}"
        r = subprocess.run([sys.executable, "-m", "mergesweep.cli", "merge", "--config", str(cfg), "--out", str(out),
                            "--model-id", ids[device]], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        outs[device] = out
    assert len(set(ids.values())) == 1  # the device is not part of the id
    for device in ("auto", None):
        for name in ("model.safetensors", "config.json"):
            assert (outs[device] / name).read_bytes() == (outs["cpu"] / name).read_bytes(), (device, name)
        rec = json.loads((outs[device] / "mergesweep.json").read_text())
        assert rec["device"] == "cpu" and rec["hardware"].startswith("cpu (")  # resolved once, recorded


def test_merge_cli_refuses_cuda_here_naming_the_option(tmp_path, clean_env, capsys):
    from helpers_merge import make_family

    from mergesweep.cli import main

    base, experts = make_family(tmp_path / "family", n_experts=2)
    cfg = tmp_path / "m.yaml"
    cfg.write_text(json.dumps({"method": "linear", "experts": [str(e) for e in experts], "device": "cuda"}))
    for extra, want in (([], "device: 'cuda' requested but"), (["--device", "cuda:1"], "--device: 'cuda:1' requested")):
        assert main(["merge", "--config", str(cfg), "--out", str(tmp_path / "o"), *extra]) == 1
        err = capsys.readouterr().err
        assert f"mergesweep merge: error: {want}" in err and "Traceback" not in err, err
        assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
# benchmarks/cuda_check.py runs here (its CUDA parts skipped; --against cpu checks its comparisons)
# --------------------------------------------------------------------------------------------
@in_background()  # one process, given its environment explicitly
def test_cuda_check_script_runs_on_cpu(tmp_path, clean_env):
    report = tmp_path / "report.json"
    env = {**{k: v for k, v in os.environ.items() if k not in SLURM_VARS}, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks/cuda_check.py"),
                        "--work", str(tmp_path / "w"), "--train-size", "60", "--eval-size", "2",
                        "--pretrain-steps", "4", "--finetune-steps", "3", "--hidden", "32", "--methods", "ties",
                        "--against", "cpu", "--report", str(report)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads(report.read_text())
    assert doc["ok"] and doc["against"] == "cpu" and doc["merge"]["ties"]["max_abs_diff"] == 0.0
    runs = doc["training"]["pretrain"]["runs"]
    assert len(runs) == 3 and all(x["max_abs_weight_diff_vs_cpu"] == 0.0 for x in runs.values())
