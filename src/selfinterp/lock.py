"""One writer per run directory: an exclusive lock on ``RUN_DIR/.lock``.

The lock is ``fcntl.flock`` on the file, which holds the owner's pid as text. The kernel drops a
flock when its holder dies (even by ``kill -9``), so a lock file left by a killed run is free to
take: the next run takes it over (and says whose it was). A flock is shared by the processes a
run forks, so the processes of one run share its lock; if the named pid is gone but a forked
child still holds the lock, the lock file is replaced and the new one is taken.

The processes of one multi-process launch (``torchrun``, ``accelerate launch``: ``WORLD_SIZE`` > 1)
are one run: rank 0 takes the lock and writes the launch's identity beside its pid (``group
<run id>@<master address>:<port>``); every other rank joins it, waiting until the lock is held
by its own launch, and is refused like any other process when another run holds it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
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
    """Whether a process with this pid exists (one owned by another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def process_group() -> tuple[str, int] | None:
    """(the launch's identity, this process's rank) under a multi-process launch, else None."""
    try:
        world, rank = int(os.environ.get("WORLD_SIZE") or 1), int(os.environ.get("RANK") or 0)
    except ValueError:
        return None
    if world <= 1:
        return None
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") or "-"  # torchrun's default is "none" for every job:
    where = f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"  # so the rendezvous too
    return f"{run_id}@{where}", rank


def _read_holder(fd: int) -> tuple[int | None, str | None]:
    os.lseek(fd, 0, os.SEEK_SET)
    lines = os.read(fd, 512).decode("ascii", "replace").splitlines()
    try:
        pid = int(lines[0].strip()) if lines else None
    except ValueError:
        pid = None
    group = next((line[len("group "):].strip() for line in lines[1:] if line.startswith("group ")), None)
    return pid, group


def _read_pid(fd: int) -> int | None:
    return _read_holder(fd)[0]


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

    def __init__(self, root: str | Path, note: Callable[[str], None] | None = None, join_timeout: float = 600.0):
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.note = note or (lambda message: None)
        self.fd: int | None = None
        self.took_over: int | None = None  # the dead pid whose lock was taken over, if any
        self.group = process_group()
        self.joined = False  # a rank > 0 sharing its launch's lock (it holds no flock of its own)
        self.join_timeout = join_timeout  # how long a rank > 0 waits for rank 0 to take the lock

    def acquire(self) -> "RunLock":
        """This lock, taken (a rank > 0 joins its launch's); RunLocked if another run holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.group is not None and self.group[1] != 0:
            return self._join(self.group[0])
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
                group = f"group {self.group[0]}\n" if self.group else ""
                os.write(fd, f"{os.getpid()}\n{group}".encode())
                os.fsync(fd)
                self.fd = fd
                return self
            except BaseException:
                if self.fd != fd:
                    os.close(fd)
                raise
        raise RunLocked(self.root, None)

    def _join(self, group: str) -> "RunLock":
        """Share the lock that rank 0 of this launch holds, waiting for rank 0 to take it. Read
        only (a probing flock could make rank 0's own attempt fail): rank 0 writes its launch's
        identity only once it holds the flock, and clears the file when it lets go."""
        deadline = time.monotonic() + self.join_timeout
        pid = None
        while True:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    pid, holder = _read_holder(fd)
                finally:
                    os.close(fd)
            except FileNotFoundError:
                pid, holder = None, None
            if holder == group:
                self.joined = True
                return self
            if pid is not None and pid_alive(pid):  # held by another run (or a process outside any launch)
                raise RunLocked(self.root, pid)
            if time.monotonic() > deadline:
                raise RunLocked(self.root, pid)
            time.sleep(0.2)

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
        """Let go of the lock: the lock file is emptied and its flock dropped (a joined rank stops sharing)."""
        self.joined = False
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            finally:
                os.close(self.fd)  # closing drops the flock
                self.fd = None

    def __enter__(self) -> "RunLock":
        return self if self.fd is not None or self.joined else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run(root: str | Path, note: Callable[[str], None] | None = None) -> RunLock:
    """Take the exclusive lock of a run directory, or raise :class:`RunLocked` naming its holder."""
    return RunLock(root, note).acquire()
