"""One writer per run directory (issue 12): a second run into a live run's directory stops with
a one-line message naming the holder's pid; a lock left by a dead process is taken over."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from selfinterp.lock import LOCK_NAME, RunLocked, lock_run


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def hold_lock(root: Path, write_pid: str | None = None) -> subprocess.Popen:
    """A process that takes the lock and holds it until killed (prints 'held' once it has it)."""
    code = textwrap.dedent(f"""
        import sys, time
        from selfinterp.lock import lock_run
        lock = lock_run({str(root)!r})
        if {write_pid!r} is not None:  # pretend the recorded owner is another (dead) process
            import os
            os.ftruncate(lock.fd, 0); os.lseek(lock.fd, 0, 0); os.write(lock.fd, {write_pid!r}.encode())
        print("held", flush=True)
        time.sleep(120)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_holder_is_refused_with_the_pid(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(RunLocked) as e:
            lock_run(tmp_path)
        assert e.value.pid == holder.pid and f"pid {holder.pid}" in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    # killed: the kernel dropped its flock; the file still names it, and is taken over
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(holder.pid)
    notes = []
    lock = lock_run(tmp_path, note=notes.append)
    assert lock.took_over == holder.pid and notes and str(holder.pid) in notes[0]
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    lock.release()


def test_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path):
    pid = dead_pid()
    (tmp_path / LOCK_NAME).write_text(f"{pid}\n")
    with lock_run(tmp_path) as lock:
        assert lock.took_over == pid
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(RunLocked):  # even from this process, a second taker is refused
            lock_run(tmp_path)
    with lock_run(tmp_path) as again:  # released: free again, nothing to take over
        assert again.took_over is None


def test_lock_held_on_behalf_of_a_dead_pid_is_replaced(tmp_path):
    """The recorded owner is gone but a process (e.g. a child it forked) still holds the flock."""
    pid = dead_pid()
    holder = hold_lock(tmp_path, write_pid=str(pid))
    try:
        with lock_run(tmp_path) as lock:
            assert lock.took_over == pid
    finally:
        holder.kill()
        holder.wait()


def test_two_selfinterp_runs_into_one_directory(tmp_path):
    out = tmp_path / "run"
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text('preset = "simulated"\nn_instilled = 6\nn_native = 0\nn_train = 20\nn_eval_trials = 60\n'
                        'n_reports = 3\nbatch_size = 4\n[simulated]\ncall_delay = 0.02\n')
    cmd = [sys.executable, "-m", "selfinterp", "run", str(cfg_file), "--out", str(out)]
    env = {**os.environ, "COLUMNS": "300"}
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (out / "journal").is_dir():  # in its first model stage
            time.sleep(0.05)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
        assert first.poll() is None, "the first run ended before the second started"
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert "Traceback" not in second.stderr
        assert f"pid {first.pid}" in lines[-1] and lines[-1].startswith("error:"), second.stderr
        assert sum("error" in line for line in lines) == 1
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # the killed run's lock is stale: the next run takes it over and finishes
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert f"took over the lock of pid {first.pid}" in res.stderr


def _launch_env(rank: int, port: int, run_id: str = "none") -> dict:
    return {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": run_id}


def _try_lock(root: Path, env: dict, timeout: float = 3.0) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        from selfinterp.lock import RunLock, RunLocked
        try:
            lock = RunLock({str(root)!r}, join_timeout={timeout}).acquire()
            print("joined" if lock.joined else "held")
        except RunLocked as e:
            print("locked:", e)
    """)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_the_ranks_of_one_launch_share_its_lock(tmp_path):
    """Under torchrun / accelerate launch, rank 0 holds the run's lock and the other ranks of the
    same launch join it; a rank of another launch, or a plain second run, is refused."""
    code = textwrap.dedent(f"""
        import time
        from selfinterp.lock import lock_run
        lock = lock_run({str(tmp_path)!r})
        print("held", flush=True)
        time.sleep(120)
    """)
    rank0 = subprocess.Popen([sys.executable, "-c", code], env=_launch_env(0, 29500), stdout=subprocess.PIPE, text=True)
    try:
        assert rank0.stdout.readline().strip() == "held"
        assert (tmp_path / LOCK_NAME).read_text() == f"{rank0.pid}\ngroup none@127.0.0.1:29500\n"
        assert _try_lock(tmp_path, _launch_env(1, 29500)).stdout.strip() == "joined"
        other = _try_lock(tmp_path, _launch_env(1, 29501)).stdout.strip()
        assert other.startswith("locked:") and f"pid {rank0.pid}" in other
        plain = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
        assert f"pid {rank0.pid}" in _try_lock(tmp_path, plain).stdout
    finally:
        rank0.kill()
        rank0.wait()


def test_a_rank_waits_for_rank_0_and_gives_up_with_a_message(tmp_path):
    res = _try_lock(tmp_path, _launch_env(1, 29502), timeout=0.5)
    assert res.stdout.startswith("locked:") and "Traceback" not in res.stderr
    # rank 0 arriving late: rank 1 waits for it
    code = textwrap.dedent(f"""
        import time
        time.sleep(1.0)
        from selfinterp.lock import lock_run
        lock = lock_run({str(tmp_path)!r})
        time.sleep(5)
    """)
    late = subprocess.Popen([sys.executable, "-c", code], env=_launch_env(0, 29503))
    try:
        assert _try_lock(tmp_path, _launch_env(1, 29503), timeout=30).stdout.strip() == "joined"
    finally:
        late.kill()
        late.wait()
