"""Run `metasft <args>` as a torchrun worker, then fail (exit 3) if any gloo thread is still alive.

A process group that outlives ``destroy_process_group()`` keeps gloo's worker threads running into
interpreter finalisation, where they can abort a successful rank with SIGABRT (see
metasft/distributed.py). Checking the threads after ``main`` returns proves the group was really
destroyed, deterministically, where waiting for the abort would need hundreds of runs.
"""

import os
import sys

from metasft.cli import main


def gloo_threads() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as handle:
                names.append(handle.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(name for name in names if "gloo" in name)


def control() -> int:
    """Positive control (``exit_probe.py --control``): a live gloo group must be seen, so a change in
    gloo's thread names cannot make the probe pass silently. Exit 0 when it sees the threads."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    dist.all_reduce(__import__("torch").zeros(1))
    seen = gloo_threads()
    dist.destroy_process_group()
    print(f"gloo threads while a group lives: {seen}")
    return 0 if seen else 4


if __name__ == "__main__":
    if sys.argv[1:] == ["--control"]:
        sys.exit(control())
    code = main(sys.argv[1:])
    alive = gloo_threads()
    if alive:
        print(f"rank {os.environ.get('RANK')}: gloo threads alive after metasft returned: {alive}", file=sys.stderr)
        sys.exit(3)
    sys.exit(code)
