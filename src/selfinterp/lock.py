"""One writer per run directory: an exclusive lock on ``RUN_DIR/.lock``.

The lock is ``fcntl.flock`` on the file, which holds the owner's pid as text. The kernel drops a
flock when its holder dies (even by ``kill -9``), so a lock file left by a killed run is free to
take: the next run takes it over (and says whose it was). A flock is shared by the processes a
run forks, so the processes of one run share its lock; if the named pid is gone but a forked
child still holds the lock, the lock file is replaced and the new one is taken.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import Callable

LOCK_NAME = ".lock"


class RunLocked(RuntimeError):
    """Another live process is writing into the run directory."""

    def __init__(self, root: Path, pid: int | None):
        self.root, self.pid = root, pid
        who = f"pid {pid}" if pid is not None else "a process whose pid is not recorded"
        super().__init__(f"{root} is in use by another selfinterp run ({who}); wait for it to finish or stop it, "
                         f"or give another --out")


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_pid(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    try:
        return int(text)
    except ValueError:
        return None


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


class RunLock:
    """The lock of a run directory, held from :meth:`acquire` until :meth:`release` (or the
    process's end). ``note`` is told when a stale lock is taken over."""

    def __init__(self, root: str | Path, note: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.note = note or (lambda message: None)
        self.fd: int | None = None
        self.took_over: int | None = None  # the dead pid whose lock was taken over, if any

    def acquire(self) -> "RunLock":
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # retries only when the file was replaced under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                if not _try_flock(fd):
                    holder = _read_pid(fd)
                    if holder is None or pid_alive(holder):
                        raise RunLocked(self.root, holder)
                    # The recorded owner is dead but the lock is held: a child it forked keeps it.
                    self._replace_file(holder)
                    os.close(fd)
                    continue
                if os.fstat(fd).st_ino != self._inode():  # replaced between open and flock: again
                    os.close(fd)
                    continue
                previous = _read_pid(fd)
                if previous is not None and previous != os.getpid() and not pid_alive(previous):
                    self.took_over = previous
                    self.note(f"took over the lock of pid {previous}, which no longer runs")
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, f"{os.getpid()}\n".encode())
                os.fsync(fd)
                self.fd = fd
                return self
            except BaseException:
                if self.fd != fd:
                    os.close(fd)
                raise
        raise RunLocked(self.root, None)

    def _inode(self) -> int | None:
        try:
            return os.stat(self.path).st_ino
        except FileNotFoundError:
            return None

    def _replace_file(self, dead: int) -> None:
        tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
        tmp.write_text(f"{dead}\n")  # still the dead owner's, until the flock on the new file is taken
        os.replace(tmp, self.path)

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            finally:
                os.close(self.fd)  # closing drops the flock
                self.fd = None

    def __enter__(self) -> "RunLock":
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run(root: str | Path, note: Callable[[str], None] | None = None) -> RunLock:
    """Take the exclusive lock of a run directory, or raise :class:`RunLocked` naming its holder."""
    return RunLock(root, note).acquire()
