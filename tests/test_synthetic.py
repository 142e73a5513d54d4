"""The whole analysis on a small committed study of the simulated backend (tests/data/synthetic),
so that every clone tests it, with or without the paper's data."""

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from selfinterp.analysis import CONDITIONS as ALL_CONDITIONS, EFFECTS as ALL_EFFECTS

# A run without cross_model_control computes every condition but the control's.
CONDITIONS = [c for c in ALL_CONDITIONS if not c.name.startswith("control_")]
EFFECTS = [e for e in ALL_EFFECTS if not e[1].startswith("control_")]
from selfinterp.cli import app


def analyze(directory, out, *extra):
    res = CliRunner().invoke(app, ["analyze", str(directory), "--out", str(out), "--n-boot", "300", *extra])
    assert res.exit_code == 0, res.output
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def results(synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return out, analyze(synthetic_data, out)


def test_every_condition_and_effect_is_computed(results):
    _, j = results
    assert list(j["models"]) == ["simulated"]
    conds = j["models"]["simulated"]
    assert list(conds) == [c.name for c in CONDITIONS]
    assert list(j["effects"]["simulated"]) == [name for name, _, _ in EFFECTS]
    for name, c in conds.items():
        assert -1 <= c["ci"][0] <= c["r"] <= c["ci"][1] <= 1, name
    assert conds["instillation"]["n_scenarios"] == 12 and conds["instillation"]["n_choices"] == 480
    assert conds["itrained_first_half_trained"]["n_scenarios"] == 6
    assert conds["native_itrained_reports"]["n_scenarios"] == 8 and conds["native_itrained_reports"]["n_reports"] == 32
    diag = j["diagnostics"]["simulated"]
    assert diag["learned_weights"]["source"] == "refit from choices" and not diag["learned_weights"]["not_identified"]


def test_results_are_sane(results):
    """What the simulated decision-maker was set up to do: instillation takes, the base model's
    reports carry no information, introspection training makes reports more accurate."""
    _, j = results
    c = j["models"]["simulated"]
    assert c["instillation"]["r"] > 0.85
    assert c["base_reports"]["ci"][0] < 0 < c["base_reports"]["ci"][1]
    assert 0 < c["instilled_reports"]["r"] < c["itrained_heldout"]["r"]
    assert c["native_instilled_reports"]["r"] < c["native_itrained_reports"]["r"]
    for e in j["effects"]["simulated"].values():
        assert e["diff"] > 0.1


def test_deterministic(results, synthetic_data, tmp_path):
    out, j = results
    again = analyze(synthetic_data, tmp_path, "--no-figures")
    assert again["models"] == j["models"] and again["effects"] == j["effects"]
    other_seed = analyze(synthetic_data, tmp_path / "seed1", "--no-figures", "--seed", "1")
    c0, c1 = j["models"]["simulated"], other_seed["models"]["simulated"]
    assert c1["instilled_reports"]["r"] == c0["instilled_reports"]["r"]  # the point estimate is no draw
    assert c1["instilled_reports"]["ci"] != c0["instilled_reports"]["ci"]  # its bootstrap is


def test_figures(results):
    out, _ = results
    assert sorted(p.name for p in out.glob("*.png")) == ["accuracy_simulated.png", "scatter_simulated.png"]


def test_fixture_is_what_the_script_makes(synthetic_data, tmp_path):
    """The committed files are the script's output (re-make them with tests/data/make_synthetic.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_synthetic", synthetic_data.parent / "make_synthetic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    made = mod.make(tmp_path / "made")
    assert sorted(p.name for p in made.iterdir()) == sorted(p.name for p in synthetic_data.iterdir())
    for p in made.iterdir():
        hint = f"{p.name} differs from what tests/data/make_synthetic.py makes now: re-make the fixture if the change is meant"
        if p.suffix == ".csv":  # numbers to float rounding (the last digit moves between numpy builds)
            a, b = pd.read_csv(p), pd.read_csv(synthetic_data / p.name)
            assert list(a.columns) == list(b.columns), hint
            pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9, atol=1e-12, obj=hint)
        else:
            assert p.read_bytes() == (synthetic_data / p.name).read_bytes(), hint


def test_a_study_with_three_attributes_per_scenario(synthetic_data, tmp_path):
    """k is read from the directory (scenarios file, else the results' columns), not assumed to be 5:
    the synthetic study cut to each scenario's first 3 attributes analyses with 3 columns."""
    import shutil

    cut = tmp_path / "k3"
    shutil.copytree(synthetic_data, cut)
    scen = json.loads((cut / "scenarios.json").read_text())
    for s in scen:
        s["attributes"] = s["attributes"][:3]
    (cut / "scenarios.json").write_text(json.dumps(scen))
    drop = [f"{p}{j}" for j in (4, 5) for p in ("attr", "report_attr", "A_attribute_", "B_attribute_")]
    for p in cut.glob("*.csv"):
        df = pd.read_csv(p)
        df.drop(columns=[c for c in drop if c in df.columns]).to_csv(p, index=False)
    from selfinterp import layout

    assert layout.scan(cut).k == 3 and layout.scan(synthetic_data).k == 5
    res = analyze(cut, tmp_path / "out")
    conds = res["models"]["simulated"]
    assert {c.name for c in CONDITIONS} <= set(conds)
    assert conds["instillation"]["r"] > 0.5  # 3 of 5 true weights still drive most choices
    (cut / "scenarios.json").unlink()  # without a scenarios file, k comes from the CSV columns
    assert layout.scan(cut).k == 3
