"""How many CPU threads each metasft process gives torch, from the cores it may actually use.

torch's default is one intra-op thread per *physical* core of the machine, whatever the process's
CPU affinity or container quota says, and regardless of other metasft processes started beside it
(torchrun ranks, the trainings ``bench`` runs side by side). On a small CPU that oversubscribes the
cores: OpenMP threads spin at every parallel region waiting for a thread that is not scheduled, and
a 5-second evaluation can take minutes. So every command sizes its pool here, once, at start.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota if any."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_quota() -> int | None:
    """Whole cores granted by a cgroup v2 (``cpu.max``) or v1 (``cpu.cfs_quota_us``) quota, if set."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return max(1, math.floor(int(text[0]) / int(text[1])))
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return max(1, math.floor(quota / period))
    except (OSError, ValueError):
        pass
    return None


def threads_per_process(sharing: int = 1) -> int:
    """Threads for one of ``sharing`` processes that run at the same time on this process's cores."""
    return max(1, available_cores() // max(1, sharing))


def configure_torch_threads(sharing: int = 1) -> int:
    """Set torch's intra-op pool for one of ``sharing`` concurrent processes and return its size.

    An explicit ``OMP_NUM_THREADS`` (the user's, or torchrun's default of 1 per rank) wins."""
    import torch

    explicit = os.environ.get("OMP_NUM_THREADS", "").strip()
    threads = int(explicit) if explicit.isdigit() and int(explicit) > 0 else threads_per_process(sharing)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
