"""Child processes that never outlive a test: run a command, and on a timeout or any failure kill
it *and every process below it*.

`torchrun` starts its worker ranks in sessions of their own, so killing the agent (what
``subprocess.run(timeout=...)`` does) or its process group leaves the ranks running. Here the whole
tree is found through ``/proc`` (parent pids) while the agent is still alive, then killed.
"""

import os
import signal
import subprocess


def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ')'
                parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
    return parents


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, frontier = [], [pid]
    while frontier:
        below = [c for p in frontier for c in children.get(p, [])]
        found += below
        frontier = below
    return found


def kill_tree(pid: int) -> None:
    for target in descendants(pid) + [pid]:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(cmd, *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, timeout=...)`` that kills the whole process tree on a timeout or error."""
    capture = kwargs.pop("capture_output", False)
    if capture:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
    proc = subprocess.Popen(cmd, **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        kill_tree(proc.pid)
        proc.communicate()
        raise
    finally:
        # Ranks that outlived a finished agent (none should) go too.
        for leftover in descendants(proc.pid):
            kill_tree(leftover)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


class Started:
    """A ``Popen`` for tests that start several processes at once; ``kill()`` ends its whole tree."""

    def __init__(self, cmd, **kwargs):
        self.proc = subprocess.Popen(cmd, **kwargs)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        kill_tree(self.proc.pid)
        self.proc.wait()
