"""The openai backend against local servers on 127.0.0.1.

The HTTP exchanges in tests/fixtures/openai/ are SYNTHETIC recordings: written by hand after the
OpenAI API reference (no machine of this project can reach api.openai.com), replayed in order by
a local server that also checks what the real ``openai`` client sends. They test the fine-tuning
job lifecycle (upload, create, poll, succeed, fail, re-attach after a restart) and the chat
calls (logprobs, samples, greedy, retries on 429/5xx honouring Retry-After, errors with code and
message, the API key redacted).
"""

import json

import numpy as np
import pytest

pytest.importorskip("openai")

from openai_fake import ReplayServer, load_exchanges  # noqa: E402

from selfinterp.backends.openai_api import OpenAIBackend, report_schema  # noqa: E402
from selfinterp.openai_client import (FineTuneFailed, OpenAIAPIError, connect, describe_error, public_url,  # noqa: E402
                                      redact)
from selfinterp.training.openai_jobs import FineTuneJob  # noqa: E402
from selfinterp.pipeline.costs import price_for  # noqa: E402

KEY = "sk-synthetic-TESTKEY-0123456789abcdefXYZ"
CHAT = [{"role": "system", "content": "s"}, {"role": "user", "content": "[DECISION TASK] A or B?"}]


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("SI_TEST_KEY", KEY)
    return KEY


def backend(server, sleeps=None, **kw):
    return OpenAIBackend("gpt-4o-mini-2024-07-18", base_url=server.base_url, api_key_env="SI_TEST_KEY",
                         concurrency=1, sleep=(sleeps.append if sleeps is not None else (lambda s: None)), **kw)


def job(server, out, sleeps=None, sleep=None):
    """The trainer's fine-tuning job on the fake server (polls every 5 s, growing to 20)."""
    sleep = sleep or (sleeps.append if sleeps is not None else (lambda s: None))
    conn = connect(server.base_url, "SI_TEST_KEY", concurrency=1, sleep=sleep)
    return FineTuneJob(conn, "gpt-4o-mini-2024-07-18", out, poll_interval=5, max_poll_interval=20)


def datasets(tmp_path):
    train, val = tmp_path / "instill_train.jsonl", tmp_path / "instill_val.jsonl"
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "A"}]}
    train.write_text(json.dumps(row) + "\n")
    val.write_text(json.dumps(row) + "\n")
    return train, val


def finetune(srv, tmp_path, sleeps=None):
    train, val = datasets(tmp_path)
    return job(srv, tmp_path / "model", sleeps).run(train, val, 7, "t-instilled", {"n_epochs": 3, "batch_size": None})


# -- fine-tuning lifecycle


def test_upload_create_poll_succeed(tmp_path, key):
    sleeps = []
    with ReplayServer(load_exchanges("finetune_lifecycle.json", "succeed")) as srv:
        ref = finetune(srv, tmp_path, sleeps)
    assert srv.mismatches == [] and srv.exchanges == []
    assert ref.adapter == "ft:gpt-4o-mini-2024-07-18:synthetic-org:t-instilled:AbC123"
    m = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert m["job_id"] == "ftjob-abc1" and m["trained_tokens"] == 152340
    assert m["training_file"] == "file-train1" and m["validation_file"] == "file-val1"
    # the job's metrics file is kept, its last losses in the manifest
    assert m["final_train_loss"] == 0.48 and m["final_valid_loss"] == 0.55 and m["steps"] == 3
    assert (tmp_path / "model" / "openai_results_file-result1.csv").read_text().startswith("step,train_loss")
    state = json.loads((tmp_path / "model" / "openai_job.json").read_text())
    assert state["job"]["status"] == "succeeded" and state["files"]["training_file"]["id"] == "file-train1"
    # polls back off (5, 7.5) and the 503's Retry-After (2 s) is honoured
    assert sleeps == [5, 2.0, 7.5]
    # the key went out as a bearer token and nowhere into the run's files
    assert all(r["headers"]["authorization"] == f"Bearer {KEY}" for r in srv.requests)
    for p in (tmp_path / "model").iterdir():
        assert KEY not in p.read_text()


def test_failed_job_shows_code_and_message_and_a_rerun_starts_a_new_job_without_reuploading(tmp_path, key):
    with ReplayServer(load_exchanges("finetune_lifecycle.json", "fail")) as srv:
        with pytest.raises(FineTuneFailed) as e:
            finetune(srv, tmp_path)
    assert srv.mismatches == []
    msg = str(e.value)
    assert "ftjob-bad1 failed: invalid_training_file: The job failed due to an invalid training file" in msg
    state = json.loads((tmp_path / "model" / "openai_job.json").read_text())
    assert "job" not in state and state["failed_jobs"][0]["id"] == "ftjob-bad1"
    with ReplayServer(load_exchanges("finetune_lifecycle.json", "retry_after_failure")) as srv:
        ref = finetune(srv, tmp_path)
    assert srv.mismatches == [] and [r["path"] for r in srv.requests] == [
        "/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/ftjob-abc1", "/v1/files/file-result1/content"]  # no upload
    assert ref.metadata["trained_tokens"] == 152340


def test_restart_reattaches_to_the_recorded_job(tmp_path, key):
    class Crash(Exception):
        pass

    def crash(_):
        raise Crash

    train, val = datasets(tmp_path)
    with ReplayServer(load_exchanges("finetune_lifecycle.json", "before_crash")) as srv:
        with pytest.raises(Crash):
            job(srv, tmp_path / "model", sleep=crash).run(train, val, 7, "t-instilled", {"n_epochs": 3})
    assert srv.mismatches == [] and srv.exchanges == []
    # "restart": a new backend, a new process's worth of state; only polls go out
    with ReplayServer(load_exchanges("finetune_lifecycle.json", "after_restart")) as srv:
        ref = finetune(srv, tmp_path)
    assert srv.mismatches == [] and srv.exchanges == []
    assert {r["path"] for r in srv.requests} == {"/v1/fine_tuning/jobs/ftjob-abc1", "/v1/files/file-result1/content"}
    assert ref.adapter.startswith("ft:gpt-4o-mini")


def test_changed_dataset_is_uploaded_again_and_gets_a_new_job(tmp_path, key):
    with ReplayServer(load_exchanges("finetune_lifecycle.json", "succeed")) as srv:
        finetune(srv, tmp_path)
    (tmp_path / "instill_train.jsonl").write_text("changed\n")
    b_ex = load_exchanges("finetune_lifecycle.json", "succeed")
    upload, create, done, download = b_ex[0], b_ex[2], b_ex[-2], b_ex[-1]
    upload["response"]["body"]["id"] = create["request"]["json"]["training_file"] = "file-train2"
    with ReplayServer([upload, create, done, download]) as srv:  # train re-uploaded; val re-used; new job
        job(srv, tmp_path / "model").run(tmp_path / "instill_train.jsonl", tmp_path / "instill_val.jsonl", 7,
                                         "t-instilled", {"n_epochs": 3})
    assert srv.mismatches == []
    state = json.loads((tmp_path / "model" / "openai_job.json").read_text())
    assert len(state["superseded_jobs"]) == 1


def test_rejected_job_creation_is_not_retried_and_names_code_and_message(tmp_path, key):
    with ReplayServer(load_exchanges("finetune_lifecycle.json", "create_rejected")) as srv:
        with pytest.raises(OpenAIAPIError) as e:
            finetune(srv, tmp_path)
    assert "create fine-tuning job: HTTP 400 model_not_available: Model gpt-4o-mini-2024-07-18 is not available" \
        in str(e.value)
    state = json.loads((tmp_path / "model" / "openai_job.json").read_text())
    assert set(state["files"]) == {"training_file", "validation_file"} and "job" not in state


# -- choices and reports


def test_choice_probs_from_top_logprobs(key, tmp_path):
    with ReplayServer(load_exchanges("chat.json", "logprobs")) as srv:
        b = backend(srv, record_path=tmp_path / "calls.jsonl")
        probs = b.choice_probs([CHAT, CHAT])
    assert srv.mismatches == []
    # "A" 0.6 + " A" 0.05 vs "B" 0.3; the second reply has neither letter in its top 20
    np.testing.assert_allclose(probs.p_a, [0.65 / 0.95, 0.5])
    np.testing.assert_allclose(probs.mass, [0.95, 0.0], atol=1e-12)
    lines = (tmp_path / "calls.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["request"]["top_logprobs"] == 20
    assert b.usage["requests"] == 2 and b.usage["prompt_tokens"] == 340


def test_choice_probs_by_sampling_and_greedy(key):
    with ReplayServer(load_exchanges("chat.json", "sample")) as srv:
        probs = backend(srv, choice_method="sample", n_samples=5).choice_probs([CHAT])
    assert srv.mismatches == []
    assert probs.p_a[0] == pytest.approx(3 / 4) and probs.mass[0] == pytest.approx(4 / 5)
    with ReplayServer(load_exchanges("chat.json", "greedy")) as srv:
        probs = backend(srv, choice_method="greedy").choice_probs([CHAT])
    assert srv.mismatches == [] and probs.p_a[0] == 0.0 and probs.mass[0] == 1.0


def test_retries_on_429_and_5xx_honouring_retry_after(key):
    sleeps = []
    with ReplayServer(load_exchanges("chat.json", "rate_limited")) as srv:
        b = backend(srv, sleeps, backoff=0.5)
        probs = b.choice_probs([CHAT])
    assert srv.mismatches == [] and len(srv.requests) == 3
    assert sleeps[0] == 3.0  # Retry-After
    assert 0.25 <= sleeps[1] <= 1.0  # exponential backoff (0.5 * 2 ** 1, jittered to 50-100%)
    assert b.caller.n_retries == 2 and probs.p_a[0] == pytest.approx(0.65 / 0.95)


def test_errors_show_code_and_message(key):
    with ReplayServer(load_exchanges("chat.json", "bad_request")) as srv:
        with pytest.raises(OpenAIAPIError) as e:
            backend(srv).choice_probs([CHAT])
    assert len(srv.requests) == 1  # a 400 is not retried
    assert "HTTP 400 integer_above_max_value: Invalid 'top_logprobs'" in str(e.value)


def test_the_key_never_appears_in_errors(key):
    with ReplayServer(load_exchanges("chat.json", "unauthorized")) as srv:
        with pytest.raises(OpenAIAPIError) as e:
            backend(srv).choice_probs([CHAT])
    msg = str(e.value)
    assert "HTTP 401 invalid_api_key" in msg and "sk-synth" not in msg and KEY not in msg
    assert redact(f"x {KEY} y", [KEY]) == "x [redacted] y"
    assert "abc" not in describe_error(RuntimeError("token sk-abc123456 leaked"))


def test_constrained_reports_ask_for_a_strict_schema(key):
    with ReplayServer(load_exchanges("chat.json", "report_schema")) as srv:
        reps = backend(srv).constrained_reports([CHAT], [["price", "size", "age", "d", "e"]])
    assert srv.mismatches == [], srv.mismatches
    body = json.loads(srv.requests[0]["body"])
    assert body["response_format"] == report_schema(["price", "size", "age", "d", "e"])
    assert reps[0].mode == "constrained" and reps[0].text.startswith('{"price": 40')


def test_missing_key_for_the_official_api_names_the_variable(monkeypatch):
    monkeypatch.delenv("SI_NO_SUCH_KEY", raising=False)
    with pytest.raises(OpenAIAPIError, match="SI_NO_SUCH_KEY"):
        OpenAIBackend("gpt-4o-mini", api_key_env="SI_NO_SUCH_KEY")


def test_prices_and_public_urls():
    assert price_for("gpt-4o-mini-2024-07-18")["training"] == 3.0
    assert price_for("gpt-4o-mini") == price_for("gpt-4o-mini-2024-07-18")  # alias -> newest priced snapshot
    assert price_for("my-model") is None and price_for("my-model", {"my-model": {"input": 1, "output": 2}})["output"] == 2
    assert public_url("http://user:pw@127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


def test_key_from_the_keyring_when_the_variable_is_unset(monkeypatch):
    import sys
    import types

    from selfinterp.openai_client import read_api_key

    monkeypatch.delenv("SI_KR_KEY", raising=False)
    fake = types.SimpleNamespace(get_password=lambda service, user: KEY if (service, user) == ("selfinterp", "SI_KR_KEY") else None)
    monkeypatch.setitem(sys.modules, "keyring", fake)
    assert read_api_key("SI_KR_KEY", "https://api.openai.com/v1") == KEY
    monkeypatch.setenv("SI_KR_KEY", "sk-from-env-123")
    assert read_api_key("SI_KR_KEY", "https://api.openai.com/v1") == "sk-from-env-123"


def test_credentials_in_the_base_url_are_refused():
    from selfinterp import config

    with pytest.raises(config.ConfigError, match="openai.base_url must not carry credentials"):
        config.build("smoke", overrides={"backend": "openai", "openai": {"base_url": "https://u:sk-x@host/v1"}})


def test_sampling_on_a_server_that_ignores_n_asks_one_by_one(key):
    with ReplayServer(load_exchanges("chat.json", "sample_n_ignored")) as srv:
        probs = backend(srv, choice_method="sample", n_samples=3).choice_probs([CHAT])
    assert srv.mismatches == [] and srv.exchanges == []
    assert probs.p_a[0] == pytest.approx(1 / 3) and probs.mass[0] == 1.0


def test_retry_after_forms():
    import email.utils
    import time
    import types

    from selfinterp.openai_client import _retry_after

    def exc(headers):
        return types.SimpleNamespace(response=types.SimpleNamespace(headers=headers))

    assert _retry_after(exc({"retry-after": "7"})) == 7.0
    assert _retry_after(exc({"retry-after-ms": "250", "retry-after": "7"})) == 0.25
    assert 25 < _retry_after(exc({"retry-after": email.utils.formatdate(time.time() + 30, usegmt=True)})) <= 30
    assert _retry_after(exc({"retry-after": "soon"})) is None and _retry_after(exc({})) is None


def test_concurrency_is_bounded_and_results_keep_their_order(key):
    from openai_fake import FakeOpenAI

    chats = [[{"role": "user", "content": f"[DECISION TASK] prompt {i}"}] for i in range(12)]
    with FakeOpenAI(api_key=KEY, delay=0.1) as srv:
        b = OpenAIBackend("m", base_url=srv.base_url, api_key_env="SI_TEST_KEY", concurrency=3)
        together = b.choice_probs(chats)
        one_by_one = [b.choice_probs([c]).p_a[0] for c in chats]
    assert srv.max_in_flight == 3
    np.testing.assert_allclose(together.p_a, one_by_one)
