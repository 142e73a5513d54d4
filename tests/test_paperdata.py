"""`selfinterp data paper`: the paper's data downloaded at a pinned commit, checked, cached.

The download path runs against HTTP servers on 127.0.0.1 started here: one serving the files,
one serving an altered file, one that closes the connection early, and a port nobody listens on.
Every failure is one line naming the file, and leaves nothing in the cache. So that these run in
any clone, they use a manifest of the committed synthetic study (tests/data/synthetic) in place
of the paper's; the paper's own manifest and a download of the paper's files are checked where
../shared/paper-data exists.
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import threading
from functools import partial
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfinterp import paperdata
from selfinterp.cli import app

run = CliRunner().invoke
M = paperdata.manifest()
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


class Truncating(Quiet):
    """Announces a file's full length, sends half of it, and closes the connection."""

    def do_GET(self):
        path = Path(self.directory) / self.path.lstrip("/")
        if not path.is_file():
            return self.send_error(404)
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def serve():
    servers = []

    def start(directory: Path, handler=Quiet) -> str:
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(directory)))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def manifest_of(directory: Path, optional: tuple[str, ...] = ()) -> paperdata.Manifest:
    return paperdata.Manifest("someone/somewhere", FAKE_COMMIT, "data", tuple(
        paperdata.Entry(p.name, p.stat().st_size, paperdata.sha256_file(p),
                        "documentation" if p.name in optional else "analysis")
        for p in sorted(directory.iterdir())))


@pytest.fixture
def fake(synthetic_data, monkeypatch) -> paperdata.Manifest:
    """The synthetic study's files as the manifest (config.json optional, like the paper's README)."""
    m = manifest_of(synthetic_data, optional=("config.json",))
    monkeypatch.setattr(paperdata, "manifest", lambda: m)
    return m


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SELFINTERP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(paperdata.URL_ENV, raising=False)
    return tmp_path / "cache" / "paper-data" / paperdata.manifest().commit


@pytest.fixture
def copy_of(synthetic_data, fake, tmp_path):
    """A served copy of the manifest's files, to alter."""
    d = tmp_path / "served"
    shutil.copytree(synthetic_data, d)
    return d


def one_line_error(res, *parts: str) -> str:
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, res.output
    for p in parts:
        assert p in lines[0], lines[0]
    return lines[0]


def cached_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# --------------------------------------------------------------------------------------------


def test_manifest_matches_the_shared_copy(paper_data):
    """The committed checksums are those of the paper's files, and list what the analysis reads."""
    from selfinterp.layout import classify

    names = {e.name for e in M.files}
    assert M.commit == "1b723c657215d3d0cf08fbaab40efb752339b400"
    assert {"README.md", "scenarios.csv", "instilled_weights.csv"} <= names
    assert names - {"README.md", "scenarios.csv", "instilled_weights.csv"} == \
        {p.name for p in paper_data.iterdir() if classify(p.name)}
    for e in M.files:
        assert e.bytes == (paper_data / e.name).stat().st_size, e.name
        assert e.sha256 == paperdata.sha256_file(paper_data / e.name), e.name
    assert M.default_url == ("https://raw.githubusercontent.com/dillonplunkett/self-interpretability/"
                             "1b723c657215d3d0cf08fbaab40efb752339b400/data/")


def download_and_analyze(source: Path, m: paperdata.Manifest, cache: Path, url: str, out: Path) -> dict:
    res = run(app, ["data", "paper", "--base-url", url])
    assert res.exit_code == 0, res.output
    assert f"{len(m.files)} downloaded" in res.output
    assert cached_files(cache) == sorted(e.name for e in m.files)  # no temporary files left
    assert paperdata.problems(cache) == [] and paperdata.location() == cache
    # Again: every file is checked and kept, nothing is fetched (the server could be gone).
    res = run(app, ["data", "paper", "--base-url", "http://127.0.0.1:9/"])
    assert res.exit_code == 0 and f"{len(m.files)} cached" in res.output, res.output
    res = run(app, ["analyze", "--paper", "--out", str(out), "--n-boot", "50", "--no-figures"])
    assert res.exit_code == 0, res.output
    return json.loads((out / "results.json").read_text())


def test_download_fills_the_cache_and_analyze_paper_uses_it(fake, synthetic_data, cache, serve, tmp_path):
    j = download_and_analyze(synthetic_data, fake, cache, serve(synthetic_data), tmp_path / "results")
    assert j["source"] == str(cache) and list(j["models"]) == ["simulated"]


def test_the_papers_files_download(paper_data, cache, serve, tmp_path):
    j = download_and_analyze(paper_data, M, cache, serve(paper_data), tmp_path / "results")
    assert list(j["models"]) == ["gpt-4o-2024-08-06", "gpt-4o-mini-2024-07-18"]


def test_base_url_from_the_environment(fake, synthetic_data, cache, serve, monkeypatch):
    monkeypatch.setenv(paperdata.URL_ENV, serve(synthetic_data))
    res = run(app, ["data", "paper"])
    assert res.exit_code == 0, res.output
    assert paperdata.problems(cache) == []


def test_a_corrupt_cached_file_is_fetched_again(fake, synthetic_data, cache, serve):
    url = serve(synthetic_data)
    assert run(app, ["data", "paper", "--base-url", url]).exit_code == 0
    victim = cache / "instilled_weights.csv"
    victim.write_text("scenario,attr1\n")
    assert "instilled_weights.csv does not match its sha256" in paperdata.problems(cache)
    res = run(app, ["analyze", "--paper"])
    one_line_error(res, "incomplete", "instilled_weights.csv", "selfinterp data paper")
    res = run(app, ["data", "paper", "--base-url", url])
    assert res.exit_code == 0 and "1 downloaded" in res.output, res.output
    assert paperdata.problems(cache) == []


def test_checksum_mismatch_is_refused(copy_of, cache, serve):
    name = "simulated_weight_reports.csv"
    data = bytearray((copy_of / name).read_bytes())
    i = data.index(b",", 200) + 1  # one digit changed: same size, other content
    data[i] = ord("7") if data[i] != ord("7") else ord("3")
    (copy_of / name).write_bytes(bytes(data))
    res = run(app, ["data", "paper", "--base-url", serve(copy_of)])
    one_line_error(res, name, "sha256", "does not match", "nothing was cached")
    assert name not in cached_files(cache)
    assert not [n for n in cached_files(cache) if n.endswith(".part")]
    assert paperdata.problems(cache)  # incomplete: analyze --paper refuses
    one_line_error(run(app, ["analyze", "--paper"]), "selfinterp data paper")


def test_wrong_size_is_refused(copy_of, cache, serve):
    name = "scenarios.json"
    with open(copy_of / name, "ab") as f:
        f.write(b"\n")
    res = run(app, ["data", "paper", "--base-url", serve(copy_of)])
    one_line_error(res, name, "expected", "bytes")
    assert name not in cached_files(cache)


def test_partial_download_is_refused(fake, synthetic_data, cache, serve):
    res = run(app, ["data", "paper", "--base-url", serve(synthetic_data, Truncating), "--timeout", "10"])
    line = one_line_error(res, fake.files[0].name, "stopped after", "nothing was cached")
    assert f"{fake.files[0].bytes // 2:,}" in line
    assert cached_files(cache) == []  # not even the empty directory


def test_http_error_names_the_file(copy_of, cache, serve):
    (copy_of / "instilled_weights.csv").unlink()
    res = run(app, ["data", "paper", "--base-url", serve(copy_of)])
    one_line_error(res, "instilled_weights.csv", "HTTP 404")
    assert "instilled_weights.csv" not in cached_files(cache)


def test_documentation_file_may_be_absent(copy_of, cache, serve):
    (copy_of / "config.json").unlink()
    res = run(app, ["data", "paper", "--base-url", serve(copy_of)])
    assert res.exit_code == 0 and "1 absent" in res.output, res.output
    assert paperdata.location() == cache


def test_no_network(fake, cache):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = run(app, ["data", "paper", "--base-url", f"http://127.0.0.1:{port}/"])
    one_line_error(res, fake.files[0].name, f"cannot reach 127.0.0.1:{port}", "--from DIR")
    assert cached_files(cache) == [] and not cache.exists()


def test_from_a_local_copy(synthetic_data, copy_of, cache):
    res = run(app, ["data", "paper", "--from", str(synthetic_data)])
    assert res.exit_code == 0 and f"{len(paperdata.manifest().files)} copied" in res.output, res.output
    assert paperdata.location() == cache
    shutil.rmtree(cache)
    (copy_of / "roles.csv").write_text("not needed\n")  # extra files are ignored
    victim = "simulated_instilled_selections.csv"
    (copy_of / victim).write_bytes((copy_of / victim).read_bytes().replace(b",B,", b",A,", 1))
    res = run(app, ["data", "paper", "--from", str(copy_of)])
    one_line_error(res, victim, "does not match")
    assert victim not in cached_files(cache) and "roles.csv" not in cached_files(cache)
    (copy_of / victim).unlink()
    one_line_error(run(app, ["data", "paper", "--from", str(copy_of)]), victim, f"not in {copy_of}")
    one_line_error(run(app, ["data", "paper", "--from", str(copy_of / "nope")]), "not a directory")


def test_from_the_shared_copy(paper_data, cache):
    res = run(app, ["data", "paper", "--from", str(paper_data)])
    assert res.exit_code == 0 and f"{len(M.files)} copied" in res.output, res.output
    assert paperdata.location() == cache


def test_analyze_needs_a_directory_or_paper(tmp_path):
    one_line_error(run(app, ["analyze"]), "give a results DIRECTORY, or --paper")
    one_line_error(run(app, ["analyze", str(tmp_path), "--paper"]), "not both")
