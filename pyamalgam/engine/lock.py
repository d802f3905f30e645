"""One run per folder: an exclusive lock on ``FOLDER/.lock`` for as long as a run writes there.

Two processes training into one folder overwrite each other's checkpoints and interleave their
logs. :class:`FolderLock` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on the lock file: a second
process is refused at once with :class:`FolderInUseError` (naming the folder and the holder's
pid), and the kernel drops the lock when the holder exits, however it exits, so a file left by
a killed run does not stand in the way (it is only a name; the lock is what counts). On release
the holder deletes the file while it still holds the lock (a process that opened it meanwhile
sees that its file is gone and opens the new one), so a finished run leaves its folder clean.

Within one process the lock is shared (by holder): several objects of one script may use a
folder one after the other, and what they do at the same time is the script's business. A lock
taken with ``subfolders=True`` (the demo's ``--out``) also gives back, when released, the locks
this process took inside the folder (its stages' Amalgamators), so that they do not wait for
the garbage collector. On a platform without ``fcntl`` (Windows) there is no lock.
"""
from __future__ import annotations

import atexit
import errno
import os
import threading
import warnings
import weakref
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

__all__ = ["FolderLock", "FolderInUseError", "LOCK_NAME"]

LOCK_NAME = ".lock"
_held: dict = {}  # real path of a lock file -> [fd, holders (FolderLock ids), pid]: this process's locks
_mutex = threading.Lock()


class FolderInUseError(ValueError):
    """Another process holds the folder's lock. A ValueError: the command line reports it as an
    unusable argument (exit code 2), before any work starts."""

    def __init__(self, message: str, folder, pid):
        super().__init__(message)
        self.folder, self.pid = Path(folder), pid


class FolderLock:
    """The lock of ``folder`` (created if needed); ``what`` names it in the error ("--out");
    ``subfolders``: :meth:`release` also releases this process's locks inside ``folder``."""

    def __init__(self, folder, what: str = "folder", *, subfolders: bool = False):
        self.folder, self.what, self.subfolders = Path(folder), what, subfolders
        self.path = self.folder / LOCK_NAME
        self._key = None

    def acquire(self) -> "FolderLock":
        if fcntl is None or self._key is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        with _mutex:
            held = _held.get(key)
            if held is not None and held[2] != os.getpid():  # inherited through fork(): the parent's, not ours
                held = None
            if held is not None and _same_file(held[0], self.path):
                held[1].add(id(self))
            else:  # first here, or our file was deleted under us (e.g. the folder was removed): take it anew
                fd = _take(self.path, self.folder, self.what)
                if fd is None:  # a file system without flock: run unlocked, as before locks existed
                    return self
                if held is not None:
                    os.close(held[0])
                _held[key] = [fd, (held[1] if held is not None else set()) | {id(self)}, os.getpid()]
        self._key = key
        return self

    def release(self) -> None:
        """Give the lock back (the last holder in this process deletes the file); idempotent."""
        if self._key is None:
            return
        with _mutex:
            held = _held.get(self._key)
            if held is not None and held[2] == os.getpid() and id(self) in held[1]:  # not if swept meanwhile
                held[1].discard(id(self))
                if not held[1]:
                    _drop(self._key)
            if self.subfolders:
                inside = os.path.dirname(self._key) + os.sep
                for key in [k for k, h in _held.items()
                            if k != self._key and k.startswith(inside) and h[2] == os.getpid()]:
                    _drop(key)
        self._key = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _drop(key: str) -> None:
    """Delete the lock file while still holding it (see the module docstring), then unlock."""
    fd = _held.pop(key)[0]
    if _same_file(fd, Path(key)):
        Path(key).unlink(missing_ok=True)
    os.close(fd)


@atexit.register
def _release_all() -> None:
    """At exit, delete the lock files this process still holds (an exception may have skipped a
    release); the kernel would drop the locks anyway, this keeps the folders clean."""
    with _mutex:
        for key in [k for k, h in _held.items() if h[2] == os.getpid()]:  # not a forked child's parent's
            _drop(key)


def _take(path: Path, folder: Path, what: str):
    """An fd of ``path`` with the exclusive lock on it, or FolderInUseError; None where the file
    system cannot lock (some network mounts)."""
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise FolderInUseError(f"{what} {folder} is in use by another run (pid {pid}, which holds {path}); "
                                   f"two runs in one folder would overwrite each other's checkpoints and logs. "
                                   f"Wait for it to finish, or use another folder", folder, pid) from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                warnings.warn(f"{path}: this file system cannot lock ({e.strerror}); concurrent runs are not refused",
                              RuntimeWarning, stacklevel=4)
                return None
            raise
        if _same_file(fd, path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # the holder deleted the file between our open and our lock: open the new one
    raise RuntimeError(f"could not lock {path}: it keeps being replaced")


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _holder(fd: int):
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return "unknown"
    return int(text) if text.isdigit() else "unknown"


def hold_folders(owner) -> None:
    """Lock ``owner.checkpoint_dir`` and ``owner.log_dir`` (rank 0, the one writer) for as long as
    ``owner`` (a trainer) lives: a second process on them is refused (:class:`FolderInUseError`).
    One lock per folder when both name the same one."""
    if owner.rank != 0:
        return
    folders = {}
    for folder, what in ((owner.checkpoint_dir, "checkpoint_dir"), (owner.log_dir, "log_dir")):
        if folder is not None:
            folders.setdefault(Path(folder).resolve(), (folder, what))
    locks: list = []
    try:
        for folder, what in folders.values():
            locks.append(FolderLock(folder, what).acquire())
    except BaseException:
        _release(locks)
        raise
    weakref.finalize(owner, _release, locks)  # also at exit; a killed process's locks go with it


def _release(locks) -> None:
    for lock in locks:
        lock.release()
