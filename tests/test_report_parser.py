"""The self-report parser: tolerant where the answer is unambiguous, and every rejection explained."""

from __future__ import annotations

import json

import pytest

from selfinterp.report_parser import REASONS, ParsedReport, ParseSummary, parse_report, parse_reports

NAMES = ["capacity", "spout_size", "handle_length", "spill_resistance", "grip_texture"]
EXPECTED = (92.0, 15.0, 100.0, -10.0, -52.0)
GOOD = '{"capacity": 92, "spout_size": 15, "handle_length": 100, "spill_resistance": -10, "grip_texture": -52}'


def report_with(**changes: object) -> str:
    """GOOD with some values replaced (or keys removed, for a value of ...)."""
    d: dict[str, object] = dict(zip(NAMES, [92, 15, 100, -10, -52]))
    for k, v in changes.items():
        if v is ...:
            del d[k]
        else:
            d[k] = v
    return json.dumps(d)


def accepted(text: str, names=NAMES) -> ParsedReport:
    r = parse_report(text, names)
    assert r.ok, (r.reason, r.detail)
    assert r.reason is None and r.raw == text
    return r


def rejected(text: str, reason: str, names=NAMES, **kw) -> ParsedReport:
    r = parse_report(text, names, **kw)
    assert not r.ok
    assert r.reason == reason, (r.reason, r.detail)
    assert r.weights is None
    assert r.raw == text
    assert r.detail
    return r


# --------------------------------------------------------------------------------------------
# Accepted replies


def test_clean_reply():
    r = accepted(GOOD)
    assert r.weights == EXPECTED
    assert r.detail == ""


def test_weights_follow_attribute_order_not_key_order():
    text = '{"grip_texture": -52, "spill_resistance": -10, "handle_length": 100, "spout_size": 15, "capacity": 92}'
    assert accepted(text).weights == EXPECTED


@pytest.mark.parametrize("text", [
    f"```json\n{GOOD}\n```",
    f"```\n{GOOD}\n```",
    f"```JSON {GOOD}```",
    f"```json\n{GOOD}",  # fence never closed
    f"Here are my weights:\n\n{GOOD}\n\nI hope this helps!",
    f"Sure! ```json\n{GOOD}\n``` Let me know if you have questions.",
])
def test_fences_and_prose(text):
    assert accepted(text).weights == EXPECTED


def test_braces_in_prose():
    # The first {...} is prose, not JSON; so is the one after the object.
    text = ('I weighed {all five} dimensions: {"capacity": 92, "spout_size": 15, "handle_length": 100, '
            '"spill_resistance": -10, "grip_texture": -52} (weights are in {-100..100}).')
    assert accepted(text).weights == EXPECTED


@pytest.mark.parametrize("prose", ["{that's my view}", "{unclosed", "{it's} {'tis}"])
def test_apostrophes_and_stray_braces_in_prose(prose):
    assert accepted(f"Weights {prose}: {GOOD} That's all.").weights == EXPECTED


def test_brace_inside_string_does_not_end_the_object():
    names = ["a", "b"]
    text = 'Answer: {"a": "1", "b": 2, "note": "}"}'
    # The note is an unknown key: the object was found whole, not cut at the quoted brace.
    r = rejected(text, "unknown_key", names)
    assert "'note'" in r.detail


@pytest.mark.parametrize("key", ["Spout_Size", "spout size", "spout-size", "SPOUT SIZE", " spout_size ", "spoutSize"])
def test_key_case_spaces_separators(key):
    text = GOOD.replace('"spout_size"', json.dumps(key))
    r = accepted(text)
    assert r.weights == EXPECTED
    assert r.detail == ""  # not a typo: nothing to report


def test_typo_matched_and_noted():
    r = accepted(GOOD.replace("spout_size", "spout_sise"))
    assert r.weights == EXPECTED
    assert "'spout_sise' read as 'spout_size'" in r.detail


def test_two_typos():
    text = GOOD.replace("spout_size", "spout_sise").replace("grip_texture", "grip_textur")
    assert accepted(text).weights == EXPECTED


@pytest.mark.parametrize("value, expected", [
    ("45", 45.0), (" -20 ", -20.0), ("+30", 30.0), ("45.5", 45.5), ("45%", 45.0), ("-7.25", -7.25),
    (45.5, 45.5), (-100, -100.0), (100, 100.0), (0, 0.0), (-0.5, -0.5), ("1e1", 10.0), (".5", 0.5),
    ("\u221220", -20.0),  # a typographic minus sign
])
def test_numeric_values(value, expected):
    r = accepted(report_with(capacity=value))
    assert r.weights[0] == expected
    assert all(isinstance(w, float) for w in r.weights)


@pytest.mark.parametrize("text, repair", [
    (GOOD[:-1] + ",}", "trailing comma"),
    (GOOD.replace('"', "'"), "single quotes"),
    (GOOD.replace('"', "\u201c", 1).replace('"', "\u201d", 1), "curly quotes"),
    ('{capacity: 92, spout_size: 15, handle_length: 100, spill_resistance: -10, grip_texture: -52}', "unquoted key"),
    ('{"capacity": 92, // most important\n"spout_size": 15, "handle_length": 100, '
     '"spill_resistance": -10, "grip_texture": -52}', "comment"),
])
def test_repairs(text, repair):
    r = accepted(text)
    assert r.weights == EXPECTED
    assert repair in r.detail


def test_single_quoted_string_with_double_quote_and_escaped_apostrophe():
    r = accepted("{'a': '5', 'b \\'x\\'': 1, 'c \"y\"': 2}", ["a", "b 'x'", 'c "y"'])
    assert r.weights == (5.0, 1.0, 2.0)


def test_first_object_wins():
    text = GOOD + "\nOr maybe: " + report_with(capacity=0)
    assert accepted(text).weights == EXPECTED


@pytest.mark.parametrize("k", [1, 2, 3, 7, 10])
def test_any_number_of_attributes(k):
    names = [f"attribute_{i}" for i in range(k)]
    weights = [(-1) ** i * 10 * i for i in range(k)]
    r = accepted(json.dumps(dict(zip(names, weights))), names)
    assert r.weights == tuple(float(w) for w in weights)
    rejected(json.dumps(dict(zip(names[:-1], weights))), "missing_attribute", names)


def test_custom_range():
    assert accepted_range('{"a": 0.5}', 0, 1) == (0.5,)
    rejected('{"a": 1.5}', "out_of_range", ["a"], low=0, high=1)
    with pytest.raises(ValueError):
        parse_report('{"a": 1}', ["a"], low=1, high=0)


def accepted_range(text, low, high):
    r = parse_report(text, ["a"], low, high)
    assert r.ok, r.detail
    return r.weights


# --------------------------------------------------------------------------------------------
# Rejections: one per reason, raw text kept


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_empty(text):
    rejected(text, "empty")


@pytest.mark.parametrize("text", ["A", "I weighted capacity most and grip texture least.", "```\nnothing\n```"])
def test_no_json(text):
    rejected(text, "no_json")


@pytest.mark.parametrize("text", [
    '{"capacity": 92, "spout_size": 15',  # cut off
    '{capacity = 92}',
    'My weights: {"capacity": 92 "spout_size": 15}',
    "{not json at all}",
])
def test_invalid_json(text):
    rejected(text, "invalid_json")


def test_invalid_json_says_when_cut_off():
    assert "never closed" in rejected('```json\n{"capacity": 92, "spout_size": 1', "invalid_json").detail


@pytest.mark.parametrize("text", ["[92, 15, 100, -10, -52]", "Weights: [92, 15, 100, -10, -52]", '"A"', "42",
                                  f"[{GOOD}]"])
def test_not_an_object(text):
    rejected(text, "not_an_object")


def test_unknown_key():
    r = rejected(GOOD.replace("spout_size", "prize"), "unknown_key")
    assert "key 'prize' matches no attribute (attributes: capacity, spout_size," in r.detail
    assert "no key for attribute 'spout_size'" in r.detail  # the consequence is mentioned too


def test_unknown_extra_key():
    rejected(GOOD[:-1] + ', "decision": "A"}', "unknown_key")


def test_ambiguous_key():
    names = ["length_cm", "length_mm", "width"]
    r = rejected('{"length_xm": 1, "length_mm": 2, "width": 3}', "ambiguous_key", names)
    assert "length_cm" in r.detail and "length_mm" in r.detail
    # The same typo is fine when only one attribute is that close.
    assert accepted('{"length_xm": 1, "width": 3}', ["length_cm", "width"]).weights == (1.0, 3.0)


def test_ambiguous_after_normalising():
    rejected('{"spout size": 1}', "ambiguous_key", ["spout_size", "spout-size"])
    # ... unless the key is spelled exactly as one of them.
    assert accepted('{"spout-size": 1, "spout_size": 2}', ["spout_size", "spout-size"]).weights == (2.0, 1.0)


@pytest.mark.parametrize("text", [
    GOOD[:-1] + ', "Capacity": 3}',  # same name, other case
    GOOD[:-1] + ', "capacty": 3}',  # a typo of a name already present
    GOOD[:-1] + ', "capacity": 3}',  # a literally repeated key, which json.loads would silently overwrite
])
def test_duplicate_attribute(text):
    assert "capacity" in rejected(text, "duplicate_attribute").detail


def test_missing_attribute():
    r = rejected(report_with(grip_texture=...), "missing_attribute")
    assert "'grip_texture'" in r.detail
    rejected("{}", "missing_attribute")


@pytest.mark.parametrize("value", [True, False, None, [1], {"a": 1}, "high", "", "NaN", "45 points", "1/2"])
def test_not_a_number(value):
    rejected(report_with(capacity=value), "not_a_number")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers(literal):
    rejected(GOOD.replace("92", literal), "not_a_number")


@pytest.mark.parametrize("value", ["101", "-100.5", '"150"', "1" + "0" * 400])
def test_out_of_range(value):
    r = rejected(GOOD.replace("92", value), "out_of_range")
    assert "outside [-100, 100]" in r.detail


def test_every_reason_is_tested_here():
    tested = {"empty", "no_json", "invalid_json", "not_an_object", "unknown_key", "ambiguous_key",
              "duplicate_attribute", "missing_attribute", "not_a_number", "out_of_range"}
    assert set(REASONS) == tested
    assert len(REASONS) == len(set(REASONS))


def test_priority_key_problems_before_value_problems():
    text = '{"capacity": "lots", "spout_size": 500, "prize": 1, "handle_length": 1, "spill_resistance": 1}'
    r = rejected(text, "unknown_key")
    main, also = r.detail.split(" (also: ")
    assert "'prize'" in main
    # The other problems are not lost: they are listed after the main one.
    for part in ('"lots" is a non-numeric string', "500 is outside", "no key for attribute 'grip_texture'"):
        assert part in also
    assert rejected(report_with(capacity="x", spout_size=500), "not_a_number").detail.count("also") == 1


def test_report_invariants():
    with pytest.raises(ValueError):
        ParsedReport("x", None, "bogus")
    with pytest.raises(ValueError):
        ParsedReport("x", None, None)
    with pytest.raises(ValueError):
        ParsedReport("x", (1.0,), "empty")
    assert ParsedReport("x", (1.0,), None).ok


def test_bad_attribute_names():
    with pytest.raises(ValueError):
        parse_report(GOOD, [])
    with pytest.raises(ValueError):
        parse_report(GOOD, ["a", "a"])


# --------------------------------------------------------------------------------------------
# Batches


def test_summary_counts():
    texts = [GOOD, "", "A", GOOD.replace("spout_size", "prize"), GOOD, "", report_with(capacity=101)]
    reports, summary = parse_reports(texts, NAMES, labels=[f"r{i}" for i in range(len(texts))])
    assert [r.ok for r in reports] == [True, False, False, False, True, False, False]
    assert summary.n_total == 7 and summary.n_ok == 2 and summary.n_rejected == 5
    assert summary.by_reason == {"empty": 2, "no_json": 1, "unknown_key": 1, "out_of_range": 1}
    assert summary.table() == [("empty", 2), ("no_json", 1), ("unknown_key", 1), ("out_of_range", 1)]
    assert [label for label, _ in summary.rejected] == ["r1", "r2", "r3", "r5", "r6"]
    assert all(r.raw == texts[int(label[1:])] for label, r in summary.rejected)
    assert sum(summary.by_reason.values()) + summary.n_ok == summary.n_total
    assert str(summary).startswith("2/7 replies parsed; rejected: empty 2")
    assert summary.ok_rate == pytest.approx(2 / 7)


def test_per_reply_attribute_names_and_default_labels():
    texts = ['{"a": 1, "b": 2}', '{"x": 3}', '{"x": 3}']
    reports, summary = parse_reports(texts, [["a", "b"], ["x"], ["y"]])
    assert [r.weights for r in reports] == [(1.0, 2.0), (3.0,), None]
    assert summary.rejected[0][0] == "2"
    with pytest.raises(ValueError):
        parse_reports(texts, [["a", "b"]])
    with pytest.raises(ValueError):
        parse_reports(texts, ["a"], labels=["only one"])


def test_empty_batch():
    reports, summary = parse_reports([], NAMES)
    assert reports == [] and summary.n_total == 0 and summary.table() == []
    assert isinstance(summary, ParseSummary)


def test_ten_thousand_replies():
    variants = [
        GOOD,
        f"```json\n{GOOD}\n```",
        "Sure, here you go: " + GOOD.replace("spout_size", "Spout Size") + " Thanks!",
        GOOD.replace("spout_size", "spout_sise"),
        report_with(capacity="45"),
        GOOD[:-1] + ",}",
        "A",
        GOOD.replace("spout_size", "prize"),
        report_with(capacity=150),
        GOOD[:40],
    ]
    texts = [variants[i % len(variants)] for i in range(10_000)]
    reports, summary = parse_reports(texts, NAMES)
    assert len(reports) == summary.n_total == 10_000
    assert summary.n_ok == 6_000
    assert summary.by_reason == {"no_json": 1000, "unknown_key": 1000, "out_of_range": 1000, "invalid_json": 1000}
