"""Files that others read, written whole or not at all; work that processes share, done once under a lock.

Every file a user or a later run reads (select outputs, tables, run files, caches, converted models) is written to a
temporary sibling and renamed into place (``os.replace``, atomic on one file system): a killed or failed write
leaves the old file intact, or nothing. Work that several processes may ask for at once (an extraction cache entry,
a converted model, a run folder, a select output) is done by one of them under a ``filelock`` lock; the others wait
(with one line saying so) and then read its result.

- :func:`atomic_write_text`, :func:`atomic_write_bytes`, :func:`atomic_write_json` (strict JSON: :func:`strict_json`);
- :func:`atomic_path`: a temporary file name for writers that take a path (safetensors, pandas, matplotlib);
- :func:`atomic_folder`: a temporary folder renamed into place (replacing the old one) when the block succeeds;
- :func:`locked`: one writer per target (``<parent>/.locks/<name>.lock``);
- :func:`clean_orphans`: temporaries left by dead processes, removed on the next start;
- :func:`check_writable`: a folder we are about to write to, checked before any slow work.

Temporaries are named ``.<name>.tmp~<host>~<pid>~<random>``: a process on this host that is no longer alive left
an orphan; one from another host (a shared file system) counts as orphaned once older than :data:`STALE_SECONDS`.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

#: A temporary written by a process on another host counts as orphaned after this many seconds.
STALE_SECONDS = 24 * 3600

_TMP = re.compile(r"^\.(?P<name>.+)\.tmp~(?P<host>[A-Za-z0-9_-]{1,32})~(?P<pid>\d+)~[0-9a-f]{8}$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname() or "host")[:32] or "host"


def temp_name(path: str | os.PathLike) -> Path:
    """A fresh temporary sibling of ``path``: ``.<name>.tmp~<host>~<pid>~<random>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp~{_host()}~{os.getpid()}~{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def is_orphan(path: str | os.PathLike, *, now: float | None = None) -> bool:
    """True when ``path`` is a temporary of :func:`temp_name` whose writer is gone: a dead process of this host, or
    any writer once the temporary is older than :data:`STALE_SECONDS`."""
    path = Path(path)
    m = _TMP.match(path.name)
    if m is None:
        return False
    pid = int(m["pid"])
    if m["host"] == _host():
        if pid == os.getpid():
            return False
        if not _pid_alive(pid):
            return True
    try:
        age = (time.time() if now is None else now) - path.lstat().st_mtime
    except FileNotFoundError:
        return False
    return age > STALE_SECONDS


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_orphans(folder: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Remove the orphaned temporaries (files or folders, :func:`is_orphan`) directly inside ``folder`` whose target
    name starts with ``prefix``; returns what was removed. A missing folder has none."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return removed
    for entry in entries:
        m = _TMP.match(entry.name)
        if m is not None and m["name"].startswith(prefix) and is_orphan(entry):
            _remove(entry)
            removed.append(entry)
    return removed


# ---------------------------------------------------------------- strict JSON


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-Infinity) replaced by ``None``, so that it serialises as strict
    JSON (``null``), which every parser reads; dicts, lists and tuples are walked."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # a numpy / torch scalar
        return strict_json(obj.item())
    return obj


def dumps_strict(obj: Any, **kwargs) -> str:
    """``json.dumps`` of :func:`strict_json` ``(obj)`` with ``allow_nan=False``: never a bare NaN or Infinity."""
    return json.dumps(strict_json(obj), allow_nan=False, **kwargs)


# ---------------------------------------------------------------- atomic writes


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file name beside ``path``; when the block ends without an error it is flushed to disk
    (``fsync``, whatever wrote it: ``torch.save``, ``to_csv``, ``savefig``), renamed to ``path`` and the rename
    flushed too, so that a power loss never leaves an empty file under the final name; on an error it is removed
    (``path`` is left as it was). The parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk (best effort: a platform or file system that cannot
    open a folder for it is skipped)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
                      default=str) -> Path:
    """Write ``obj`` as strict JSON (:func:`dumps_strict`: non-finite floats become ``null``) plus a newline,
    atomically."""
    return atomic_write_text(path, dumps_strict(obj, indent=indent, sort_keys=sort_keys, default=default,
                                                ensure_ascii=False) + "\n")


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; when the block ends without an error it replaces ``path`` (an old
    folder there is moved aside first, then removed), otherwise it is removed and ``path`` is left as it was.
    Replacing is atomic for readers that take the folder's lock; others may briefly find no folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    tmp.mkdir()
    old = None
    try:
        yield tmp
        if path.exists() or path.is_symlink():
            old = temp_name(path)
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, old):
            if leftover is not None and (leftover.exists() or leftover.is_symlink()):
                _remove(leftover)


# ---------------------------------------------------------------- locks

def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of ``target``: ``<parent>/.locks/<name>.lock``."""
    target = Path(target)
    return target.parent / ".locks" / f"{target.name}.lock"


@contextmanager
def locked(target: str | os.PathLike, what: str, *, enabled: bool = True) -> Iterator[None]:
    """Hold the lock of ``target`` (:func:`lock_path`, a ``filelock.FileLock``) for the block: one writer per
    target across processes (and machines sharing the file system). While another process holds it, print once
    ``waiting for another process that is computing <what> (lock <path>)`` to stderr, then wait for it.
    ``enabled=False`` takes no lock (the non-main ranks of ``accelerate launch``, which follow the main one)."""
    if not enabled:
        yield
        return
    from filelock import FileLock, Timeout

    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path.resolve(), is_singleton=True)  # one object per file: a nested take in a process re-enters
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process that is computing {what} (lock {path})", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def compute_once(target: str | os.PathLike, what: str, load: Callable[[], Any], compute: Callable[[], Any], *,
                 enabled: bool = True) -> Any:
    """A cached result that parallel processes compute once: ``load()`` (``None`` while there is none), else, under
    ``target``'s lock (:func:`locked`), ``load()`` again (another process may have written it while this one
    waited), else ``compute()``, which computes and writes it. ``enabled=False``: ``compute()``, nothing read, no
    lock."""
    if not enabled:
        return compute()
    out = load()
    if out is not None:
        return out
    with locked(target, what):
        out = load()
        return compute() if out is None else out


# ---------------------------------------------------------------- checks before slow work


def check_writable(folder: str | os.PathLike, what: str, fix: str) -> Path:
    """Create ``folder`` if needed and check that a file can be written in it (by writing and removing one), before
    any slow work; a ``PermissionError`` / ``NotADirectoryError`` / ``OSError`` whose one-line message names
    ``what``, the folder, the cause and ``fix`` otherwise."""
    folder = Path(folder).expanduser()
    for parent in [folder, *folder.parents]:
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(f"{what} {folder}: {parent} is a file, not a folder; {fix}")
        if parent.exists():
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temp_name(folder / "write-check")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        cls = PermissionError if isinstance(err, PermissionError) else OSError
        raise cls(f"{what} {folder}: cannot write there ({err.strerror or err}); {fix}") from None
    return folder
