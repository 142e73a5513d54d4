"""The backend contract, checked the same way on every backend this machine can run (in the spirit
of scikit-learn's ``check_estimator``): hf on a tiny random model, simulated, openai against a fake
server on 127.0.0.1, and vllm where it is installed in this Python (where it is not, the vLLM venv
that .ci/run makes runs tests/vllm_inner, which checks the engine against transformers).

Each backend must: give P(A) in [0, 1] and a mass P(A) + P(B) in (0, 1] per decision prompt, the
same numbers in one batch as one prompt at a time and on a second call; give one reply per chat,
a chat's sampled reply depending on its own seed and not on the chats beside it; and, where it
offers constrained or expected-value reports, one report per chat with every attribute's number in
[-100, 100] (an SD >= 0 for expected values).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from selfinterp import prompts, scenarios
from selfinterp.backends import Backend, ChoiceProbs, ConstrainedReporter, ExpectedReporter
from selfinterp.backends.base import WEIGHT_MAX, WEIGHT_MIN
from selfinterp.design import sample_pairs

BACKENDS = ["hf", "simulated", "openai", "vllm"]
KEY = "sk-contract-test-0123456789"


@pytest.fixture(scope="module")
def bank():
    return scenarios.load_bank()[:3]


@pytest.fixture(params=BACKENDS)
def backend(request, bank, monkeypatch):
    name = request.param
    if name == "hf":
        from selfinterp.backends.hf import HFBackend

        yield HFBackend(str(request.getfixturevalue("tiny_model_dir")), progress=False, batch_size=4)
    elif name == "simulated":
        from selfinterp.backends.simulated import SimulatedBackend

        yield SimulatedBackend(bank, seed=0)
    elif name == "openai":
        pytest.importorskip("openai")
        from openai_fake import FakeOpenAI

        from selfinterp.backends.openai_api import OpenAIBackend

        monkeypatch.setenv("SI_CONTRACT_KEY", KEY)
        with FakeOpenAI(api_key=KEY) as srv:
            yield OpenAIBackend("gpt-4o-mini-2024-07-18", base_url=srv.base_url, api_key_env="SI_CONTRACT_KEY",
                                concurrency=2, sleep=lambda s: None)
    else:
        if importlib.util.find_spec("vllm") is None:
            pytest.skip("vllm is not installed in this Python (tests/vllm_inner checks it in the vLLM venv)")
        from selfinterp.backends.vllm import VLLMBackend, release

        yield VLLMBackend(str(request.getfixturevalue("tiny_model_dir")), seed=0)
        release()


def decision_chats(bank, per=2):
    return [prompts.decision_chat(s, p.a, p.b) for s in bank for p in sample_pairs(s, per, seed=0, purpose="contract")]


def report_chats(bank):
    pairs = [(s, sample_pairs(s, 1, seed=1, purpose="contract")[0]) for s in bank]
    return [prompts.introspection_chat(s, p.a, p.b) for s, p in pairs], [s.attribute_names for s, _ in pairs]


def test_is_a_backend_and_describes_itself(backend):
    assert isinstance(backend, Backend)
    assert isinstance(backend.info, dict) and backend.info.get("backend")


def test_choice_probabilities_and_mass(backend, bank):
    chats = decision_chats(bank)
    probs = backend.choice_probs(chats)
    assert isinstance(probs, ChoiceProbs) and len(probs) == len(chats)
    assert np.all((probs.p_a >= 0) & (probs.p_a <= 1))
    assert np.all((probs.mass > 0) & (probs.mass <= 1 + 1e-6))
    assert probs.choices == ["A" if p >= 0.5 else "B" for p in probs.p_a]


def test_a_batch_scores_as_its_prompts_one_by_one_and_again(backend, bank):
    chats = decision_chats(bank)
    together = backend.choice_probs(chats)
    alone = [backend.choice_probs([c]) for c in chats]
    np.testing.assert_allclose(together.p_a, [a.p_a[0] for a in alone], atol=1e-4)
    np.testing.assert_allclose(together.mass, [a.mass[0] for a in alone], atol=1e-4)
    np.testing.assert_allclose(backend.choice_probs(chats).p_a, together.p_a, atol=1e-6)


def test_one_reply_per_chat_and_a_sample_depends_on_its_own_seed_only(backend, bank):
    chats, _ = report_chats(bank)
    greedy = backend.generate(chats, max_new_tokens=12)
    assert len(greedy) == len(chats) and all(isinstance(t, str) for t in greedy)
    seeds = [11, 12, 13][: len(chats)]
    batch = backend.generate(chats, max_new_tokens=12, temperature=1.0, seed=seeds)
    single = [backend.generate([c], max_new_tokens=12, temperature=1.0, seed=[s])[0] for c, s in zip(chats, seeds)]
    assert batch == single


def test_constrained_reports_fill_every_attribute_in_range(backend, bank):
    if not isinstance(backend, ConstrainedReporter):
        pytest.skip(f"{backend.info['backend']} offers no constrained reports")
    chats, names = report_chats(bank)
    out = backend.constrained_reports(chats, names)
    assert len(out) == len(chats)
    for r, n in zip(out, names):
        assert r.mode == "constrained" and r.weights is not None and set(r.weights) == set(n)
        assert all(WEIGHT_MIN <= v <= WEIGHT_MAX for v in r.weights.values())


def test_expected_reports_give_a_mean_and_sd_per_attribute(backend, bank):
    if not isinstance(backend, ExpectedReporter):
        pytest.skip(f"{backend.info['backend']} offers no expected-value reports")
    chats, names = report_chats(bank)
    out = backend.expected_reports(chats, names)
    assert len(out) == len(chats)
    for r, n in zip(out, names):
        assert r.mode == "expected" and set(r.weights) == set(n) and set(r.sd) == set(n)
        assert all(WEIGHT_MIN <= v <= WEIGHT_MAX for v in r.weights.values())
        assert all(v >= 0 for v in r.sd.values())
