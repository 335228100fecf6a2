"""Outputs are never lost: ``mergesweep merge --out`` refuses what it must not replace, turns
file-system failures into one-line errors naming the path, cleans up on signals, and the atomic
writers leave no temporaries behind (and remove those of dead processes).

Real checkpoints (tests/helpers_merge.py), real ``mergesweep merge`` subprocesses for the CLI.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers_merge import make_base, make_expert, make_family

from mergesweep import atomic
from mergesweep.atomic import OutputError, atomic_dir, atomic_file, remove_stale, stale_siblings, write_json

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def tree(path: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``path`` (or of ``path`` itself)."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*")) if p.is_file()
    }


def leftovers(final: Path) -> list[str]:
    """Temporaries of ``final`` in its parent directory."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    return sorted(p.name for p in final.parent.iterdir()
                  if p.name.startswith((f".{final.name}.tmp-", f".{final.name}.old-")))


def write_config(path: Path, base: Path | None, experts: list[Path], method: str = "linear",
                 **extra) -> Path:
    doc = {"method": method, "experts": [str(e) for e in experts], **extra}
    if base is not None:
        doc["base"] = str(base)
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


#: config path -> the model id its merge gets (mergesweep.merge.config.planned_model_id)
PLANNED: dict[Path, str] = {}


def planned(config: Path) -> str:
    from mergesweep.merge.config import load_merge_yaml, planned_model_id

    PLANNED[config] = planned_model_id(load_merge_yaml(config))
    return PLANNED[config]


def merge_cmd(config: Path, out: Path | str, *args: str, auto_id: bool = True) -> list[str]:
    """The command line; ``--model-id`` is the planned id of ``config`` (when known) unless given."""
    if auto_id and config in PLANNED and "--model-id" not in args:
        args = (*args, "--model-id", PLANNED[config])
    return [sys.executable, "-m", "mergesweep.cli", "merge", "--config", str(config), "--out", str(out), *args]


def run_merge(config: Path, out: Path | str, *args: str, preexec_fn=None, timeout: int = 600, auto_id: bool = True):
    return subprocess.run(merge_cmd(config, out, *args, auto_id=auto_id), env=ENV, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec_fn)


def assert_refused(r, *texts: str) -> None:
    """Exit status 1, one clean error line (no traceback) containing every text."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("mergesweep merge: error:")]
    assert len(line) == 1, r.stderr
    for text in texts:
        assert text in line[0], (text, line[0])


def drop_dac_override():
    """preexec_fn: let a root child be refused by file modes (drop CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH from the bounding set, so they are gone after exec)."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    base, experts = make_family(root, 2)
    return base, experts


@pytest.fixture(scope="module")
def config(family, tmp_path_factory):
    base, experts = family
    path = write_config(tmp_path_factory.mktemp("cfg") / "merge.yaml", base, experts)
    planned(path)
    return path


@pytest.fixture(scope="module")
def config_b(family, tmp_path_factory):
    """Another merge of the same inputs (another model id)."""
    base, experts = family
    path = write_config(tmp_path_factory.mktemp("cfg") / "merge-b.yaml", base, experts, params={"weight": 0.5})
    planned(path)
    return path


def _merge_once(config: Path, out: Path) -> Path:
    r = run_merge(config, out)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "mergesweep.json").read_text())["model_id"] == PLANNED[config]
    return out


@pytest.fixture(scope="module")
def merged(config, tmp_path_factory):
    """The model of ``config``, merged once, copied by the tests that need one."""
    return _merge_once(config, tmp_path_factory.mktemp("merged") / "model")


@pytest.fixture(scope="module")
def merged_b(config_b, config, tmp_path_factory):
    assert PLANNED[config_b] != PLANNED[config]
    return _merge_once(config_b, tmp_path_factory.mktemp("merged-b") / "model")


@pytest.fixture(scope="module")
def big_config(tmp_path_factory):
    """A merge that runs long enough to be interrupted (~120 MB output, a few seconds)."""
    root = tmp_path_factory.mktemp("big")
    base = make_base(root / "base", hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                     vocab_size=4096, num_attention_heads=8, num_key_value_heads=8)
    experts = [make_expert(base, root / f"expert{i}", seed=i) for i in range(2)]
    path = write_config(root / "merge.yaml", base, experts, method="task_arithmetic")
    planned(path)
    return path


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def wait_for_tmp(proc: subprocess.Popen, final: Path, timeout: float = 300) -> Path:
    """Wait until the merge writes into its temporary directory (its config.json exists)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in leftovers(final):
            if name.startswith(f".{final.name}.tmp-") and (final.parent / name / "config.json").exists():
                return final.parent / name
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"merge ended (rc {proc.returncode}) before writing its temporary: {err[-2000:]}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("the merge never wrote its temporary directory")


# --------------------------------------------------------------------------------------------
# bad --out: refused, nothing lost
# --------------------------------------------------------------------------------------------
def test_refuses_dir_holding_another_model(config, merged_b, config_b, tmp_path):
    out = copy_model(merged_b, tmp_path / "model")
    before = tree(out)
    r = run_merge(config, out)
    assert_refused(r, str(out), "another model", PLANNED[config_b], PLANNED[config], "--force")
    assert tree(out) == before
    assert leftovers(out) == []


def test_refuses_dir_with_a_users_file(config, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    r = run_merge(config, out)
    assert_refused(r, str(out), "not empty", "notes.txt", "--force")
    assert tree(out) == {"notes.txt": hashlib.sha256(b"my notes\n").hexdigest()}
    assert leftovers(out) == []


def test_refuses_out_equal_to_base_even_with_force(config, family):
    base, experts = family
    before = tree(base)
    r = run_merge(config, base, "--force")
    assert_refused(r, str(base), "is the input base", "even with --force")
    assert tree(base) == before
    assert leftovers(base) == []


def test_refuses_out_equal_to_base_through_a_symlink(config, family, tmp_path):
    base, experts = family
    link = tmp_path / "alias"
    link.symlink_to(base, target_is_directory=True)
    before = tree(base)
    r = run_merge(config, link, "--force")
    assert_refused(r, str(link), "is the input base")
    assert tree(base) == before
    assert link.is_symlink()


def test_refuses_out_inside_an_expert(config, family):
    base, experts = family
    out = experts[1] / "merged"
    before = tree(experts[1])
    r = run_merge(config, out, "--force")
    assert_refused(r, str(out), "is inside the input experts[1]", str(experts[1]))
    assert not out.exists()
    assert tree(experts[1]) == before
    assert leftovers(out) == []


def test_refuses_out_containing_the_inputs(config, family):
    base, experts = family
    parent = experts[0].parent  # holds base and experts
    before = tree(parent)
    r = run_merge(config, parent, "--force")
    assert_refused(r, str(parent), "contains the input base", "would delete")
    assert tree(parent) == before
    assert leftovers(parent) == []


def test_refuses_out_containing_an_align_map(family, tmp_path):
    base, experts = family
    maps = tmp_path / "maps"
    maps.mkdir()
    perm = maps / "perm.safetensors"
    perm.write_bytes(b"a permutation map the merge would read")
    cfg = write_config(tmp_path / "merge.yaml", base, experts, align={1: str(perm)})
    r = run_merge(cfg, maps, "--force")
    assert_refused(r, str(maps), "contains the input align.1", str(perm))
    assert perm.read_bytes() == b"a permutation map the merge would read"
    assert leftovers(maps) == []


def test_refuses_out_containing_the_config(family, tmp_path):
    base, experts = family
    out = tmp_path / "work"
    out.mkdir()
    cfg = write_config(out / "merge.yaml", base, experts)
    text = cfg.read_text()
    r = run_merge(cfg, out, "--force")
    assert_refused(r, str(out), "contains the input --config")
    assert cfg.read_text() == text
    assert leftovers(out) == []


def test_refuses_a_regular_file_at_out_even_with_force(config, tmp_path):
    out = tmp_path / "model"
    out.write_bytes(b"\x00precious\xff")
    for extra in ([], ["--force"]):
        r = run_merge(config, out, *extra)
        assert_refused(r, str(out), "exists and is not a directory")
        assert out.read_bytes() == b"\x00precious\xff"
        assert leftovers(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_refuses_same_model_with_missing_files(config, merged, tmp_path):
    out = copy_model(merged, tmp_path / "model")
    (out / "model.safetensors").unlink()
    before = tree(out)
    r = run_merge(config, out)
    assert_refused(r, str(out), "model.safetensors is missing", "--force")
    assert tree(out) == before


def test_read_only_parent_is_a_clean_error(config, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    (parent / "keep.txt").write_text("keep")
    parent.chmod(0o555)
    try:
        r = run_merge(config, parent / "model", preexec_fn=drop_dac_override)
        assert_refused(r, str(parent / "model"), "permission denied", f"creating a temporary in {parent}")
        assert sorted(p.name for p in parent.iterdir()) == ["keep.txt"]
    finally:
        parent.chmod(0o755)
    assert (parent / "keep.txt").read_text() == "keep"


def test_parent_is_a_file_is_a_clean_error(config, tmp_path):
    parent = tmp_path / "results"
    parent.write_text("not a directory")
    out = parent / "models" / "m"
    r = run_merge(config, out)
    assert_refused(r, str(out), f"{parent} is not a directory")
    assert parent.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_file_size_limit_mid_write_is_a_clean_error(config, tmp_path):
    """EFBIG (as with a full disk, the failure comes from the writer thread, mid-merge)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, resource.RLIM_INFINITY))

    out = tmp_path / "model"
    (tmp_path / "other.txt").write_text("other")
    r = run_merge(config, out, preexec_fn=limit)
    assert_refused(r, f"cannot write {out}", "file too large")
    assert not out.exists()
    assert leftovers(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt"]


def _can_mount_tmpfs() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root and a private mount namespace (unshare --mount)")
def test_disk_full_is_a_clean_error(config, tmp_path):
    """ENOSPC on a 64 KiB tmpfs (mounted in a private namespace) while the shards are written."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (
        f"mount -t tmpfs -o size=64k tmpfs {disk} && echo kept > {disk}/other.txt && "
        f"{shlex.join(merge_cmd(config, disk / 'model'))}; "
        f"echo rc=$? >&2; ls -A {disk} >&2; cat {disk}/other.txt >&2"
    )
    r = subprocess.run(["unshare", "--mount", "sh", "-c", script], env=ENV, capture_output=True, text=True,
                       timeout=600)
    tail = r.stderr.splitlines()
    assert tail[-3:] == ["rc=1", "other.txt", "kept"], r.stderr
    line = [ln for ln in tail if ln.startswith("mergesweep merge: error:")]
    assert len(line) == 1 and f"cannot write {disk / 'model'}: no space left on device" in line[0], r.stderr
    assert "Traceback" not in r.stderr


def test_bad_threads_is_a_clean_error(config, tmp_path):
    r = run_merge(config, tmp_path / "m", "--threads", "0")
    assert_refused(r, "--threads", "positive integer")
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------------------------
# signals
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_mid_merge_removes_the_temporary(big_config, tmp_path, sig):
    out = tmp_path / "model"
    proc = subprocess.Popen(merge_cmd(big_config, out), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tmp = wait_for_tmp(proc, out)
    assert re.fullmatch(rf"\.model\.tmp-{re.escape(HOST)}-{proc.pid}-[0-9a-f]{{8}}", tmp.name)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err
    assert f"interrupted by {sig.name}" in err
    assert "Traceback" not in err
    assert not out.exists()
    assert leftovers(out) == []
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_forced_replace_keeps_the_old_model(big_config, merged, tmp_path):
    out = copy_model(merged, tmp_path / "model")
    (out / "notes.txt").write_text("mine")
    before = tree(out)
    proc = subprocess.Popen(merge_cmd(big_config, out, "--force"), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_tmp(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert tree(out) == before
    assert leftovers(out) == []


def test_sigkill_leftover_is_removed_by_the_next_successful_run(big_config, config, tmp_path):
    out = tmp_path / "model"
    proc = subprocess.Popen(merge_cmd(big_config, out), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tmp = wait_for_tmp(proc, out)
    proc.kill()
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert tmp.is_dir() and leftovers(out) == [tmp.name]  # SIGKILL cannot be cleaned up after
    live = tmp_path / f".model.tmp-{HOST}-{os.getpid()}-0123abcd"  # owner (this test) alive
    foreign = tmp_path / ".model.tmp-elsewhere.example-1-0123abcd"  # another host: cannot tell
    live.mkdir()
    foreign.mkdir()
    r = run_merge(config, out)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "mergesweep.json").read_text())["model_id"] == PLANNED[config]
    assert not tmp.exists()
    assert leftovers(out) == sorted([live.name, foreign.name])


# --------------------------------------------------------------------------------------------
# good cases
# --------------------------------------------------------------------------------------------
def test_same_model_twice_is_up_to_date(config, tmp_path):
    out = tmp_path / "model"
    r1 = run_merge(config, out)
    assert r1.returncode == 0, r1.stderr
    before = tree(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r2 = run_merge(config, out)
    assert r2.returncode == 0, r2.stderr
    assert "up to date" in r2.stderr and str(out) in r2.stderr
    assert json.loads(r2.stdout.splitlines()[-1]) == {
        "model_id": PLANNED[config], "method": "linear", "params": json.loads(r1.stdout.splitlines()[-1])["params"],
        "up_to_date": True,
    }
    assert tree(out) == before
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    assert leftovers(out) == []


def test_same_model_twice_without_model_id_uses_the_planned_id(config, tmp_path):
    config_mod = pytest.importorskip("mergesweep.merge.config")
    if not hasattr(config_mod, "planned_model_id"):
        pytest.skip("mergesweep.merge.config.planned_model_id not available in this tree")
    out = tmp_path / "model"
    r1 = run_merge(config, out, auto_id=False)
    assert r1.returncode == 0, r1.stderr
    model_id = json.loads((out / "mergesweep.json").read_text())["model_id"]
    assert model_id == PLANNED[config]
    r2 = run_merge(config, out, auto_id=False)
    assert r2.returncode == 0, r2.stderr
    assert f"is up to date (model {model_id})" in r2.stderr
    r3 = run_merge(config, out, "--model-id", "other")  # an explicit id wins
    assert_refused(r3, "another model", model_id, "other")


def test_force_replaces_another_model_and_users_files(config, merged_b, tmp_path):
    out = copy_model(merged_b, tmp_path / "model")
    (out / "notes.txt").write_text("mine")
    r = run_merge(config, out, "--force")
    assert r.returncode == 0, r.stderr
    assert "replacing" in r.stderr
    assert json.loads((out / "mergesweep.json").read_text())["model_id"] == PLANNED[config]
    assert not (out / "notes.txt").exists()
    assert leftovers(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_force_re_merges_the_same_model(config, merged, tmp_path):
    out = copy_model(merged, tmp_path / "model")
    (out / "notes.txt").write_text("mine")
    r = run_merge(config, out, "--force")
    assert r.returncode == 0, r.stderr
    assert "up to date" not in r.stderr
    assert not (out / "notes.txt").exists()
    assert tree(out)["model.safetensors"] == tree(merged)["model.safetensors"]
    assert leftovers(out) == []


def test_empty_directory_and_symlinked_out_are_written(config, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_merge(config, empty)
    assert r.returncode == 0, r.stderr
    assert (empty / "model.safetensors").is_file()
    target = tmp_path / "target"
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    r = run_merge(config, link)
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and (target / "model.safetensors").is_file()
    assert leftovers(empty) == [] and leftovers(target) == []


# --------------------------------------------------------------------------------------------
# atomic.py in-process
# --------------------------------------------------------------------------------------------
def test_atomic_dir_replaces_without_old_siblings(tmp_path):
    final = tmp_path / "out"
    for content in ("one", "two"):
        with atomic_dir(final) as tmp:
            assert tmp.parent == final.parent
            assert re.fullmatch(rf"\.out\.tmp-{re.escape(HOST)}-{os.getpid()}-[0-9a-f]{{8}}", tmp.name)
            (tmp / "f").write_text(content)
        assert (final / "f").read_text() == content
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_rename_fallback_leaves_nothing(tmp_path, monkeypatch):
    """Where paths cannot be exchanged atomically the old tree is moved aside, then removed."""
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_failure_keeps_the_old_tree(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "keep.txt").write_text("keep")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(final) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("boom")
    assert tree(final) == {"keep.txt": hashlib.sha256(b"keep").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_refuses_a_file(tmp_path):
    final = tmp_path / "out"
    final.write_text("file")
    with pytest.raises(OutputError, match=re.escape(f"{final}: exists and is not a directory")):
        with atomic_dir(final):
            pytest.fail("must not be entered")
    assert final.read_text() == "file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_write_error_names_the_output(tmp_path):
    """An OSError about a file inside the temporary becomes an OutputError naming the output."""
    final = tmp_path / "out"

    with pytest.raises(OutputError) as info:
        with atomic_dir(final) as tmp:
            raise OSError(28, "No space left on device", str(tmp / "model.safetensors"))
    assert str(info.value) == f"cannot write {final}: no space left on device"
    assert isinstance(info.value, OSError)
    with pytest.raises(PermissionError):  # about an input, not the output: left as it is
        with atomic_dir(final):
            raise PermissionError(13, "Permission denied", "/some/input/model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_atomic_file_temporaries(tmp_path):
    final = tmp_path / "x.json"
    stale = tmp_path / f".x.json.tmp-{HOST}-{dead_pid()}-0123abcd"
    stale.write_text("half")
    write_json(final, {"a": 1})
    assert json.loads(final.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
    with pytest.raises(ValueError):
        with atomic_file(final) as f:
            f.write("partial")
            raise ValueError
    assert json.loads(final.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_stale_siblings_only_dead_owners_on_this_host(tmp_path):
    final = tmp_path / "m-1"  # a dash in the name must not confuse the parser
    dead = dead_pid()
    entries = {
        f".m-1.tmp-{HOST}-{dead}-0123abcd": True,
        f".m-1.old-{HOST}-{dead}-89abcdef": True,
        f".m-1.tmp-{HOST}-{os.getpid()}-0123abcd": False,  # alive
        f".m-1.tmp-other-host-{dead}-0123abcd": False,  # other host
        ".m-1.tmp-abc_12x": False,  # not ours to judge (another naming)
        f".m-1-2.tmp-{HOST}-{dead}-0123abcd": False,  # another output's temporary
    }
    for name in entries:
        (tmp_path / name).mkdir()
    assert [p.name for p in stale_siblings(final)] == sorted(n for n, s in entries.items() if s)
    # a dead pid whose temporary is still locked (e.g. by a forked child) is alive
    locked = tmp_path / f".m-1.tmp-{HOST}-{dead}-fedcba98"
    locked.mkdir()
    fd = atomic._lock(locked)
    try:
        assert locked not in stale_siblings(final)
    finally:
        os.close(fd)
    assert locked in stale_siblings(final)
    removed = remove_stale(final)
    assert len(removed) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, s in entries.items() if not s)


def test_signal_cleanup_raises_and_restores():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(atomic.SignalExit) as info:
        with atomic.signal_cleanup():
            assert signal.getsignal(signal.SIGTERM) is atomic._handler  # else the kill below ends pytest
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
            pytest.fail("SIGTERM did not interrupt")
    assert info.value.code == 143 and info.value.signame == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_signals_are_deferred_over_the_final_rename(tmp_path):
    """A signal that arrives while the output is renamed into place is raised after it."""
    final = tmp_path / "out"
    with pytest.raises(atomic.SignalExit):
        with atomic.signal_cleanup():
            assert signal.getsignal(signal.SIGTERM) is atomic._handler
            with atomic._signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                with atomic_dir(final) as tmp:
                    (tmp / "f").write_text("done")
                completed = True
    assert completed and (final / "f").read_text() == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
