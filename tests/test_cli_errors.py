"""Bad input to the CLI is one line and a non-zero exit, never a traceback (issue 12, items 5 and 8)."""

import sys

import pytest
from typer.testing import CliRunner

from selfinterp.cli import app


def invoke(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def one_line_error(res, *parts):
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    assert res.output.rstrip().splitlines()[-1] == errors[0], res.output  # nothing after it
    for p in parts:
        assert p in errors[0], (p, errors[0])


@pytest.mark.parametrize("command", [
    ["run", "--preset", "simulated", "--out", "{tmp}/r"],
    ["export", "{tmp}/e"],
    ["analyze", "{tmp}"],
    ["plan"],
    ["scenarios", "show", "studio_apartment"],
])
@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_seeds_out_of_range(tmp_path, command, seed):
    res = invoke(*[c.format(tmp=tmp_path) for c in command], "--seed", seed)
    one_line_error(res, "seed")
    assert not (tmp_path / "r" / "stages").exists() and not (tmp_path / "e").exists()


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "binary.json").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00" * 100)
    (tmp_path / "binary.toml").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    (tmp_path / "dir.toml").mkdir()
    return tmp_path


@pytest.mark.parametrize("name, says", [("dir.json", "a directory, not a scenario file"),
                                        ("binary.json", "not a UTF-8 text file"),
                                        ("binary.csv", "not a UTF-8 text file")])
@pytest.mark.parametrize("command", [["scenarios", "list", "{f}"], ["scenarios", "show", "x", "--file", "{f}"],
                                     ["export", "{tmp}/out", "--scenarios", "{f}"],
                                     ["export", "{tmp}/out", "--roles", "{f}"]])
def test_directories_and_binary_files_as_scenario_files(bad_files, name, says, command):
    res = invoke(*[c.format(f=bad_files / name, tmp=bad_files) for c in command])
    one_line_error(res, name, says)


def test_scenarios_validate_a_directory_or_binary_file(bad_files):
    for name in ("dir.json", "binary.json", "binary.csv"):
        res = invoke("scenarios", "validate", bad_files / name)
        assert res.exit_code == 1 and "Traceback" not in res.output
        assert f"{bad_files / name}: " in res.output


@pytest.mark.parametrize("name, says", [("dir.toml", "a directory, not a configuration file"),
                                        ("binary.toml", "not a UTF-8 text file")])
def test_directories_and_binary_files_as_config_files(bad_files, name, says):
    one_line_error(invoke("run", bad_files / name, "--dry-run"), name, says)


def test_more_scenarios_than_the_bank_stops_before_any_stage(tmp_path):
    f = tmp_path / "big.toml"
    f.write_text('preset = "simulated"\nn_instilled = 1000\n')
    res = invoke("run", f, "--out", tmp_path / "r")
    one_line_error(res, "the bundled bank has 432 scenarios", "n_instilled + n_native = 1000 + 100 = 1100")
    assert not (tmp_path / "r" / "stages").exists() and not (tmp_path / "r" / "config.json").exists()


def test_export_into_an_existing_file(tmp_path):
    f = tmp_path / "existing"
    f.write_text("keep me")
    one_line_error(invoke("export", f), "exists and is not a directory")
    assert f.read_text() == "keep me"


def test_header_only_selections(tmp_path, paper_data):
    import shutil

    shutil.copy(paper_data / "scenarios.csv", tmp_path)
    (tmp_path / "m_instilled_selections.csv").write_text(
        (paper_data / "gpt-4o-2024-08-06_instilled_selections.csv").read_text().splitlines()[0] + "\n")
    res = invoke("analyze", tmp_path, "--no-figures", "--n-boot", "10")
    assert res.exit_code == 0 and "Traceback" not in res.output
    assert "m_instilled_selections.csv: no rows (a header only): skipped" in res.output.replace("\n", "")


def _openai_config(tmp_path, key_env="SI_TEST_NO_SUCH_KEY"):
    f = tmp_path / "api.toml"
    f.write_text(f'preset = "simulated"\nbackend = "openai"\nmodel = "gpt-4o-mini"\n[openai]\n'
                 f'api_key_env = "{key_env}"\nbase_url = "http://127.0.0.1:9/v1"\n')
    return f


def test_openai_backend_without_its_package_fails_before_any_stage(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # import openai -> ImportError
    monkeypatch.setenv("SI_TEST_NO_SUCH_KEY", "k")
    res = invoke("run", _openai_config(tmp_path), "--out", tmp_path / "r")
    one_line_error(res, "needs the openai package", "pip install 'selfinterp[openai]'")
    assert not (tmp_path / "r" / "stages").exists()


def test_no_api_key_names_the_variable_and_sends_nothing(tmp_path, monkeypatch):
    pytest.importorskip("openai")
    monkeypatch.delenv("SI_TEST_NO_SUCH_KEY", raising=False)
    res = invoke("run", _openai_config(tmp_path), "--out", tmp_path / "r")
    one_line_error(res, "no API key: set the environment variable SI_TEST_NO_SUCH_KEY", "set it to any value")
    assert not (tmp_path / "r" / "stages").exists()
    # A local server gets no made-up key either: the backend refuses to start without one.
    from selfinterp.backends.openai_api import OpenAIAPIError, OpenAIBackend

    with pytest.raises(OpenAIAPIError, match="SI_TEST_NO_SUCH_KEY"):
        OpenAIBackend("m", base_url="http://127.0.0.1:9/v1", api_key_env="SI_TEST_NO_SUCH_KEY")


def test_messages_keep_their_brackets(tmp_path):
    f = tmp_path / "s.json"
    f.write_text('[{"id": "x", "question": "q?", "attributes": [{"name": "a", "units": "u", "range": null}]}]')
    res = invoke("scenarios", "validate", f, "--k", "1")
    assert res.exit_code == 1
    assert "range: must be [min, max], got None" in res.output
    res = invoke("scenarios", "list", f)
    one_line_error(res, "range: must be [min, max], got None")
    g = tmp_path / "[weird].toml"
    g.write_text("preset = [1]\n")
    one_line_error(invoke("run", g, "--dry-run"), "[weird].toml: preset: unknown preset [1]")


@pytest.mark.parametrize("args,parts", [
    (["run", "--preset", "smoke", "--seed", "abc"], ["selfinterp run", "'--seed'", "valid integer"]),
    (["plan", "--trials", "1.5"], ["selfinterp plan", "'--trials'"]),
    (["plan", "--bogus"], ["No such option: --bogus"]),
    (["bogus"], ["No such command 'bogus'"]),
])
def test_usage_errors_are_one_line(args, parts):
    """A flag's value that does not parse (click's usage errors) is one `error:` line with exit
    code 2 from the installed command, not click's boxed usage text."""
    import subprocess

    p = subprocess.run([sys.executable, "-m", "selfinterp", *args], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in p.stderr, p.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])
