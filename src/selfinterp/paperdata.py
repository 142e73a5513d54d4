"""The paper's data on demand: download the authors' files at a pinned commit, checked, cached.

The authors publish their data in their repository (``data/`` of dillonplunkett/self-interpretability)
without a licence file, so this package does not ship them: it ships a manifest
(``data/paper_data.json``: the pinned commit, and each file's size and sha256) and fetches the
files into the cache on request:

    selfinterp data paper                      # from GitHub (raw.githubusercontent.com)
    selfinterp data paper --from DIR           # from a local copy, checked the same way

The cache is ``~/.cache/selfinterp/paper-data/<commit>`` (``$SELFINTERP_CACHE/paper-data/<commit>``
when that variable is set; the same root as the models'). ``$SELFINTERP_PAPER_DATA_URL`` (or
``--base-url``) replaces the download location: the URL of a folder holding the files.

Every file goes to a temporary file beside its final place and is renamed only once its size
and sha256 match the manifest, so the cache never holds a half-written or altered file. Every
failure is a :class:`PaperDataError` whose message is one line naming the file.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .journal import sha256_file

URL_ENV = "SELFINTERP_PAPER_DATA_URL"
CHUNK = 1 << 16


class PaperDataError(RuntimeError):
    """The paper's data could not be fetched, or the cache does not hold them (one-line message)."""


class HTTPStatus(PaperDataError):
    """The server answered with an error status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Entry:
    """One file of the paper's data: its name, size, sha256, and what needs it."""

    name: str
    bytes: int
    sha256: str
    needed_by: str  # "analysis" or "documentation"

    @property
    def required(self) -> bool:
        """Whether the analysis needs the file (not only the documentation)."""
        return self.needed_by == "analysis"


@dataclass(frozen=True)
class Manifest:
    """Where the paper's data are pinned (repository, commit, folder) and every file's entry."""

    repository: str
    commit: str
    folder: str
    files: tuple[Entry, ...]

    @property
    def default_url(self) -> str:
        """The raw.githubusercontent.com URL of the data folder at the pinned commit."""
        return f"https://raw.githubusercontent.com/{self.repository}/{self.commit}/{self.folder}/"


@dataclass(frozen=True)
class Fetched:
    """What fetching did for one file: cached, downloaded, copied or absent."""

    name: str
    how: str  # "cached" (already there, checked), "downloaded", "copied", "absent" (optional, 404)


def manifest() -> Manifest:
    """The manifest of the paper's data shipped with the package (``data/paper_data.json``)."""
    data = json.loads((resources.files("selfinterp") / "data" / "paper_data.json").read_text(encoding="utf-8"))
    return Manifest(data["repository"], data["commit"], data["folder"],
                    tuple(Entry(f["name"], int(f["bytes"]), f["sha256"], f["needed_by"]) for f in data["files"]))


def cache_dir(m: Manifest | None = None) -> Path:
    """The cache directory of the paper's data at the manifest's pinned commit."""
    from .models import cache_base

    return cache_base() / "paper-data" / (m or manifest()).commit


def _is_valid(path: Path, e: Entry) -> bool:
    return path.is_file() and path.stat().st_size == e.bytes and sha256_file(path) == e.sha256


# --------------------------------------------------------------------------------------------
# Where the analysis finds them


def problems(directory: Path, m: Manifest | None = None) -> list[str]:
    """What is wrong with a directory as a copy of the paper's data (required files only)."""
    out = []
    for e in (m or manifest()).files:
        p = directory / e.name
        if not e.required:
            continue
        if not p.is_file():
            out.append(f"{e.name} is missing")
        elif not _is_valid(p, e):
            out.append(f"{e.name} does not match its sha256")
    return out


def location() -> Path:
    """The cached paper data, checked; a :class:`PaperDataError` saying what to run if absent."""
    m = manifest()
    d = cache_dir(m)
    bad = problems(d, m)
    if bad:
        what = "are not in the cache" if len(bad) == sum(e.required for e in m.files) else f"in the cache are incomplete ({bad[0]})"
        raise PaperDataError(f"the paper's data {what} ({d}): run `selfinterp data paper` first "
                             "(offline: `selfinterp data paper --from DIR` with a copy of the files)")
    return d


# --------------------------------------------------------------------------------------------
# Filling the cache


def _store(chunks: Iterator[bytes], e: Entry, dest: Path, where: str,
           on_bytes: Callable[[int], None]) -> None:
    """Write chunks to a temporary file beside ``dest``; rename only if size and sha256 match."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{e.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        h, n = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                h.update(chunk)
                n += len(chunk)
                on_bytes(len(chunk))
            f.flush()
            os.fsync(f.fileno())
        if n != e.bytes:
            raise PaperDataError(f"{e.name}: got {n:,} bytes from {where}, expected {e.bytes:,} "
                                 "(truncated or a different file); nothing was cached, try again")
        if h.hexdigest() != e.sha256:
            raise PaperDataError(f"{e.name}: sha256 {h.hexdigest()[:12]}... from {where} does not match the "
                                 f"manifest's {e.sha256[:12]}... (not the file of commit {manifest().commit[:7]}); "
                                 "nothing was cached")
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def _read_all(f: BinaryIO, e: Entry, expected: int | None, where: str) -> Iterator[bytes]:
    n = 0
    while chunk := f.read(CHUNK):
        n += len(chunk)
        yield chunk
    if expected is not None and n < expected:
        raise PaperDataError(f"{e.name}: the download from {where} stopped after {n:,} of {expected:,} bytes; "
                             "nothing was cached, try again")


def _download(url: str, e: Entry, timeout: float) -> Iterator[bytes]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        agent = f"selfinterp/{version('selfinterp')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        agent = "selfinterp"
    req = urllib.request.Request(url, headers={"User-Agent": agent})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            yield from _read_all(resp, e, int(length) if length and length.isdigit() else None, url)
    except urllib.error.HTTPError as err:
        raise HTTPStatus(f"{e.name}: HTTP {err.code} {err.reason} from {url}", err.code) from None
    except urllib.error.URLError as err:
        reason = err.reason.strerror if isinstance(err.reason, OSError) and err.reason.strerror else err.reason
        raise PaperDataError(f"{e.name}: cannot reach {urllib.parse.urlsplit(url).netloc} ({reason}); "
                             "check the network, or use --from DIR with a local copy of the files") from None
    except http.client.IncompleteRead as err:
        raise PaperDataError(f"{e.name}: the download from {url} stopped after {len(err.partial):,} bytes "
                             f"(connection closed early); nothing was cached, try again") from None
    except (http.client.HTTPException, socket.timeout, OSError) as err:
        raise PaperDataError(f"{e.name}: the download from {url} failed ({type(err).__name__}: {err}); "
                             "nothing was cached, try again") from None


def _copy(path: Path, e: Entry) -> Iterator[bytes]:
    try:
        with open(path, "rb") as f:
            yield from _read_all(f, e, None, str(path))
    except OSError as err:
        raise PaperDataError(f"{e.name}: cannot read {path} ({err.strerror or err})") from None


def fetch(base_url: str | None = None, source: Path | None = None, *, timeout: float = 60.0,
          on_file: Callable[[Entry], None] = lambda e: None,
          on_bytes: Callable[[int], None] = lambda n: None) -> tuple[Path, list[Fetched]]:
    """Fill the cache from ``base_url`` (default: ``$SELFINTERP_PAPER_DATA_URL``, else GitHub at the
    pinned commit) or from a local directory ``source``; files already cached and valid are kept.

    Returns the cache directory and what happened to each file. Raises :class:`PaperDataError`
    at the first file that cannot be had: files fetched before it stay (they are checked), the
    failing one leaves nothing behind.
    """
    m = manifest()
    if source is not None:
        source = Path(source)
        if not source.is_dir():
            raise PaperDataError(f"--from {source}: not a directory")
    else:
        base_url = base_url or os.environ.get(URL_ENV) or m.default_url
        if not base_url.endswith("/"):
            base_url += "/"
    dest_dir = cache_dir(m)
    created = not dest_dir.exists()
    dest_dir.mkdir(parents=True, exist_ok=True)
    for stale in dest_dir.glob(".*.part"):  # left by a killed earlier attempt
        stale.unlink(missing_ok=True)
    done: list[Fetched] = []
    try:
        for e in m.files:
            dest = dest_dir / e.name
            on_file(e)
            if _is_valid(dest, e):
                on_bytes(e.bytes)
                done.append(Fetched(e.name, "cached"))
                continue
            if source is not None:
                if not (source / e.name).is_file():
                    if not e.required:
                        done.append(Fetched(e.name, "absent"))
                        continue
                    raise PaperDataError(f"{e.name}: not in {source} (a copy of the paper's data/ folder "
                                         f"at commit {m.commit[:7]} has it)")
                _store(_copy(source / e.name, e), e, dest, str(source / e.name), on_bytes)
                done.append(Fetched(e.name, "copied"))
            else:
                url = base_url + urllib.parse.quote(e.name)
                try:
                    _store(_download(url, e, timeout), e, dest, url, on_bytes)
                except HTTPStatus as err:
                    if not e.required and err.code == 404:
                        done.append(Fetched(e.name, "absent"))  # documentation only: not worth failing over
                        continue
                    raise
                done.append(Fetched(e.name, "downloaded"))
    finally:
        if created and not any(dest_dir.iterdir()):
            dest_dir.rmdir()
    return dest_dir, done
