"""Named fault points, so that crash tests choose *where* a process dies instead of *when*.

    METASFT_FAULT=checkpoint.after_weights@3 metasft train ...   # SIGKILL while saving step_3
    METASFT_FAULT=meta_step.end@2 METASFT_FAULT_RANK=1 METASFT_FAULT_SIGNAL=SIGTERM torchrun ...
    METASFT_FAULT=meta_step.end@3,checkpoint.after_weights@3 METASFT_FAULT_SIGNAL=SIGINT metasft train ...
    METASFT_FAULT=meta_step.nonfinite@2 metasft train ...    # meta-step 2's gradient becomes NaN

The code calls :func:`point` at each place where a crash must leave a consistent state (see
:data:`POINTS`). When ``METASFT_FAULT`` names that point and meta-step, the process sends itself the
signal (SIGKILL unless ``METASFT_FAULT_SIGNAL`` says otherwise) right there; ``METASFT_FAULT_RANK``
restricts the fault to one torchrun rank; several faults are separated by commas (a second signal while
the first is being handled). ``meta_step.nonfinite`` sends no signal: :func:`poisoned` tells the
trainer to make that meta-step's gradient NaN, a transient numerical fault. ``while_*`` points first tear the file being written
(truncate it to half its length), as a crash in the middle of the write would leave it. Unset, a
point costs one dictionary lookup. Used by the tests and benchmarks only; users never need it.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Callable

from metasft.errors import MetasftError

POINTS = (
    "meta_step.end",                 # after meta-step N's update, before logging/evaluation/saving
    "checkpoint.before_weights",     # temporary directory made, nothing written yet
    "checkpoint.while_weights",      # model safetensors half written
    "checkpoint.after_weights",      # model (and tokenizer, config) written
    "checkpoint.while_optimizer",    # optimizer.pt half written
    "checkpoint.after_optimizer",    # optimizer.pt written, trainer state not yet
    "checkpoint.while_trainer_state",  # trainer_state.json half written
    "checkpoint.before_rename",      # everything written and synced, still under the temporary name
    "checkpoint.while_replacing",    # re-saving a step: the old copy moved aside, the new one not yet in place
    "checkpoint.after_rename",       # in place, older checkpoints not yet pruned
)


def _parse() -> set[tuple[str, int]]:
    spec = os.environ.get("METASFT_FAULT")
    faults = set()
    for item in (spec or "").split(","):
        if not item:
            continue
        name, _, step = item.partition("@")
        if name not in POINTS + ("meta_step.nonfinite",) or not step.isdigit():
            raise MetasftError(f"METASFT_FAULT={spec!r}: expected POINT@STEP[,POINT@STEP] with POINT one of "
                               f"{', '.join(POINTS)} or meta_step.nonfinite")
        faults.add((name, int(step)))
    return faults


def poisoned(step: int) -> bool:
    """Whether ``METASFT_FAULT`` asks for meta-step ``step``'s gradient to be non-finite (this rank)."""
    return ("meta_step.nonfinite", step) in _parse() and _this_rank()


def _this_rank() -> bool:
    rank = os.environ.get("METASFT_FAULT_RANK")
    return rank is None or rank == os.environ.get("RANK", "0")


def point(name: str, step: int, tear: str | os.PathLike | Callable[[], Path] | None = None) -> None:
    """Die here if ``METASFT_FAULT`` asks for ``name`` at meta-step ``step`` (on this rank).

    ``tear``: the file being written (or a function finding it, called only when the fault fires)."""
    if (name, step) not in _parse() or not _this_rank():
        return
    if tear is not None:
        path = Path(tear() if callable(tear) else tear)
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size // 2)
            handle.flush()
            os.fsync(handle.fileno())
    signum = signal.Signals[os.environ.get("METASFT_FAULT_SIGNAL", "SIGKILL")]
    os.kill(os.getpid(), signum)
