import json
import re

import numpy as np
import pytest

from selfinterp import design, prompts
from selfinterp import scenarios as sc


@pytest.fixture
def scen():
    return sc.parse([{
        "id": "tea", "question": "Which tea would you prefer?",
        "attributes": [
            {"name": "caffeine", "units": "mg", "range": [0, 70]},
            {"name": "leaf_size", "units": "mm", "range": [1, 4]},
            {"name": "acidity", "units": "pH", "range": [0.2, 0.6]},
            {"name": "price", "units": "dollars", "range": [2, 30]},
            {"name": "steeps", "units": "count", "range": [1, 8]},
        ]}])[0].with_role("Zeus")


def test_weights_are_rescaled_integers(scen):
    for seed in range(50):
        w = design.draw_weights(scen, seed)
        assert w.dtype.kind == "i" and w.shape == (5,)
        assert np.abs(w).max() == 100 and np.all(np.abs(w) <= 100)
    assert not np.array_equal(design.draw_weights(scen, 0), design.draw_weights(scen, 1))
    np.testing.assert_array_equal(design.draw_weights(scen, 7), design.draw_weights(scen, 7))


def test_weights_spread_over_the_range():
    s = sc.load_bank()[:200]
    w = np.array([design.draw_weights(x, 0) for x in s])
    assert -15 < w.mean() < 15 and (w < 0).mean() > 0.35


def test_rescale_keeps_signs_and_zero_rows():
    out = design.rescale(np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(out, [[50, -100, 25], [0, 0, 0]])


@pytest.mark.parametrize("lo, hi, d", [(0, 70, 0), (0, 5, 0), (1, 4, 1), (1.8, 2.8, 1), (0.2, 0.6, 2),
                                       (0.01, 0.08, 3), (0.1, 10, 0)])
def test_decimals_follow_range(lo, hi, d):
    assert sc.Attribute("a", "u", lo, hi).decimals == d


def test_values_in_range_and_rounded(scen):
    v = design.sample_values(scen, 1000, np.random.default_rng(0))
    for j, a in enumerate(scen.attributes):
        assert v[:, j].min() >= a.min and v[:, j].max() <= a.max
        np.testing.assert_allclose(v[:, j], np.round(v[:, j], a.decimals))
        assert len(np.unique(v[:, j])) > 3


def test_utility_and_choice(scen):
    w = np.array([100, 0, 0, 0, 0])
    lo = [a.min for a in scen.attributes]
    hi = [a.max for a in scen.attributes]
    assert design.utility(scen, w, np.array(hi)) == pytest.approx(100)
    assert design.utility(scen, w, np.array(lo)) == pytest.approx(0)
    pair = design.Pair("tea", tuple(hi), tuple(lo))
    assert design.simulated_choice(scen, w, pair) == "A"
    assert design.simulated_choice(scen, w, pair.swap()) == "B"
    assert design.simulated_choice(scen, -w, pair) == "B"


def test_pairs_are_seeded_and_counterbalanced(scen):
    w = design.draw_weights(scen, 0)
    p1 = design.sample_pairs(scen, 20, seed=0, weights=w)
    assert p1 == design.sample_pairs(scen, 20, seed=0, weights=w)
    assert p1 != design.sample_pairs(scen, 20, seed=0, purpose="eval", weights=w)
    cb = design.sample_pairs(scen, 20, seed=0, counterbalance=True, weights=w)
    assert len(cb) == 40 and cb[0::2] == p1 and [p.swap() for p in p1] == cb[1::2]
    labels = [design.simulated_choice(scen, w, p) for p in cb]
    assert labels.count("A") == 20  # swapped copies flip every label
    d = design.differences(scen, p1)
    assert d.shape == (20, 5) and np.all(np.abs(d) <= 1)


def test_adding_a_scenario_does_not_change_others(scen):
    other = sc.load_bank()[0]
    a = design.instillation_examples([scen], {scen.id: design.draw_weights(scen, 0)}, 5, 0)
    b = design.instillation_examples([other, scen], {scen.id: design.draw_weights(scen, 0),
                                                    other.id: design.draw_weights(other, 0)}, 5, 0)
    assert a == b[5:]


def test_prompt_rendering(scen):
    text = prompts.decision_prompt(scen, (12.0, 2.5, 0.25, 3.0, 4.0), (70.0, 1.0, 0.6, 30.0, 8.0))
    assert text.startswith('[DECISION TASK] Respond with "A" if you think Option A is better')
    assert "Imagine you are Zeus. Which tea would you prefer?\nA:\ncaffeine: 12.0 mg\nleaf_size: 2.5 mm\n" in text
    assert text.endswith("B:\ncaffeine: 70.0 mg\nleaf_size: 1.0 mm\nacidity: 0.6 pH\nprice: 30.0 dollars\nsteeps: 8.0 count")
    intro = prompts.introspection_prompt(scen, (1, 1, 0.3, 3, 4), (2, 2, 0.4, 4, 5))
    assert "each of the five dimensions" in intro and "with 5 key-value pairs" in intro
    assert prompts.report_json(scen, [10, -20.4, 30, 0, 100]) == (
        '{"caffeine": 10, "leaf_size": -20, "acidity": 30, "price": 0, "steeps": 100}')
    with pytest.raises(ValueError, match="has 5 attributes, got 2 values"):
        prompts.render_option(scen, [1, 2])


def test_stimuli_identical_to_the_papers(paper_data):
    """Every fine-tuning example the authors used is reproduced byte for byte."""
    by_question = {s.question: s for s in sc.load(paper_data / "scenarios.csv")}
    n = 0
    for fname in ("instill_100_prefs.jsonl", "instill_100_prefs_val.jsonl", "instilled_weights_50_training.jsonl",
                  "instilled_weights_100_training.jsonl"):
        for line in open(paper_data / fname, encoding="utf-8"):
            theirs = json.loads(line)["messages"]
            user = theirs[1]["content"]
            s = by_question[user.split("\n\n")[1].split("\n")[0]]
            values = [float(v) for v in re.findall(r"^\w+: (\S+) ", user, re.M)]
            a, b = values[:5], values[5:]
            if user.startswith("[DECISION TASK]"):
                ours = prompts.decision_chat(s, a, b, theirs[2]["content"])
            else:
                ours = prompts.introspection_chat(s, a, b, list(json.loads(theirs[2]["content"]).values()))
            assert ours == theirs
            n += 1
    assert n == 5000 + 1000 + 50 + 100


def test_papers_labels_follow_its_weights(paper_data):
    """The paper's training labels are the choices our utility rule makes with its weights."""
    import pandas as pd

    by_question = {s.question: s for s in sc.load(paper_data / "scenarios.csv")}
    w = pd.read_csv(paper_data / "instilled_weights.csv").set_index("scenario")
    agree = total = 0
    for line in open(paper_data / "instill_100_prefs.jsonl", encoding="utf-8"):
        m = json.loads(line)["messages"]
        s = by_question[m[1]["content"].split("\n\n")[1].split("\n")[0]]
        values = [float(v) for v in re.findall(r"^\w+: (\S+) ", m[1]["content"], re.M)]
        pair = design.Pair(s.id, tuple(values[:5]), tuple(values[5:]))
        agree += design.simulated_choice(s, w.loc[s.id].to_numpy(), pair) == m[2]["content"]
        total += 1
    assert agree / total > 0.99


def test_export(tmp_path):
    bank = sc.load_bank()[:6]
    counts = design.export(bank, tmp_path, seed=0, n_train=4, n_val=2, n_introspection=1, counterbalance=True)
    assert counts == {"instill_train.jsonl": 48, "instill_val.jsonl": 24, "introspection_all.jsonl": 6,
                      "introspection_first_half.jsonl": 3, "introspection_second_half.jsonl": 3}
    rows = [json.loads(x) for x in (tmp_path / "instill_train.jsonl").read_text().splitlines()]
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant"]
    assert {r["messages"][2]["content"] for r in rows} == {"A", "B"}
    train_users = {r["messages"][1]["content"] for r in rows}
    val = [json.loads(x) for x in (tmp_path / "instill_val.jsonl").read_text().splitlines()]
    assert not train_users & {r["messages"][1]["content"] for r in val}
    intro = [json.loads(x) for x in (tmp_path / "introspection_all.jsonl").read_text().splitlines()]
    weights = (tmp_path / "instilled_weights.csv").read_text().splitlines()
    assert weights[0] == "scenario,attr1,attr2,attr3,attr4,attr5" and len(weights) == 7
    first = json.loads(intro[0]["messages"][2]["content"])
    assert list(first) == bank[0].attribute_names
    assert [str(v) for v in first.values()] == weights[1].split(",")[1:]
    again = tmp_path / "again"
    design.export(bank, again, seed=0, n_train=4, n_val=2, counterbalance=True)
    assert (again / "instill_train.jsonl").read_bytes() == (tmp_path / "instill_train.jsonl").read_bytes()


def test_soft_labels_follow_the_utility_difference():
    """label_temperature adds soft targets: P(A) > 0.5 exactly when the hard answer is A, near 0.5
    for near-ties and near 1 or 0 for clear choices; the chats are the hard-label ones."""
    bank = sc.load_bank()[:3]
    w = {s.id: design.draw_weights(s, seed=1) for s in bank}
    hard = design.instillation_examples(bank, w, 40, seed=0, counterbalance=True)
    soft = design.instillation_examples(bank, w, 40, seed=0, counterbalance=True, label_temperature=10.0)
    assert [r["messages"] for r in hard] == [r["messages"] for r in soft]
    p = np.array([r["soft_answer"]["A"] for r in soft])
    answers = np.array([r["messages"][-1]["content"] for r in soft])
    assert np.all((p > 0.5) == (answers == "A"))
    assert np.allclose([r["soft_answer"]["A"] + r["soft_answer"]["B"] for r in soft], 1.0)
    assert p.min() < 0.01 and p.max() > 0.99 and np.any(np.abs(p - 0.5) < 0.3)
    with pytest.raises(ValueError, match="label_temperature"):
        design.instillation_examples(bank, w, 2, seed=0, label_temperature=0.0)
