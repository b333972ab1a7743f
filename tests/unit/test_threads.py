"""Thread pools are sized from the cores a process may use, shared among concurrent processes."""

import os
import subprocess
import sys

import torch

from metasft import threads


def test_threads_divide_the_available_cores_among_concurrent_processes(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    assert [threads.threads_per_process(n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]


def test_explicit_omp_num_threads_wins_and_the_default_follows_the_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert threads.configure_torch_threads(sharing=1) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(threads, "available_cores", lambda: 6)
        assert threads.configure_torch_threads(sharing=2) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_cpu_affinity_limits_the_cores_a_command_uses():
    # A process pinned to one core (taskset, a scheduler's cpuset) gets one thread, whatever the
    # machine has; torch alone would take one per physical core.
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from metasft.threads import configure_torch_threads; import torch; "
            "print(configure_torch_threads(), torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["1", "1"]


def test_the_cli_pins_mkl_thread_count_for_itself_and_its_children(monkeypatch):
    # MKL_DYNAMIC=TRUE (MKL's default) lets it use fewer threads on a busy machine, which reorders
    # sums: a same-seed bench re-run once differed in the 7th digit on CI. Children inherit it.
    from metasft.cli import main

    monkeypatch.delenv("MKL_DYNAMIC", raising=False)
    monkeypatch.delenv("OMP_DYNAMIC", raising=False)
    try:
        main(["--version"])
    except SystemExit:
        pass
    assert os.environ["MKL_DYNAMIC"] == "FALSE" and os.environ["OMP_DYNAMIC"] == "FALSE"
    monkeypatch.setenv("MKL_DYNAMIC", "TRUE")  # a user's explicit choice wins
    try:
        main(["--version"])
    except SystemExit:
        pass
    assert os.environ["MKL_DYNAMIC"] == "TRUE"
