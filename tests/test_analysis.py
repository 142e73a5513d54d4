"""The analysis reproduces the paper's table from the paper's own data."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from selfinterp import analysis, layout
from selfinterp.cli import app

# The README table of shared/paper-data: (GPT-4o, GPT-4o-mini).
PAPER = {
    "instillation": (0.843, 0.871),
    "base_reports": (0.10, -0.01),
    "instilled_reports": (0.543, 0.506),
    "itrained_heldout": (0.740, 0.752),
    "itrained_first_half_trained": (0.767, 0.726),
    "itrained_second_half_trained": (0.714, 0.780),
    "native_instilled_reports": (0.464, 0.398),
    "native_itrained_reports": (0.710, 0.699),
}
MODELS = ("gpt-4o-2024-08-06", "gpt-4o-mini-2024-07-18")


@pytest.fixture(scope="module")
def results(paper_table_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    res = CliRunner().invoke(app, ["analyze", str(paper_table_data), "--out", str(out), "--n-boot", "500"])
    assert res.exit_code == 0, res.output
    return out, json.loads((out / "results.json").read_text())


def test_reproduces_every_figure_of_the_papers_table(results):
    _, j = results
    for i, model in enumerate(MODELS):
        for cond, figures in PAPER.items():
            got = j["models"][model][cond]
            assert got["r"] == pytest.approx(figures[i], abs=0.01), (model, cond)
            lo, hi = got["ci"]
            assert lo < got["r"] < hi


def test_results_schema(results):
    _, j = results
    for model in MODELS:
        for cond, c in j["models"][model].items():
            assert cond in PAPER
            assert isinstance(c["r"], float) and len(c["ci"]) == 2
            assert isinstance(c["n_scenarios"], int) and isinstance(c["n_reports"], int)
    c = j["models"]["gpt-4o-2024-08-06"]
    assert c["instilled_reports"]["n_scenarios"] == 100 and c["instilled_reports"]["n_reports"] == 1000
    assert c["itrained_first_half_trained"]["n_scenarios"] == 50
    # The training effect is positive with a CI above zero, as in the paper.
    for model in MODELS:
        e = j["effects"][model]["itrained_effect"]
        assert e["diff"] > 0.1 and e["ci"][0] > 0


def test_refit_agrees_with_the_authors_regression(results):
    _, j = results
    for model in MODELS:
        for key in ("learned_weights", "native_learned_weights"):
            assert j["diagnostics"][model][key]["r_with_authors_regression"] > 0.999


def test_figures_written(results):
    out, _ = results
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [f"{kind}_{m}.png" for kind in ("accuracy", "scatter") for m in MODELS]
    assert all((out / p).stat().st_size > 10_000 for p in pngs)


def _copy(paper_data, tmp_path, names):
    for n in names:
        shutil.copy(paper_data / n, tmp_path / n)
    return tmp_path


def test_partial_directory_reports_what_it_can(paper_data, tmp_path):
    d = _copy(paper_data, tmp_path, ["scenarios.csv", "instilled_weights.csv",
                                     "gpt-4o-2024-08-06_instilled_selections.csv",
                                     "gpt-4o-2024-08-06_instilled_weight_reports.csv"])
    a = analysis.analyze(d, n_boot=50)
    assert set(a.models["gpt-4o-2024-08-06"].conditions) == {"instillation", "instilled_reports"}


def test_uses_authors_weights_without_choices(paper_data, tmp_path):
    d = _copy(paper_data, tmp_path, ["gpt-4o-2024-08-06_regression_results.csv",
                                     "gpt-4o-2024-08-06_instilled_weight_reports.csv"])
    a = analysis.analyze(d, n_boot=50)
    res = a.models["gpt-4o-2024-08-06"]
    assert res.conditions["instilled_reports"].r == pytest.approx(0.543, abs=0.01)
    assert "no choices to refit from" in res.diagnostics["learned_weights"]["source"]


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.replace("selection,", "choice,", 1), "missing column(s) selection"),
    (lambda t: t.replace(",A,", ",C,", 1), "line 2, column selection: 'C' is not A or B"),
    (lambda t: t.replace(",A,52.0,", ",A,lots,", 1), "line 2, column A_attribute_1: 'lots' is not a number"),
])
def test_bad_input_names_file_line_and_column(paper_data, tmp_path, mutate, message):
    d = _copy(paper_data, tmp_path, ["scenarios.csv", "candidate_scenarios.json"])
    name = "gpt-4o-2024-08-06_instilled_selections.csv"
    (d / name).write_text(mutate((paper_data / name).read_text()))
    res = CliRunner().invoke(app, ["analyze", str(d), "--n-boot", "10"])
    assert res.exit_code == 1
    assert name in res.output and message in res.output
    assert "Traceback" not in res.output


def test_empty_directory_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(app, ["analyze", str(tmp_path)])
    assert res.exit_code == 1 and "no results files found" in res.output
    res = CliRunner().invoke(app, ["analyze", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "not a directory" in res.output


def test_empty_report_cells_are_an_error(paper_data, tmp_path):
    """Once counted and left out; now an error like every empty cell (tests/test_analysis_validation.py)."""
    d = _copy(paper_data, tmp_path, ["gpt-4o-2024-08-06_regression_results.csv"])
    name = "gpt-4o-2024-08-06_instilled_weight_reports.csv"
    lines = (paper_data / name).read_text().splitlines()
    cells = lines[1].split(",")
    cells[3] = ""
    lines[1] = ",".join(cells)
    (d / name).write_text("\n".join(lines) + "\n")
    with pytest.raises(layout.LayoutError, match=f"{name}: line 2, column report_attr1: is empty"):
        analysis.analyze(d, n_boot=10)


def test_classify_file_names():
    assert layout.classify("m_instilled_latent_weight_reports.csv") == ("native_instilled_reports", "m")
    assert layout.classify("m_itrained_all_100_50ex_latent_weight_reports.csv") == ("native_itrained_reports", "m")
    assert layout.classify("m_itrained_first_50_of_100_50ex_weight_reports.csv") == ("itrained_first_reports", "m")
    assert layout.classify("m_weight_reports.csv") == ("base_reports", "m")
    assert layout.classify("m_latent_regression_results.csv") == ("native_regression", "m")
    assert layout.classify("notes.csv") is None


def test_simulated_study_recovers_known_accuracy(tmp_path):
    """A synthetic study in the paper's layout with reports of known fidelity."""
    from selfinterp import design, scenarios as sc

    rng = np.random.default_rng(0)
    bank = sc.load_bank()[:60]
    sel_rows, rep_rows = [], []
    weights = {s.id: design.draw_weights(s, 0) for s in bank}
    for s in bank:
        w = weights[s.id]
        for p in design.sample_pairs(s, 100, 0, weights=w):
            du = design.utility(s, w, np.array(p.a)) - design.utility(s, w, np.array(p.b))
            choice = "A" if rng.uniform() < 1 / (1 + np.exp(-du / 8)) else "B"
            sel_rows.append(["m", s.id, choice, *p.a, *p.b])
        z = (w - w.mean()) / w.std()
        for _ in range(10):  # each report: 0.6 * signal + noise, so mean reports track w closely
            rep_rows.append(["m", "v", s.id, *np.round(z * 30 + rng.normal(scale=60, size=5)), *p.a, *p.b])
    import pandas as pd

    cols_ab = [f"{o}_attribute_{j}" for o in "AB" for j in range(1, 6)]
    pd.DataFrame(sel_rows, columns=["model", "scenario", "selection", *cols_ab]).to_csv(
        tmp_path / "m_instilled_selections.csv", index=False)
    pd.DataFrame(rep_rows, columns=["explaining_model", "version", "scenario",
                                    *[f"report_attr{j}" for j in range(1, 6)], *cols_ab]).to_csv(
        tmp_path / "m_instilled_weight_reports.csv", index=False)
    design.write_weights_csv(tmp_path / "instilled_weights.csv", bank, weights)
    (tmp_path / "scenarios.json").write_text(json.dumps([s.to_dict() for s in bank]))
    res = analysis.analyze(tmp_path, n_boot=300).models["m"].conditions
    assert res["instillation"].r > 0.9
    # Mean of 10 reports: signal sd 30 vs noise sd 60 / sqrt(10) = 19 -> r(reports, w) ~ 0.84,
    # and learned weights track w at ~0.9+: the measured r must land in that neighbourhood.
    assert 0.6 < res["instilled_reports"].r < 0.9
