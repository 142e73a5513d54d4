"""A whole run through the openai backend and trainer, against a programmatic fake OpenAI server
on 127.0.0.1 (tests/openai_fake.py: synthetic answers, not a model), and the --dry-run plan.

The security test: a fake API key set in the environment must reach the server (as the bearer
token) and must appear in no file of the run directory, nor in what the run prints."""

import io
import json

import pytest
from rich.console import Console
from typer.testing import CliRunner

pytest.importorskip("openai")

from openai_fake import FakeOpenAI  # noqa: E402

from selfinterp import config  # noqa: E402
from selfinterp.backends.openai_api import OpenAIAPIError  # noqa: E402
from selfinterp.cli import app  # noqa: E402
from selfinterp.pipeline import Run  # noqa: E402

KEY = "sk-proj-FAKE-do-not-leak-7d1c0ffee5a1ad"


def api_config(base_url, **over):
    return config.build("smoke", overrides={
        "backend": "openai", "model": "gpt-4o-mini-2024-07-18", "n_instilled": 4, "n_native": 2,
        "openai": {"base_url": base_url, "api_key_env": "SI_FAKE_KEY", "poll_interval": 0, "concurrency": 4}, **over})


def test_whole_run_through_the_api_and_the_key_never_lands_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("SI_FAKE_KEY", KEY)
    out = io.StringIO()
    with FakeOpenAI(api_key=KEY) as srv:
        cfg = api_config(srv.base_url)
        res = Run(cfg, tmp_path, progress=False, console=Console(file=out, width=200)).execute()
        assert srv.bad_auth == 0
        # 4 jobs (instill, 3 introspection), each on its own uploaded file(s)
        assert len(srv.jobs) == 4 and len(srv.files) == 5
        n_requests = len(srv.requests)
        # the introspection jobs start from the instilled job's fine-tuned model
        instilled = json.loads((tmp_path / "models/instilled/manifest.json").read_text())
        assert instilled["trained_tokens"] == 1234 and instilled["fine_tuned_model"].startswith("ft:gpt-4o-mini")
        assert {j["model"] for j in srv.jobs.values()} == {"gpt-4o-mini-2024-07-18", instilled["fine_tuned_model"]}
        # a second run re-uses everything: no request at all
        Run(cfg, tmp_path, progress=False, console=Console(file=io.StringIO())).execute()
        assert len(srv.requests) == n_requests
        # a crash after the responses arrived but before the results were journaled: nothing is asked again
        for p in (tmp_path / "journal").glob("*.jsonl"):
            p.unlink()
        for p in (tmp_path / "stages").glob("*.json"):
            if p.stem not in ("design", "instill", "itrain_first", "itrain_last", "itrain_all"):
                p.unlink()
        res2 = Run(cfg, tmp_path, progress=False, console=Console(file=io.StringIO())).execute()
        assert len(srv.requests) == n_requests and res2 == res
    assert "instilled_reports" in res["models"]["gpt-4o-mini-2024-07-18"]
    # what the run used, from its own records
    from selfinterp.pipeline.costs import spent

    used = spent(tmp_path, cfg)
    assert used["stages"]["instill"]["training_tokens"] == 1234 and used["stages"]["itrain_all"]["training_tokens"] == 1234
    assert used["stages"]["validate"]["requests"] == cfg.n_instilled * cfg.n_eval_trials
    assert used["cost"] is None  # no price for a model on a server other than OpenAI's ...
    priced = config.build("smoke", file=None, overrides={**json.loads((tmp_path / "config.json").read_text()),
                                                         "openai": {"base_url": cfg.openai.base_url, "prices": {
                                                             cfg.model: {"input": 1, "output": 2, "training": 3}}}})
    used = spent(tmp_path, priced)  # ... unless the config gives one
    tokens = sum(r["input_tokens"] + 2 * r["output_tokens"] + 3 * r["training_tokens"] for r in used["stages"].values())
    assert used["cost"] == pytest.approx(tokens / 1e6)
    # every response was recorded as it arrived
    calls = [json.loads(line) for p in (tmp_path / "raw" / "api").glob("*.jsonl") for line in p.read_text().splitlines()]
    n_chat = sum(1 for r in srv.requests if r["path"] == "/v1/chat/completions")
    assert len(calls) == n_chat > 0
    # the key: nowhere in the run directory (any file, binary or text), nor in the console output
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 20
    for p in files:
        data = p.read_bytes()
        assert KEY.encode() not in data and b"do-not-leak" not in data, p
    assert KEY not in out.getvalue() and "do-not-leak" not in out.getvalue()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["openai"]["api_key_env"] == "SI_FAKE_KEY"


def test_external_trainer_uses_the_served_names(tmp_path, monkeypatch):
    monkeypatch.delenv("SI_FAKE_KEY", raising=False)
    names = {"instilled": "m-inst", "itrained_first": "m-first", "itrained_last": "m-last", "itrained_all": "m-all"}
    with FakeOpenAI() as srv:
        cfg = api_config(srv.base_url, trainer="external", openai={"base_url": srv.base_url, "models": names,
                                                                   "api_key_env": "SI_FAKE_KEY"})
        # No key: stopped before the first stage, nothing sent (no placeholder key is made up) ...
        with pytest.raises(OpenAIAPIError, match="set the environment variable SI_FAKE_KEY"):
            Run(cfg, tmp_path, progress=False, console=Console(file=io.StringIO())).execute()
        assert not srv.requests and not (tmp_path / "stages").exists()
        # ... and a local server that needs none takes any value the user sets.
        monkeypatch.setenv("SI_FAKE_KEY", "none")
        Run(cfg, tmp_path, progress=False, console=Console(file=io.StringIO())).execute()
        used = {json.loads(r["body"])["model"] for r in srv.requests}
    assert not srv.jobs and not srv.files
    assert used == {"gpt-4o-mini-2024-07-18", *names.values()}


def test_dry_run_prints_calls_tokens_and_cost():
    res = CliRunner().invoke(app, ["run", "--preset", "paper", "--backend", "openai", "--model",
                                   "gpt-4o-mini-2024-07-18", "--dry-run"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    text = res.output
    assert "20,000" in text and "15,000" in text  # choices + reports; training examples
    assert "train tok." in text and "USD" in text and "gpt-4o-mini-2024-07-18" in text
    total = [line for line in text.splitlines() if "total" in line][0]
    cost = float(total.split("│")[-2].strip().replace(",", ""))
    assert 5 < cost < 100  # ~8M trained tokens at $3/M dominate


def test_price_override_and_unknown_model(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('preset = "paper"\nbackend = "openai"\nmodel = "my-model"\n[openai.prices.my-model]\ninput = 1\n'
                 'output = 2\ntraining = 0\n')
    res = CliRunner().invoke(app, ["run", str(f), "--dry-run"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    total = [line for line in res.output.splitlines() if "total" in line][0]
    assert float(total.split("│")[-2].strip().replace(",", "")) > 3  # ~3.7M input tokens at $1/M
    res = CliRunner().invoke(app, ["run", "--preset", "paper", "--backend", "openai", "--model", "nope", "--dry-run"],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "no price for 'nope'" in res.output


def test_config_errors_name_the_openai_fields(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('backend = "openai"\ntrainer = "external"\n[openai]\nconcurrency = 0\nchoice_method = "x"\n')
    res = CliRunner().invoke(app, ["run", str(f), "--dry-run"])
    assert res.exit_code == 1
    assert "openai.concurrency" in res.output and "openai.choice_method" in res.output
    f.write_text('backend = "openai"\ntrainer = "external"\n')
    res = CliRunner().invoke(app, ["run", str(f), "--dry-run"])
    assert res.exit_code == 1 and "openai.models" in res.output and "itrained_first" in res.output
    res = CliRunner().invoke(app, ["run", "--preset", "smoke", "--backend", "hf", "--trainer", "openai", "--dry-run"])
    assert res.exit_code == 1 and "trainer 'openai' cannot serve backend 'hf'" in res.output


def test_runs_without_openai_settings_keep_their_stage_keys():
    a = config.build("cpu")
    assert set(a.hash_fields("backend", "model", "trainer", "openai")) == {"backend", "model"}
    b = config.build("smoke", overrides={"backend": "openai", "openai": {"concurrency": 3, "timeout": 5}})
    c = config.build("smoke", overrides={"backend": "openai"})
    d = config.build("smoke", overrides={"backend": "openai", "openai": {"choice_method": "greedy"}})
    assert b.hash_fields("openai") == c.hash_fields("openai") != d.hash_fields("openai")


def test_local_trainer_with_an_openai_compatible_inference_engine(tmp_path, tiny_model_dir, monkeypatch):
    """trainer = "hf" trains here (peft); the server answers for the models under the served names
    (as vLLM would with --lora-modules). The fake server stands in for that server."""
    pytest.importorskip("torch")
    monkeypatch.setenv("SI_FAKE_KEY", "none")  # a local server that needs no key: any value, none is made up
    names = {"instilled": "lora-inst", "itrained_first": "lora-first", "itrained_last": "lora-last",
             "itrained_all": "lora-all"}
    train = dict(method="lora", layers=1, cache_lower_layers=True, lr=1e-3, epochs=1, batch_size=8)
    with FakeOpenAI() as srv:
        cfg = config.build("smoke", overrides=dict(
            backend="openai", trainer="hf", model=str(tiny_model_dir), model_label="tiny", n_instilled=4, n_native=2,
            n_train=4, n_val=2, n_eval_trials=6, n_native_trials=6, n_reports=2, n_introspection=2, batch_size=8,
            instill=train, introspection=train,
            openai={"base_url": srv.base_url, "model": "base-served", "models": names, "api_key_env": "SI_FAKE_KEY"}))
        Run(cfg, tmp_path, progress=False, console=Console(file=io.StringIO())).execute()
        used = {json.loads(r["body"])["model"] for r in srv.requests}
    assert used == {"base-served", *names.values()} and not srv.jobs
    assert (tmp_path / "models" / "instilled" / "adapter").is_dir()  # trained locally
    assert json.loads((tmp_path / "models" / "itrained_all" / "manifest.json").read_text())["method"] == "lora"


def test_missing_key_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv("SI_UNSET_KEY", raising=False)
    f = tmp_path / "run.toml"
    f.write_text('preset = "smoke"\nbackend = "openai"\nmodel = "gpt-4o-mini"\n[openai]\napi_key_env = "SI_UNSET_KEY"\n')
    res = CliRunner().invoke(app, ["run", str(f), "--out", str(tmp_path / "r")])
    assert res.exit_code == 1, res.output
    assert "no API key: set the environment variable SI_UNSET_KEY" in res.output and "Traceback" not in res.output


def test_cli_run_prints_what_was_used(tmp_path, monkeypatch):
    monkeypatch.setenv("SI_FAKE_KEY", KEY)
    with FakeOpenAI(api_key=KEY) as srv:
        f = tmp_path / "run.toml"
        f.write_text(f'preset = "smoke"\nbackend = "openai"\nmodel = "gpt-4o-mini-2024-07-18"\nn_instilled = 4\n'
                     f'n_native = 0\n[openai]\nbase_url = "{srv.base_url}"\napi_key_env = "SI_FAKE_KEY"\n'
                     f'poll_interval = 0\n[openai.prices.gpt-4o-mini-2024-07-18]\ninput = 1\noutput = 2\ntraining = 3\n')
        res = CliRunner().invoke(app, ["run", str(f), "--out", str(tmp_path / "r")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "used on the API (gpt-4o-mini-2024-07-18)" in res.output and KEY not in res.output
    total = [line for line in res.output.splitlines() if "total" in line][-1]
    assert float(total.split("│")[-2].strip()) > 0
