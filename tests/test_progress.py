"""Progress in log files: periodic plain lines with counts and ETA instead of a live bar."""

import io

from rich.console import Console

from selfinterp.progress import LogProgress, bar


def test_not_a_terminal_prints_lines_with_count_and_eta():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    p = bar("  scoring", console=console, every=0.0)
    assert isinstance(p, LogProgress)
    with p:
        t = p.add_task("", total=4)
        p.update(t, advance=1)
        p.update(t, advance=3)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("  scoring 1/4,") and "eta" in lines[0]
    assert lines[-1].startswith("  scoring 4/4,") and "eta" not in lines[-1]


def test_lines_are_rate_limited_and_an_unfinished_task_reports_where_it_stopped():
    out = io.StringIO()
    p = LogProgress("{task.description}", Console(file=out, width=200), every=3600)
    t = p.add_task("fine-tuning", total=10, info="")
    for _ in range(5):
        p.update(t, advance=1, info="loss 0.5")
    assert out.getvalue() == ""  # nothing within the interval
    p.stop()
    assert out.getvalue().strip().startswith("fine-tuning 5/10") and "loss 0.5" in out.getvalue()


def test_terminal_gets_a_rich_bar():
    from rich.progress import Progress

    assert isinstance(bar(console=Console(file=io.StringIO(), force_terminal=True)), Progress)
