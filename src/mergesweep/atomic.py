"""Atomic outputs: write to a temporary sibling, then rename, so a killed job never leaves
something that looks finished, and nothing that is never cleaned up.

Temporary siblings are named ``.NAME.tmp-<host>-<pid>-<random>`` (and, where an existing directory
has to be moved aside and the system cannot swap two paths atomically,
``.NAME.old-<host>-<pid>-<random>``); the owning process also holds a ``flock`` on its temporary
while it works. Before a directory is written and after every successful write, the siblings of
the output whose owner is gone - same host, process dead, no lock held - are removed, so the
leftovers of a job killed with SIGKILL disappear with the next run. Siblings written on another
host are left alone (their owner cannot be checked from here).

:func:`install_signal_cleanup` turns SIGTERM, SIGINT and SIGHUP into an exception, so the
``except BaseException`` clean-up paths (the temporary directory's removal among them) run when a
job is cancelled (SLURM sends SIGTERM on ``scancel`` and at the time limit).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from mergesweep.errors import MergesweepError

_KINDS = ("tmp", "old")
_TAG_RE = re.compile(r"^(?P<host>.+)-(?P<pid>[0-9]+)-(?P<rand>[0-9a-f]{8})$")


class OutputError(MergesweepError, OSError):
    """An output cannot be created or written (permissions, read-only or full file system, a file
    where a directory is needed, an output that would replace something it must not). The message
    names the path."""

    def __init__(self, message: str):
        # OSError's constructor would parse (errno, strerror) from the arguments; keep one message
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0])


class SignalExit(SystemExit):
    """Raised in the main thread by the handlers of :func:`install_signal_cleanup`; exits the
    interpreter with ``128 + signal number`` (143 for SIGTERM) unless caught."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    @property
    def signame(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"


# --------------------------------------------------------------------------------------------
# signals
# --------------------------------------------------------------------------------------------
_CLEANUP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, n))
_sig_lock = threading.Lock()
_defer_depth = 0
_pending: int | None = None
_raised = False


def _handler(signum, frame) -> None:
    global _pending, _raised
    if _raised:
        # a second signal while the first one's clean-up runs: stop now (the next successful run
        # removes whatever temporary this leaves behind)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _defer_depth:
        _pending = signum  # raised when the critical section ends
        return
    _raised = True
    raise SignalExit(signum)


def install_signal_cleanup() -> Callable[[], None]:
    """Make SIGTERM, SIGINT and SIGHUP raise :class:`SignalExit` in the main thread (exit status
    ``128 + signum``: 143 for SIGTERM, 130 for SIGINT, 129 for SIGHUP), so ``finally`` /
    ``except BaseException`` clean-up runs - :func:`atomic_dir` removes its temporary directory.
    A second signal during that clean-up kills the process at once. Signals set to be ignored
    (``nohup``) stay ignored. Call it early in a command. Returns a function that restores the
    previous handlers (a no-op outside the main thread, where handlers cannot be installed, and
    for signals already handled by an outer call); see also :func:`signal_cleanup`."""
    global _raised, _pending
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous: dict[int, Any] = {}
    with _sig_lock:
        for sig in _CLEANUP_SIGNALS:
            current = signal.getsignal(sig)
            if current is signal.SIG_IGN or current is _handler:
                continue
            previous[sig] = signal.SIG_DFL if current is None else current
            signal.signal(sig, _handler)
        if previous:
            _raised, _pending = False, None

    def restore() -> None:
        global _raised, _pending
        with _sig_lock:
            for sig, handler in previous.items():
                if signal.getsignal(sig) is _handler:
                    signal.signal(sig, handler)
            if previous:
                _raised, _pending = False, None
            previous.clear()

    return restore


@contextmanager
def signal_cleanup() -> Iterator[None]:
    """:func:`install_signal_cleanup` for the duration of a block (for commands that may also run
    in-process, e.g. under a test runner)."""
    restore = install_signal_cleanup()
    try:
        yield
    finally:
        restore()


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold signals handled by :func:`install_signal_cleanup` until the block ends (renames that
    must not be cut in half; clean-up that must finish)."""
    global _defer_depth, _pending, _raised
    main = threading.current_thread() is threading.main_thread()
    if main:
        _defer_depth += 1
    try:
        yield
    finally:
        if main:
            _defer_depth -= 1
            if not _defer_depth and _pending is not None:
                signum, _pending = _pending, None
                if not _raised:
                    _raised = True
                    raise SignalExit(signum)


# --------------------------------------------------------------------------------------------
# ownership of temporaries
# --------------------------------------------------------------------------------------------
def _hostname() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def _owner_tag() -> str:
    return f"{_hostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def _temp_name(final: Path, kind: str) -> Path:
    return final.with_name(f".{final.name}.{kind}-{_owner_tag()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: somebody else's live process
        return True
    return True


def _lock(path: Path) -> int | None:
    """Open ``path`` and take an exclusive ``flock`` on it (best effort); returns the descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # e.g. NFS without flock on directories: the pid still identifies the owner
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _locked_by_other(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except OSError:
        pass


def stale_siblings(final: str | os.PathLike) -> list[Path]:
    """Temporaries of ``final`` (``.NAME.tmp-*``, ``.NAME.old-*``) whose owner is gone: written on
    this host by a process that no longer exists and holds no lock on them."""
    final = Path(final)
    host = _hostname()
    me = os.getpid()
    prefixes = tuple(f".{final.name}.{kind}-" for kind in _KINDS)
    out = []
    try:
        entries = list(os.scandir(final.parent))
    except OSError:
        return []
    for entry in entries:
        prefix = next((p for p in prefixes if entry.name.startswith(p)), None)
        if prefix is None:
            continue
        m = _TAG_RE.match(entry.name[len(prefix):])
        if not m or m["host"] != host:
            continue
        pid = int(m["pid"])
        path = final.parent / entry.name
        if pid == me or _pid_alive(pid) or _locked_by_other(path):
            continue
        out.append(path)
    return sorted(out)


def remove_stale(final: str | os.PathLike) -> list[Path]:
    """Remove :func:`stale_siblings` of ``final``; returns what was removed."""
    removed = stale_siblings(final)
    for path in removed:
        _remove(path)
    return removed


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------
_WRITE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                 errno.EFBIG: "file too large (file size limit reached)"}
_PLACE_ERRNOS = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                 errno.EROFS: "read-only file system"}


def _first_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return Path("/")


def _filename(e: OSError) -> Path | None:
    name = e.filename
    if not isinstance(name, (str, bytes, os.PathLike)) or not name:
        return None
    return Path(os.path.abspath(os.fsdecode(name)))


def _explain(final: Path, e: OSError) -> str:
    """One line naming ``final`` and, where it differs, the path the system refused."""
    name = _filename(e)
    parts = name.parts[len(final.parent.parts):] if name and final.parent in name.parents else ()
    if name is None or name == final:
        where = ""
    elif parts and parts[0].startswith(f".{final.name}."):  # our temporary, or a file inside it
        where = f" ({final.joinpath(*parts[1:])})" if len(parts) > 1 else f" (creating a temporary in {final.parent})"
    else:
        where = f" ({name})"
    if e.errno in _WRITE_ERRNOS:
        return f"cannot write {final}: {_WRITE_ERRNOS[e.errno]}"
    if e.errno in _PLACE_ERRNOS:
        return f"cannot write {final}: {_PLACE_ERRNOS[e.errno]}{where}"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        existing = _first_existing(final.parent)
        if not existing.is_dir():
            return f"cannot create {final}: {existing} is not a directory"
    return f"cannot write {final}: {e.strerror or e}{where}"


def _output_oserror(exc: BaseException, tmp: Path) -> OSError | None:
    """The OSError in ``exc``'s chain that is about writing under ``tmp`` (or a full disk)."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OutputError):
            return None
        if isinstance(e, OSError) and e.errno is not None:
            name = _filename(e)
            inside = name is not None and (name == tmp or tmp in name.parents)
            if e.errno in _WRITE_ERRNOS and (name is None or inside):
                return e
            if inside and e.errno in (*_PLACE_ERRNOS, errno.ENOTDIR, errno.ENOENT):
                return e
        e = e.__cause__ or e.__context__
    return None


def _resolve_final(final: str | os.PathLike) -> Path:
    final = Path(os.path.abspath(final))
    if final.is_symlink():  # write where the link points; the link itself stays
        final = Path(os.path.realpath(final))
    return final


def _make_parent(final: Path) -> None:
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(_explain(final, e)) from e


def check_writable(final: str | os.PathLike, directory: bool = True) -> Path:
    """Fail early, with an :class:`OutputError` naming the path, if ``final`` cannot be written:
    its parent cannot be created, is not writable, or ``final`` exists with the wrong type
    (a directory output over a file or the other way round). Creates the parent directories and
    probes them with a temporary sibling (removed at once). Returns the resolved path."""
    final = _resolve_final(final)
    if os.path.lexists(final) and final.is_dir() != directory:
        what = "a directory" if directory else "a file"
        raise OutputError(f"{final}: exists and is not {what}; refusing to replace it")
    _make_parent(final)
    probe = _temp_name(final, "tmp")
    try:
        os.mkdir(probe)
    except OSError as e:
        raise OutputError(_explain(final, e)) from e
    try:
        os.rmdir(probe)
    except OSError:
        pass
    return final


# --------------------------------------------------------------------------------------------
# renames
# --------------------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where the
    kernel, C library or file system cannot."""
    global _renameat2
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (OSError, AttributeError):
            _renameat2 = False
    if not _renameat2:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(tmp: Path, final: Path) -> None:
    """Move the complete ``tmp`` to ``final``; an existing ``final`` directory is replaced and
    removed. At every instant ``final`` is either the old or the new tree (where the system can
    exchange two paths atomically; otherwise it is absent between two renames, and restored if
    the second one fails)."""
    try:
        os.rename(tmp, final)  # absent or empty directory
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if _exchange(tmp, final):
        _remove(tmp)  # the old tree, now under the temporary name
        return
    old = _temp_name(final, "old")
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    _remove(old)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def _abandon(e: BaseException, tmp: Path, final: Path) -> None:
    """Remove the temporary of a failed write; a file-system error becomes an OutputError naming
    ``final`` (the caller re-raises anything else as it is)."""
    with _signals_deferred():
        _remove(tmp)
    cause = _output_oserror(e, tmp)
    if cause is not None and isinstance(e, Exception):
        raise OutputError(_explain(final, cause)) from e


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``final``; on success rename it to ``final``.

    An existing ``final`` directory is replaced only after the new one is complete; a ``final``
    that exists and is not a directory is refused (:class:`OutputError`), a symbolic link is
    followed. On any exception (signals too, after :func:`install_signal_cleanup`) the temporary
    directory is removed and ``final`` is left untouched (or absent). Failures to create or write
    the output (permissions, read-only or full file system, a file in the way) are raised as
    :class:`OutputError` naming ``final``. Stale temporaries of ``final`` left by dead processes on
    this host are removed before (they may hold the space needed) and after a successful write.
    """
    final = _resolve_final(final)
    if os.path.lexists(final) and not final.is_dir():
        raise OutputError(f"{final}: exists and is not a directory; refusing to replace it")
    _make_parent(final)
    remove_stale(final)  # a killed run's temporary may hold the space this one needs
    tmp = _temp_name(final, "tmp")
    try:
        os.mkdir(tmp)
    except OSError as e:
        raise OutputError(_explain(final, e)) from e
    fd = _lock(tmp)
    try:
        yield tmp
        with _signals_deferred():
            try:
                _swap_in(tmp, final)
            except OSError as e:
                raise OutputError(_explain(final, e)) from e
    except BaseException as e:
        _abandon(e, tmp, final)
        raise
    finally:
        _unlock(fd)
    remove_stale(final)


@contextmanager
def atomic_file(final: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temporary sibling of ``final`` for writing; rename it over ``final`` on success.

    The temporary is removed on any exception; stale temporaries of ``final`` left by dead
    processes on this host are removed after a success. Errors creating it are
    :class:`OutputError` naming ``final``."""
    final = _resolve_final(final)
    if final.is_dir():
        raise OutputError(f"{final}: exists and is a directory; refusing to replace it")
    _make_parent(final)
    tmp = _temp_name(final, "tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise OutputError(_explain(final, e)) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass
    try:
        with open(fd, mode, closefd=False) as f:
            yield f
        with _signals_deferred():
            try:
                os.replace(tmp, final)
            except OSError as e:
                raise OutputError(_explain(final, e)) from e
    except BaseException as e:
        _abandon(e, tmp, final)
        raise
    finally:
        os.close(fd)
    remove_stale(final)


def write_json(final: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON atomically."""
    with atomic_file(final) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
