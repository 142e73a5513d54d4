import json
from collections import Counter
from itertools import combinations

import pytest

from selfinterp import scenarios as sc


def good(**over):
    s = {"id": "condo", "question": "Which condo would you prefer?",
         "attributes": [{"name": f"a{j}", "units": "units", "range": [0, 10]} for j in range(5)]}
    s.update(over)
    return s


def problems_of(raw, k=5):
    return [str(p) for p in sc.validate(raw, "f.json", k)[1]]


def test_valid_scenario_parses():
    (s,) = sc.parse([good()])
    assert s.id == "condo" and s.k == 5 and s.attributes[0].span == 10
    assert s.with_role("Zeus").prompt_question == "Imagine you are Zeus. Which condo would you prefer?"


@pytest.mark.parametrize("raw, expected", [
    (good(attributes=[{"name": "a", "units": "u", "range": [5, 5]}] + good()["attributes"][1:]),
     "f.json[0].attributes[0].range: min (5) must be less than max (5)"),
    (good(attributes=[{"name": "a", "units": "u", "range": [9, 1]}] + good()["attributes"][1:]),
     "f.json[0].attributes[0].range: min (9) must be less than max (1)"),
    (good(attributes=good()["attributes"][:4] + [{"name": "a0", "units": "u", "range": [0, 1]}]),
     "f.json[0].attributes: attribute name 'a0' appears more than once"),
    (good(attributes=good()["attributes"][:4]), "f.json[0].attributes: must have exactly 5 attributes, found 4"),
    (good(question="  "), "f.json[0].question: must be a non-empty string"),
    (good(id=""), "f.json[0].id: must be a non-empty string"),
    (good(attributes=[{"name": "a", "units": "", "range": [0, 1]}] + good()["attributes"][1:]),
     "f.json[0].attributes[0].units: must be a non-empty string"),
    (good(attributes=[{"name": "", "units": "u", "range": [0, 1]}] + good()["attributes"][1:]),
     "f.json[0].attributes[0].name: must be a non-empty string"),
    (good(attributes=[{"name": "a", "units": "u", "range": [0]}] + good()["attributes"][1:]),
     "f.json[0].attributes[0].range: must be [min, max], got [0]"),
    (good(attributes=[{"name": "a", "units": "u", "range": ["x", 1]}] + good()["attributes"][1:]),
     "f.json[0].attributes[0].range: min and max must be finite numbers, got ['x', 1]"),
    (good(attributes="none"), "f.json[0].attributes: must be a list of attributes"),
    ("not an object", "f.json[0]: must be an object with id, question and attributes"),
])
def test_every_validation_error_is_located(raw, expected):
    assert expected in problems_of([raw])


def test_attribute_not_an_object():
    assert any("f.json[0].attributes[1]: must be an object" in p
               for p in problems_of([good(attributes=[good()["attributes"][0], 3, *good()["attributes"][2:]])]))


def test_duplicate_ids_and_all_problems_reported_at_once():
    raw = [good(), good(), good(id="x", question="")]
    ps = problems_of(raw)
    assert "f.json[1].id: id 'condo' already used by f.json[0]" in ps
    assert "f.json[2].question: must be a non-empty string" in ps


def test_k_is_configurable():
    three = good(attributes=good()["attributes"][:3])
    assert problems_of([three], k=3) == []
    assert problems_of([three], k=None) == []
    assert problems_of([three], k=5)


def test_top_level_must_be_list():
    assert problems_of({"id": 1}) == ["f.json: must hold a JSON list of scenarios"]


def test_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{oops")
    _, ps = sc.validate_file(bad)
    assert ps and ps[0].location.startswith(str(bad)) and "invalid JSON" in ps[0].message
    _, ps = sc.validate_file(tmp_path / "missing.json")
    assert ps[0].message == "file not found"
    with pytest.raises(sc.ScenarioError, match="1 problem in scenario data"):
        sc.load(bad)


def test_csv_errors_name_lines_and_columns(tmp_path):
    p = tmp_path / "scenarios.csv"
    p.write_text("scenario,question,attr1\nx,q,a\n")
    _, ps = sc.validate_file(p)
    assert "missing column(s)" in ps[0].message and "attr2" in ps[0].message


def test_paper_formats(paper_data):
    csv_scen = sc.load(paper_data / "scenarios.csv")
    assert len(csv_scen) == 1100
    assert csv_scen[0].id == "loose_leaf_tea" and csv_scen[0].question.startswith("Imagine you are Djedefre.")
    assert csv_scen[0].attributes[0].units == "mg per cup"  # from candidate_scenarios.json beside it
    cands = sc.load_paper_candidates(paper_data / "candidate_scenarios.json", paper_data / "roles.csv", seed=1)
    assert len(cands) == 1365 and all(s.role for s in cands)
    roles = sc.load_roles(paper_data / "roles.csv")
    assert len(roles) == 1133
    assert {s.role for s in cands} == set(roles)  # every role is used before any repeats


def test_roles_errors(tmp_path):
    p = tmp_path / "roles.csv"
    p.write_text("name\nZeus\n")
    with pytest.raises(sc.ScenarioError, match="missing column 'role'"):
        sc.load_roles(p)


# --- the bundled bank --------------------------------------------------------------------------


def _tokens(s):
    return set(s.id.split("_")) | {n for n in s.attribute_names}


def test_bank_is_valid_large_and_diverse():
    bank = sc.load_bank()  # raises ScenarioError with every problem if any file is invalid
    assert len(bank) >= 400
    domains = Counter(s.domain for s in bank)
    assert len(domains) >= 20, domains
    assert min(domains.values()) >= 10, domains
    assert len({s.id for s in bank}) == len(bank)
    questions = [s.question.lower() for s in bank]
    assert len(set(questions)) == len(questions), "two scenarios ask the same question"
    # No near-duplicates: two scenarios may share at most 2 of their 5 attribute names,
    # and never the same attribute set.
    for a, b in combinations(bank, 2):
        shared = set(a.attribute_names) & set(b.attribute_names)
        assert len(shared) <= 3, (a.id, b.id, shared)
    # Plausible numbers: every range rounds to distinct values; a mix of rounding regimes.
    decimals = Counter(a.decimals for s in bank for a in s.attributes)
    assert decimals[0] > 0 and decimals[1] > 0 and sum(v for d, v in decimals.items() if d >= 2) > 0
    for s in bank:
        assert s.question.endswith("?"), s.id
        assert "imagine you are" not in s.question.lower(), s.id


def test_bundled_roles():
    roles = sc.load_bundled_roles()
    assert len(roles) >= 400
    assert len(set(roles)) == len(roles)


def test_assign_roles_is_seeded():
    bank = sc.load_bank()[:50]
    roles = sc.load_bundled_roles()
    a = sc.assign_roles(bank, roles, seed=3)
    assert a == sc.assign_roles(bank, roles, seed=3)
    assert a != sc.assign_roles(bank, roles, seed=4)
    assert len({s.role for s in a}) == 50


def test_to_dict_round_trip():
    s = sc.load_bank()[0].with_role("Zeus")
    assert sc.parse([json.loads(json.dumps(s.to_dict()))])[0] == s
