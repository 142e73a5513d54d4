import json
import subprocess
import sys

from typer.testing import CliRunner

from selfinterp.cli import app

run = CliRunner().invoke


def test_validate_prints_every_problem_with_location(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps([
        {"id": "a", "question": "Q?", "attributes": [{"name": "x", "units": "u", "range": [3, 1]}] * 5},
        {"id": "a", "question": "", "attributes": []},
    ]))
    res = run(app, ["scenarios", "validate", str(f)])
    assert res.exit_code == 1
    assert f"{f}[0].attributes[0].range: min (3) must be less than max (1)" in res.output
    assert f"{f}[1].question: must be a non-empty string" in res.output
    assert f"{f}[1].attributes: must have exactly 5 attributes, found 0" in res.output
    assert "problem(s) in" in res.output and "Traceback" not in res.output


def test_validate_ok_and_paper_csv(paper_data):
    res = run(app, ["scenarios", "validate", str(paper_data / "scenarios.csv")])
    assert res.exit_code == 0 and "1100 scenarios, all valid" in res.output


def test_list_and_show():
    res = run(app, ["scenarios", "list", "--domain", "housing"])
    assert res.exit_code == 0 and "scenarios" in res.output
    from selfinterp.scenarios import load_bank

    s = load_bank(["housing"])[0]
    res = run(app, ["scenarios", "show", s.id])
    assert res.exit_code == 0 and "[DECISION TASK]" in res.output and "simulated choice" in res.output
    res = run(app, ["scenarios", "show", "no_such_thing"])
    assert res.exit_code == 1 and "no scenario 'no_such_thing'" in res.output


def test_export_from_bank_and_from_paper(tmp_path, paper_data):
    res = run(app, ["export", str(tmp_path / "bank"), "--n-scenarios", "4", "--n-train", "3", "--n-val", "1"])
    assert res.exit_code == 0, res.output
    rows = (tmp_path / "bank" / "instill_train.jsonl").read_text().splitlines()
    assert len(rows) == 12
    assert "Imagine you are " in json.loads(rows[0])["messages"][1]["content"]
    res = run(app, ["export", str(tmp_path / "paper"), "--scenarios", str(paper_data / "scenarios.csv"),
                    "--n-scenarios", "2", "--n-train", "2"])
    assert res.exit_code == 0, res.output
    first = json.loads((tmp_path / "paper" / "instill_train.jsonl").read_text().splitlines()[0])
    assert "Imagine you are Djedefre. Which loose leaf tea" in first["messages"][1]["content"]
    res = run(app, ["export", str(tmp_path / "x"), "--n-scenarios", "100000"])
    assert res.exit_code == 1 and "more than the" in res.output


def test_python_dash_m_and_no_torch_on_import():
    out = subprocess.run([sys.executable, "-m", "selfinterp", "version"], capture_output=True, text=True)
    assert out.returncode == 0 and "selfinterp" in out.stdout
    code = "import sys, selfinterp.cli, selfinterp.analysis, selfinterp.figures; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
