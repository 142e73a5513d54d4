"""The transformers backend, on a tiny random model with SmolLM2's real tokenizer and template."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from selfinterp import prompts, scenarios
from selfinterp.backends import Backend, ConstrainedReporter, json_object_end
from selfinterp.design import sample_pairs

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def sharp_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with larger random weights: its P(A) varies from prompt to prompt (the
    default initialisation gives ~0.5 everywhere, which would hide padding or position bugs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    out = tmp_path_factory.mktemp("sharp-llama")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def backend(sharp_model_dir):
    from selfinterp.backends.hf import HFBackend

    return HFBackend(str(sharp_model_dir), batch_size=4, progress=False)


@pytest.fixture(scope="module")
def bank():
    return scenarios.load_bank()


def decision_chats(bank, n_scenarios=4, per=2):
    return [prompts.decision_chat(s, p.a, p.b) for s in bank[:n_scenarios] for p in sample_pairs(s, per, seed=0)]


def test_backend_implements_the_protocol(backend):
    assert isinstance(backend, Backend)
    assert isinstance(backend, ConstrainedReporter)
    assert backend.info["device"] == "cpu" and backend.info["dtype"] == "float32"
    assert backend.info["folded_system"] is False  # SmolLM2's template has a system role


def test_answer_letters_are_single_distinct_tokens(backend):
    a, b = backend.answer_ids
    assert a != b
    tok = backend.tokenizer
    assert tok.decode([a]) == "A" and tok.decode([b]) == "B"
    assert backend.info["answer_tokens"] == {"A": a, "B": b}


def test_multi_token_answers_are_refused(backend):
    from selfinterp.chat_template import AnswerTokenError, answer_token_ids

    prompt = backend.render(prompts.chat("hi"))
    with pytest.raises(AnswerTokenError, match="not a single token"):
        answer_token_ids(backend.tokenizer, prompt, ("A", "Zyxwvut qrs"))
    with pytest.raises(AnswerTokenError, match="same token"):
        answer_token_ids(backend.tokenizer, prompt, ("A", "A"))


def test_batched_p_a_matches_one_prompt_at_a_time(backend, bank):
    chats = decision_chats(bank)
    lengths = {len(backend.tokenizer(backend.render(c))["input_ids"]) for c in chats}
    assert len(lengths) > 3, "the test needs prompts of different lengths (left padding)"
    batched = backend.choice_probs(chats)
    single = [backend.choice_probs([c]) for c in chats]
    p_single = np.array([s.p_a[0] for s in single])
    m_single = np.array([s.mass[0] for s in single])
    assert np.std(p_single) > 1e-3, "P(A) should vary across prompts, or the comparison is vacuous"
    assert np.max(np.abs(batched.p_a - p_single)) < 1e-4
    assert np.max(np.abs(batched.mass - m_single)) < 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prefix_scoring_equals_whole_prompts(sharp_model_dir, bank, attn):
    """Scoring with each scenario's prompt prefix run once gives the whole prompts' P(A) and mass
    (float32, within 1e-5): scenarios of different prefix lengths, more prompts per scenario than
    a batch holds, and a prompt that shares nothing with the others."""
    from selfinterp.backends.hf import HFBackend, encode
    from selfinterp.decoder import prefix_groups

    shared = HFBackend(str(sharp_model_dir), batch_size=4, progress=False)
    whole = HFBackend(str(sharp_model_dir), batch_size=4, progress=False, share_prefix=False)
    for b in (shared, whole):
        b.model.config._attn_implementation = attn
    chats = decision_chats(bank, 3, 6)
    for k, chat in enumerate(chats):  # three system prompts of different lengths: three prefix groups
        chat[0] = {**chat[0], "content": "Context " + "and more " * (k // 6) + chat[0]["content"]}
    chats.append([{"role": "user", "content": "Something else: A or B?"}])
    groups = prefix_groups(encode(shared.tokenizer, [shared.render(c) for c in chats]), shared.tokenizer)
    assert sum(len(m) > 1 for p, m in groups if p) >= 2 and len({p for p, _ in groups if p}) >= 2
    assert shared.info["shared_prefix_scoring"] and not whole.info["shared_prefix_scoring"]
    a, b = shared.choice_probs(chats), whole.choice_probs(chats)
    assert np.std(b.p_a) > 1e-3
    np.testing.assert_allclose(a.p_a, b.p_a, atol=1e-5)
    np.testing.assert_allclose(a.mass, b.mass, atol=1e-5)


def test_probabilities_are_in_range(backend, bank):
    cp = backend.choice_probs(decision_chats(bank, 2, 2))
    assert len(cp) == 4
    assert np.all((cp.p_a > 0) & (cp.p_a < 1))
    assert np.all((cp.mass > 0) & (cp.mass <= 1))
    assert cp.choices == ["A" if p >= 0.5 else "B" for p in cp.p_a]


def test_bfloat16_models_score_through_a_float32_head(sharp_model_dir, bank):
    """In bfloat16 the lm_head runs in float32 (head_dtype): P(A) is that of the bfloat16 model's
    last hidden state through the float32 head, not of logits rounded to bfloat16."""
    from selfinterp.backends.hf import HFBackend, encode

    chats = decision_chats(bank, n_scenarios=4, per=2)
    head32 = HFBackend(str(sharp_model_dir), dtype="bfloat16", batch_size=4, progress=False)
    head16 = HFBackend(str(sharp_model_dir), dtype="bfloat16", head_dtype="model", batch_size=4, progress=False)
    assert head32.info["head_dtype"] == "float32" and head16.info["head_dtype"] == "bfloat16"
    a, b = head16.answer_ids
    weight = head16.model.get_output_embeddings().weight.float()
    expected = []
    with torch.inference_mode():
        for row in encode(head16.tokenizer, [head16.render(c) for c in chats]):
            out = head16.model(input_ids=torch.tensor([row]), output_hidden_states=True, logits_to_keep=1)
            assert out.logits.dtype == torch.bfloat16
            logits = out.hidden_states[-1][0, -1].float() @ weight.T
            expected.append(torch.sigmoid(logits[a] - logits[b]).item())
    got = head32.choice_probs(chats).p_a
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(head16.choice_probs(chats).p_a - expected).max() > 1e-4  # the rounding the head avoids


def test_json_object_end():
    assert json_object_end('{"a": 1} tail') == 8
    assert json_object_end('```json\n{"a": {"b": 2}}\n```') == len('```json\n{"a": {"b": 2}}')
    assert json_object_end('{"a}": "{"}x') == len('{"a}": "{"}')  # braces inside strings
    assert json_object_end('{"a": "\\"}"}') == len('{"a": "\\"}"}')  # escaped quote
    assert json_object_end('{"a": 1') is None
    assert json_object_end("no json") is None


class Scripted:
    """A logits processor that makes every row write ``text`` token by token (then more)."""

    def __init__(self, tokenizer, text):
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        self.start = None
        self.calls = 0

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        self.calls += 1
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[min(step, len(self.ids) - 1)]] = 0
        return forced


def test_generation_stops_at_the_end_of_the_json_object(backend, bank):
    obj = '{"a": {"b": "x}"}, "c": -2}'
    script = Scripted(backend.tokenizer, obj + " and then some more text that should never be generated")
    chats = decision_chats(bank, 2, 1)
    texts = backend.generate(chats, max_new_tokens=60, logits_processor=[script])
    assert texts == [obj, obj]
    n_obj = len(backend.tokenizer(obj, add_special_tokens=False)["input_ids"])
    assert script.calls == n_obj  # stopped right after the closing brace, not at max_new_tokens


def test_generation_without_json_runs_to_the_token_limit(backend, bank):
    chats = decision_chats(bank, 3, 1)
    texts = backend.generate(chats, max_new_tokens=5, stop_at_json=False)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    # Greedy decoding is deterministic and does not depend on the batch.
    assert backend.generate(chats[:1], max_new_tokens=5, stop_at_json=False) == texts[:1]


def test_sampled_generation_depends_on_each_chats_own_seed_not_its_batch(backend, bank):
    """Issue 12: one generator per row, so a resumed run (other batches) samples the same replies."""
    chats = decision_chats(bank, 3, 2)
    seeds = [101, 7, 2 ** 31 - 1, 0, 55, 3]
    kw = dict(max_new_tokens=6, stop_at_json=False, temperature=1.5)
    whole = backend.generate(chats, seed=seeds, **kw)
    assert backend.generate(chats, seed=seeds, **kw) == whole
    assert [backend.generate([c], seed=[sd], **kw)[0] for c, sd in zip(chats, seeds)] == whole
    assert backend.generate(chats[::-1], seed=seeds[::-1], **kw)[::-1] == whole
    assert backend.generate(chats, seed=[sd + 1 for sd in seeds], **kw) != whole  # the seed does matter
    assert backend.generate(chats, seed=[5] * 6, max_new_tokens=6, stop_at_json=False, temperature=1.5,
                            top_p=0.5) is not None
    names = [s.attribute_names for s in bank[:3] for _ in range(2)]
    reports = backend.constrained_reports(chats, names, temperature=1.5, seed=seeds)
    assert [backend.constrained_reports([c], [n], temperature=1.5, seed=[sd])[0] for c, n, sd in
            zip(chats, names, seeds)] == reports


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_constrained_reports_always_parse(backend, bank, temperature):
    chats, names = [], []
    for s in bank[:3]:
        for p in sample_pairs(s, 2, seed=0):
            chats.append(prompts.introspection_chat(s, p.a, p.b))
            names.append(s.attribute_names)
    # Other numbers of attributes and awkward names, in the same batches.
    names[1] = ["x"]
    names[2] = ['quote " and \\ backslash', "café ☕", "with, comma: and } brace", "a b", "1", "-", "z"]
    reports = backend.constrained_reports(chats, names, temperature=temperature, seed=3)
    assert len(reports) == len(chats)
    for report, expected in zip(reports, names):
        assert report.mode == "constrained"
        parsed = json.loads(report.text)
        assert list(parsed) == list(expected)
        assert parsed == report.weights
        assert all(type(v) is int and -100 <= v <= 100 for v in parsed.values())


def test_constrained_number_vocabulary_only_writes_valid_numbers(backend):
    from selfinterp.backends.hf import NUMBER_PREFIXES, VALID_NUMBERS

    vocab = backend.number_vocab()
    # Every path through the transitions stays a prefix of a valid number.
    for prefix, ids in vocab.transitions.items():
        assert all(prefix + vocab.texts[i] in NUMBER_PREFIXES for i in ids)
    # Every valid number can be written (single-digit tokens exist).
    reachable, frontier = set(), {""}
    while frontier:
        nxt = {p + vocab.texts[i] for p in frontier for i in vocab.transitions[p]}
        reachable |= nxt
        frontier = nxt
    assert VALID_NUMBERS <= reachable


def test_a_finetune_output_loads_as_an_adapter(tiny_model_dir, bank, tmp_path):
    """What selfinterp.training.finetune writes, this backend loads (adapter=the output directory), and it
    answers as it was trained."""
    from selfinterp.backends.hf import HFBackend
    from selfinterp.training.finetune import FinetuneConfig, finetune

    base = HFBackend(str(tiny_model_dir), progress=False)
    s = bank[0]
    train = [{"messages": prompts.decision_chat(s, p.a, p.b, "B")} for p in sample_pairs(s, 4, seed=0)]
    config = FinetuneConfig(method="lora", epochs=4, batch_size=4, lr=5e-2, lora_rank=4, autocast=None,
                            warmup_ratio=0.0, schedule="constant")
    out = finetune(str(tiny_model_dir), train, None, config, tmp_path / "run", progress=False)
    assert out.manifest["method"] == "lora"
    tuned = HFBackend(str(tiny_model_dir), adapter=str(out.path), progress=False)
    chats = [prompts.decision_chat(s, p.a, p.b) for p in sample_pairs(s, 4, seed=0)]
    before, after = base.choice_probs(chats), tuned.choice_probs(chats)
    assert np.all(after.p_a < before.p_a)  # trained towards "B"


def test_importing_selfinterp_backends_does_not_import_torch():
    code = "import sys, selfinterp, selfinterp.backends, selfinterp.models; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _brute_force_slot(backend, context, end):
    """A number slot's distribution from plain whole-sequence forwards, one per prefix of every
    token path the constrained mode allows (its options renormalised at each step)."""
    from selfinterp.backends.hf import VALID_NUMBERS

    vocab = backend.number_vocab()
    probs, memo, best = {}, {}, {}

    def logp_next(path):
        if path not in memo:
            ids = torch.tensor([context + list(path)])
            memo[path] = torch.log_softmax(backend.model(input_ids=ids).logits[0, -1].float(), -1)
        return memo[path]

    def walk(path, text, logp):
        options = list(vocab.transitions.get(text, [])) + ([end] if text in VALID_NUMBERS else [])
        lp = torch.log_softmax(logp_next(path)[options], -1) if len(options) > 1 else torch.zeros(1)
        for t, l in zip(options, lp.tolist()):
            if t == end:
                probs[int(text)] = probs.get(int(text), 0.0) + np.exp(logp + l)
                if logp + l > best.get(int(text), (-np.inf,))[0]:
                    best[int(text)] = (logp + l, path)
            else:
                walk(path + (t,), text + vocab.texts[t], logp + l)

    with torch.inference_mode():
        walk((), "", 0.0)
    return probs, best


def test_expected_reports_are_the_mean_of_the_number_distribution(sharp_model_dir, bank):
    """Two slots checked against a brute-force walk of whole-sequence forwards: each slot's mean
    and SD, and the second slot read after the first's most probable number."""
    from selfinterp.backends.hf import HFBackend, _report_plan

    backend = HFBackend(str(sharp_model_dir), batch_size=4, progress=False)
    s = bank[0]
    p = sample_pairs(s, 1, seed=0)[0]
    chat = prompts.introspection_chat(s, p.a, p.b)
    names = s.attribute_names[:2]
    report = backend.expected_reports([chat], [names])[0]
    assert report.mode == "expected" and json.loads(report.text) == pytest.approx(report.weights, abs=1e-4)
    plan = _report_plan(backend.tokenizer, names)
    context = backend.tokenizer(backend.render(chat), add_special_tokens=False)["input_ids"] + plan[0]
    for j, name in enumerate(names):
        probs, best = _brute_force_slot(backend, context, plan[2 * j + 2][0])
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert len(probs) == 201 and all(-100 <= v <= 100 for v in probs)
        mean = sum(v * q for v, q in probs.items())
        sd = np.sqrt(sum(q * (v - mean) ** 2 for v, q in probs.items()))
        assert report.weights[name] == pytest.approx(mean, abs=1e-3)
        assert report.sd[name] == pytest.approx(sd, abs=1e-3) and sd > 1  # a random model is unsure
        if j + 1 < len(names):
            context = context + list(best[max(probs, key=probs.get)][1]) + plan[2 * j + 2]


@pytest.mark.parametrize("share_prefix", [True, False])
def test_expected_reports_parse_and_do_not_depend_on_the_forward_path(sharp_model_dir, bank, share_prefix):
    from selfinterp.backends import ExpectedReporter
    from selfinterp.backends.hf import HFBackend

    chats, names = [], []
    for s in bank[:2]:
        p = sample_pairs(s, 1, seed=0)[0]
        chats.append(prompts.introspection_chat(s, p.a, p.b))
        names.append(s.attribute_names)
    names[1] = ['quote " and \\ backslash', "café ☕", "with, comma: and } brace"]
    shared = HFBackend(str(sharp_model_dir), batch_size=4, progress=False, share_prefix=True)
    assert isinstance(shared, ExpectedReporter)
    reports = shared.expected_reports(chats, names)
    other = HFBackend(str(sharp_model_dir), batch_size=3, progress=False, share_prefix=share_prefix)
    again = other.expected_reports(chats, names)
    for r, a, expected in zip(reports, again, names):
        assert list(json.loads(r.text)) == list(expected)
        assert all(-100 <= v <= 100 for v in r.weights.values()) and all(v >= 0 for v in r.sd.values())
        assert a.weights == pytest.approx(r.weights, abs=1e-3) and a.sd == pytest.approx(r.sd, abs=1e-3)


def test_a_backend_around_a_model_in_memory_reports_as_a_loaded_one(backend, bank):
    from selfinterp.backends.hf import HFBackend

    s = bank[0]
    p = sample_pairs(s, 1, seed=0)[0]
    chat = [prompts.introspection_chat(s, p.a, p.b)]
    side = backend.tokenizer.padding_side
    around = HFBackend.around(backend.model, backend.tokenizer)
    assert around.expected_reports(chat, [s.attribute_names])[0].weights == pytest.approx(
        backend.expected_reports(chat, [s.attribute_names])[0].weights, abs=1e-4)
    assert backend.tokenizer.padding_side == side
