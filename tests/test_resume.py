"""Resumed runs give the numbers of uninterrupted ones (issue 12): every sampled model call is
seeded by what it is, not by where it falls in the list of calls still to do."""

import json

import pytest

from selfinterp import config
from selfinterp.backends.simulated import SimulatedBackend
from selfinterp.pipeline import Run, call_seed


def small(**over):
    base = dict(n_instilled=10, n_native=6, n_train=40, n_val=5, n_eval_trials=20, n_native_trials=20,
                n_reports=4, n_introspection=2, report_temperature=0.7, batch_size=3)
    return config.build("simulated", overrides={**base, **over})


class Killed(RuntimeError):
    pass


def numbers(res: dict) -> dict:
    """results.json less where it was read from (the run directory)."""
    return {k: v for k, v in res.items() if k != "source"}


def results(root):
    return numbers(json.loads((root / "analysis" / "results.json").read_text()))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    Run(small(), root, progress=False).execute()
    return results(root)


def interrupt_after(monkeypatch, method: str, n_calls: int):
    """Make the simulated backend's ``method`` die on its ``n_calls``-th call (after that many
    batches answered); return a function that undoes it."""
    original = getattr(SimulatedBackend, method)
    count = {"n": 0}

    def dying(self, *args, **kwargs):
        count["n"] += 1
        if count["n"] == n_calls:
            raise Killed(f"killed at call {n_calls} of {method}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SimulatedBackend, method, dying)
    return lambda: monkeypatch.setattr(SimulatedBackend, method, original)


# Report batches (batch 3): reports_base 1-14, reports_instilled 15-28, the folds 29-35 and 36-42
# (20 reports each), the native stages 43-50 and 51-58 (24 each): a cut in every report stage.
@pytest.mark.parametrize("method,n_calls", [("generate", 2), ("generate", 20), ("generate", 33),
                                            ("generate", 40), ("generate", 47), ("generate", 56),
                                            ("choice_probs", 5)])
def test_interrupted_and_resumed_run_gives_the_same_results(tmp_path, monkeypatch, uninterrupted, method, n_calls):
    undo = interrupt_after(monkeypatch, method, n_calls)
    with pytest.raises(Killed):
        Run(small(), tmp_path, progress=False).execute()
    journals = list((tmp_path / "journal").glob("*.jsonl"))
    assert journals and any(p.read_text() for p in journals)  # it died mid-stage, with calls journaled
    undo()
    assert numbers(Run(small(), tmp_path, progress=False).execute()) == uninterrupted


def test_twice_interrupted_with_another_cut(tmp_path, monkeypatch, uninterrupted):
    for n in (3, 5):  # killed, resumed, killed again in a later part of the stage, resumed
        undo = interrupt_after(monkeypatch, "generate", n)
        with pytest.raises(Killed):
            Run(small(), tmp_path, progress=False).execute()
        undo()
    assert numbers(Run(small(), tmp_path, progress=False).execute()) == uninterrupted


def test_simulated_reply_depends_on_its_own_seed_only():
    from selfinterp import design, prompts
    from selfinterp.scenarios import load_bank

    bank = load_bank()[:3]
    backend = SimulatedBackend(bank, seed=1)
    chats = [prompts.introspection_chat(s, p.a, p.b) for s in bank for p in design.sample_pairs(s, 2, 0, "report")]
    seeds = [call_seed(0, "reports_base", i) for i in range(len(chats))]
    whole = backend.generate(chats, temperature=1.0, seed=seeds)
    one_by_one = [backend.generate([c], temperature=1.0, seed=[sd])[0] for c, sd in zip(chats, seeds)]
    reversed_ = backend.generate(chats[::-1], temperature=1.0, seed=seeds[::-1])[::-1]
    assert whole == one_by_one == reversed_
    assert backend.generate(chats[:1], temperature=1.0, seed=[seeds[0] + 1]) != whole[:1]


def test_call_seed_is_stable():
    assert call_seed(0, "reports_base", "s1", 3) == call_seed(0, "reports_base", "s1", 3)
    assert len({call_seed(0, st, "s1", i) for st in ("a", "b") for i in range(50)}) == 100
    assert all(0 <= call_seed(s, "x") < 2 ** 31 for s in range(100))


def test_reports_do_not_depend_on_the_batch_size(tmp_path, uninterrupted):
    # a fresh run directory: the same samples drawn in other batches (tests/test_stage_keys.py: on the
    # simulated backend batch_size is not even part of the stage keys)
    assert numbers(Run(small(batch_size=7), tmp_path, progress=False).execute()) == uninterrupted


def test_a_run_made_before_the_restructure_still_resumes(tmp_path):
    """A simulated run directory written by commit 5b9b1be (before issue 13's restructure), less its
    figures and report.html: the current code finds every model stage done, redoes only the two
    stages whose outputs are missing, and gets the same numbers."""
    import io
    import tarfile
    from pathlib import Path

    from rich.console import Console

    fixture = Path(__file__).parent / "fixtures" / "run_before_restructure.tar.gz"
    with tarfile.open(fixture) as tar:
        tar.extractall(tmp_path, filter="data")
    root = tmp_path / "oldrun"
    shipped = results(root)
    cfg = config.build(file=root / "config.json")
    log = io.StringIO()
    Run(cfg, root, progress=False, console=Console(file=log, width=200)).execute()
    log = log.getvalue()
    redone = {line.split()[0] for line in log.splitlines() if "finished in" in line}
    assert redone == {"analysis", "report"}, log
    assert log.count(": done") == 13
    again = results(root)
    # The same numbers up to float rounding; the noise ceiling is a random split-half estimate whose
    # draws changed with its vectorised form (same seed, another stream): close, not equal.
    drawn = ("reliability", "noise_ceiling")
    num_a, other_a = leaves(again)
    num_s, other_s = leaves(shipped)
    assert other_a == other_s and num_a.keys() == num_s.keys()
    exact = {k: v for k, v in num_s.items() if not set(drawn) & set(k)}
    assert {k: num_a[k] for k in exact} == pytest.approx(exact, rel=1e-9, abs=1e-12)
    assert {k: num_a[k] for k in num_s if k not in exact} == pytest.approx(
        {k: v for k, v in num_s.items() if k not in exact}, abs=0.15)  # 2-4 scenarios x 3 reports: noisy
    assert (root / "report.html").exists()


def leaves(tree, path=()) -> tuple[dict, dict]:
    """A JSON tree's leaves by path: the numbers, and everything else (strings, flags, nulls)."""
    numbers, other = {}, {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else None
    if items is None:
        is_number = isinstance(tree, (int, float)) and not isinstance(tree, bool)
        (numbers if is_number and tree == tree else other)[path] = tree  # NaN compares as "other"
        return numbers, other
    for k, v in items:
        n, o = leaves(v, path + (k,))
        numbers |= n
        other |= o
    return numbers, other
