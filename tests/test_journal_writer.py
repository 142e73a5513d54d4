"""A journal has one writer (issue 12, item 2): a second one is refused rather than interleaved,
and the lock dies with its holder, so the recovery contract (a cut-off line is cut away, every
complete line kept) still holds after kill -9."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from selfinterp.journal import Journal, JournalBusy


def test_a_second_writer_is_refused_until_the_first_closes(tmp_path):
    p = tmp_path / "j.jsonl"
    first = Journal(p)
    first.record_many([("a", 1), ("b", 2)])
    with pytest.raises(JournalBusy, match="another writer holds this journal"):
        Journal(p)
    first.record_many([("c", 3)])  # the first writer is undisturbed
    first.close()
    with Journal(p) as second:
        assert second.records == {"a": 1, "b": 2, "c": 3}
        second.record_many([("d", 4)])
    assert len(p.read_text().splitlines()) == 4


HOLDER = textwrap.dedent("""
    import sys, time
    from selfinterp.journal import Journal
    j = Journal(sys.argv[1])
    j.record_many([("x", 1)])
    j._file.write('{"key": "half')  # a line cut off mid-write, as by a crash
    j._file.flush()
    print("holding", flush=True)
    time.sleep(60)
""")


def test_another_process_holds_it_until_killed_then_recovery_as_before(tmp_path):
    p = tmp_path / "j.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(p)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "holding"
        with pytest.raises(JournalBusy):
            Journal(p)
        assert p.read_text().endswith('{"key": "half')  # refused before touching the file
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 10
    while True:  # the kernel drops a dead process's locks
        try:
            j = Journal(p)
            break
        except JournalBusy:
            assert time.time() < deadline
            time.sleep(0.05)
    assert j.records == {"x": 1} and j.n_truncated == 1
    j.record_many([("y", 2)])
    j.close()
    assert Journal(p).records == {"x": 1, "y": 2}
