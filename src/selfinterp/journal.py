"""Never lose finished work: an append-only record of model calls, and atomic file writes.

Every model call's result is appended to a JSONL journal as soon as it completes, flushed and
fsync'd, so a crash, Ctrl-C or ``kill -9`` loses at most the calls in flight; a re-run reads
the journal and makes only the calls it does not hold. A line cut off by a crash is detected
(it does not parse) and cut away before new lines are appended.

One writer at a time: a journal holds an exclusive lock on its file (``flock``) from opening to
:meth:`Journal.close`, and a second writer gets :class:`JournalBusy` rather than interleaving
its lines with the first's. The lock dies with its process, so a crash never leaves it behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable


class JournalBusy(RuntimeError):
    """Another writer holds the journal."""


class Journal:
    """An append-only JSONL record of model-call results by key, held under an exclusive lock."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, Any] = {}
        self.n_truncated = 0
        self._file = open(self.path, "a", encoding="utf-8")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise JournalBusy(f"{self.path}: another writer holds this journal (a second run into the same "
                              "directory?); wait for it to finish, or stop it") from None
        self._load()  # under the lock: nobody appends while a cut-off line is cut away

    def _load(self) -> None:
        data = self.path.read_bytes()
        if not data:
            return
        good_end = 0
        pos = 0
        for line in data.split(b"\n"):
            end = pos + len(line) + 1
            if end > len(data):  # no newline: the crash cut this line (or the file is empty)
                if line:
                    self.n_truncated += 1
                break
            try:
                rec = json.loads(line)
                self.records[rec["key"]] = rec["value"]
                good_end = end
            except (json.JSONDecodeError, KeyError, TypeError):
                self.n_truncated += 1
                break  # everything after a corrupt line is untrusted
            pos = end
        if good_end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __getitem__(self, key: str) -> Any:
        return self.records[key]

    def __len__(self) -> int:
        return len(self.records)

    def record_many(self, items: Iterable[tuple[str, Any]]) -> None:
        """Append results (one line each) and make them durable before returning."""
        lines = []
        for key, value in items:
            self.records[key] = value
            lines.append(json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n")
        self._file.write("".join(lines))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the journal's file, releasing its lock."""
        self._file.close()  # releases the lock

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def unreadable(e: OSError | UnicodeDecodeError, kind: str, formats: str) -> str:
    """Why a file could not be read as text, in words for a one-line error after its path: a
    ``kind`` file ("configuration", "scenario", "CSV") expected in one of ``formats``."""
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, IsADirectoryError):
        return f"a directory, not a {kind} file"
    if isinstance(e, UnicodeDecodeError):
        return f"not a UTF-8 text file (byte {e.start}): is it a {formats} file?"
    return f"cannot be read: {e.strerror or e}"


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)``, then rename ``tmp`` to ``path``: readers see the old file or the new one,
    never half of one, and a failed write leaves no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (:func:`atomic_write`), flushed to disk before the rename."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (numpy values and paths included)."""
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def sha256_file(path: str | Path) -> str:
    """The SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """The SHA-256 hex digest of ``obj`` as JSON with sorted keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_jsonable).encode()).hexdigest()
