"""`analyze` checks every cell with one rule set (issue 12, item 3-4): errors name file, line and
column; out-of-scale reports and repeated rows are kept, counted and printed (refused with
--strict); a file with no rows skips its condition with a note; nothing is dropped or substituted
without a line on the console."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from selfinterp import regression
from selfinterp.cli import app

M = "gpt-4o-2024-08-06"
REPORTS = f"{M}_instilled_weight_reports.csv"
SELECTIONS = f"{M}_instilled_selections.csv"
BASE = ["scenarios.csv", "instilled_weights.csv", SELECTIONS, REPORTS, f"{M}_weight_reports.csv"]


@pytest.fixture
def d(paper_data, tmp_path):
    for n in BASE:
        shutil.copy(paper_data / n, tmp_path / n)
    return tmp_path


def analyze(d, *extra):
    res = CliRunner().invoke(app, ["analyze", str(d), "--n-boot", "20", "--no-figures", *extra])
    assert "Traceback" not in res.output
    results = json.loads((d / "analysis" / "results.json").read_text()) if res.exit_code == 0 else None
    return res, results


def edit(path, line, column, value):
    """Set one cell (line as the file numbers it, 1 = header)."""
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[line - 1].split(",")
    cells[header.index(column)] = value
    lines[line - 1] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


def one_line_error(res, *parts):
    assert res.exit_code == 1, res.output
    msg = [l for l in res.output.splitlines() if l.strip()]
    assert len(msg) == 1 and msg[0].startswith("error:"), res.output
    for p in parts:
        assert p in msg[0], (p, msg[0])


def test_the_papers_quirky_reports_are_kept_and_counted(paper_data, tmp_path):
    """GPT-4o-mini's native reports hold 2388: kept (the paper's figure needs it) and printed."""
    names = ["scenarios.csv", "gpt-4o-mini-2024-07-18_instilled_latent_selections.csv",
             "gpt-4o-mini-2024-07-18_instilled_latent_weight_reports.csv"]
    for n in names:
        shutil.copy(paper_data / n, tmp_path / n)
    res, j = analyze(tmp_path)
    assert res.exit_code == 0, res.output
    assert j["models"]["gpt-4o-mini-2024-07-18"]["native_instilled_reports"]["r"] == pytest.approx(0.398, abs=0.01)
    assert "outside [-100, 100]" in res.output and "2388" in res.output
    assert any("2388" in n for n in j["notes"])
    res, _ = analyze(tmp_path, "--strict")
    one_line_error(res, names[2], "line 296", "report_attr5", "2388", "--strict")


def test_a_report_of_5000_is_counted_and_printed(d):
    analyze(d)
    before = json.loads((d / "analysis" / "results.json").read_text())["models"][M]["instilled_reports"]["r"]
    edit(d / REPORTS, 2, "report_attr1", "5000")
    res, j = analyze(d)
    assert res.exit_code == 0
    assert f"{REPORTS}: 1 report value(s) in 1 row(s) outside [-100, 100] (line 2, column report_attr1: 5000)" \
        in res.output.replace("\n", "")
    assert j["diagnostics"][M]["reports"]["instilled_reports"]["n_outside_scale"] == 1
    assert j["models"][M]["instilled_reports"]["r"] != before  # kept as given, and said so
    one_line_error(analyze(d, "--strict")[0], REPORTS, "line 2", "report_attr1", "5000")


@pytest.mark.parametrize("file, column, value, says", [
    (SELECTIONS, "A_attribute_1", "", "is empty"),
    (SELECTIONS, "B_attribute_3", "NaN", "'NaN' is not a finite number"),
    (SELECTIONS, "A_attribute_2", "nan", "'nan' is not a finite number"),
    (SELECTIONS, "A_attribute_2", "inf", "'inf' is not a finite number"),
    (SELECTIONS, "selection", "", "'' is not A or B"),
    (SELECTIONS, "selection", "AB", "'AB' is not A or B"),
    (REPORTS, "report_attr3", "", "is empty"),
    (REPORTS, "report_attr3", "NA", "'NA' is not a number"),
    ("scenarios.csv", "attr2_min", "", "is empty"),
    ("instilled_weights.csv", "attr4", "nan", "'nan' is not a finite number"),
])
def test_nan_or_empty_cells_are_errors_naming_file_line_column(d, file, column, value, says):
    edit(d / file, 7, column, value)
    one_line_error(analyze(d)[0], file, f"line 7, column {column}: {says}")


def test_truncated_and_overlong_rows_are_errors(d):
    lines = (d / SELECTIONS).read_text().splitlines()
    lines[9] = ",".join(lines[9].split(",")[:8])
    (d / SELECTIONS).write_text("\n".join(lines) + "\n")
    one_line_error(analyze(d)[0], SELECTIONS, "line 10: truncated row: 8 of 13 cells (no B_attribute_1")
    lines[9] = lines[10] + ",7"
    (d / SELECTIONS).write_text("\n".join(lines) + "\n")
    one_line_error(analyze(d)[0], SELECTIONS, "line 10: 14 cells, but the header names 13")


def test_line_numbers_count_blank_lines(d):
    lines = (d / REPORTS).read_text().splitlines()
    lines.insert(3, "")
    (d / REPORTS).write_text("\n".join(lines) + "\n")
    edit(d / REPORTS, 6, "report_attr2", "x")
    one_line_error(analyze(d)[0], REPORTS, "line 6, column report_attr2: 'x' is not a number")


def test_duplicated_rows_are_counted_and_kept(d):
    lines = (d / SELECTIONS).read_text().splitlines()
    lines[3:3] = [lines[2], lines[2]]
    (d / SELECTIONS).write_text("\n".join(lines) + "\n")
    res, j = analyze(d)
    assert res.exit_code == 0
    assert f"{SELECTIONS}: 2 row(s) repeat an earlier row exactly (line 4 repeats line 3)" in res.output.replace("\n", "")
    assert j["models"][M]["instillation"]["n_choices"] == 5002  # kept, each a row of its own
    one_line_error(analyze(d, "--strict")[0], SELECTIONS, "repeat an earlier row", "--strict")


def test_conflicting_scenario_definitions_are_an_error(d):
    lines = (d / "scenarios.csv").read_text().splitlines()
    again = lines[1].split(",")
    assert again[0] == "loose_leaf_tea" and again[8] == "0.1"
    again[8] = "0.5"  # attr2_min
    lines.append(",".join(again))
    (d / "scenarios.csv").write_text("\n".join(lines) + "\n")
    one_line_error(analyze(d)[0], "scenarios.csv", f"line {len(lines)}, column attr2_min",
                   "scenario 'loose_leaf_tea' is defined again with '0.5' (line 2 has '0.1')")


def test_a_scenario_listed_twice_identically_is_a_counted_duplicate(d):
    lines = (d / "scenarios.csv").read_text().splitlines()
    (d / "scenarios.csv").write_text("\n".join(lines + [lines[5]]) + "\n")
    res, j = analyze(d)
    assert res.exit_code == 0 and "scenarios.csv: 1 row(s) repeat an earlier row exactly" in res.output.replace("\n", "")


def test_conflicting_weights_are_an_error(d):
    lines = (d / "instilled_weights.csv").read_text().splitlines()
    cells = lines[1].split(",")
    cells[1] = "0"
    (d / "instilled_weights.csv").write_text("\n".join(lines + [",".join(cells)]) + "\n")
    one_line_error(analyze(d)[0], "instilled_weights.csv", "column attr1: scenario 'loose_leaf_tea' is defined again")


@pytest.mark.parametrize("content", ["", "explaining_model,version,scenario,report_attr1,report_attr2,"
                                         "report_attr3,report_attr4,report_attr5\n"])
def test_a_reports_file_without_rows_skips_its_condition_only(d, content):
    (d / REPORTS).write_text(content)
    res, j = analyze(d)
    assert res.exit_code == 0, res.output
    assert "instilled_reports" not in j["models"][M]
    assert {"instillation", "base_reports"} <= set(j["models"][M])
    assert f"{REPORTS}: {'empty file' if not content else 'no rows (a header only)'}: skipped" in res.output.replace("\n", "")


def test_a_header_only_selections_file_is_a_note_not_a_traceback(d):
    (d / SELECTIONS).write_text((d / SELECTIONS).read_text().splitlines()[0] + "\n")
    res, j = analyze(d)
    assert res.exit_code == 0, res.output
    assert "no rows (a header only)" in res.output and j["models"].get(M, {}) == {}


def test_substitutions_and_drops_are_printed(d, paper_data):
    shutil.copy(paper_data / f"{M}_regression_results.csv", d)
    (d / "scenarios.csv").unlink()
    res, j = analyze(d)
    assert res.exit_code == 0, res.output
    out = res.output.replace("\n", "")
    assert f"learned weights taken from the authors' {M}_regression_results.csv (no scenarios.csv or " \
           "scenarios.json to refit the choices with)" in out
    assert j["models"][M]["instilled_reports"]["r"] == pytest.approx(0.543, abs=0.01)
    # Reports on a scenario nobody has weights for: left out, and said so.
    lines = (d / REPORTS).read_text().splitlines()
    cells = lines[1].split(",")
    cells[2] = "no_such_scenario"
    (d / REPORTS).write_text("\n".join(lines + [",".join(cells)]) + "\n")
    res, j = analyze(d)
    assert "instilled_reports: reports on 1 scenario(s) without learned weights left out (no_such_scenario)" \
        in res.output.replace("\n", "")
    assert j["diagnostics"][M]["reports_without_weights"]["instilled_reports"] == ["no_such_scenario"]


def test_regression_refuses_non_finite_differences_instead_of_zero_filling():
    X = np.zeros((1, 4, 2))
    X[0, 2, 1] = np.nan
    y = np.array([[1.0, 0.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match="finite in every trial that exists: scenario 0, trial 2"):
        regression.fit_preferences(X, y)
    mask = np.array([[1, 1, 0, 1]])
    fit = regression.fit_preferences(X, y, mask)  # padding may hold anything: it is not a trial
    assert np.isfinite(fit.slopes).all()
