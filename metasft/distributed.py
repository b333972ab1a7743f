"""Process-group set-up and collectives. A single process is world size 1 of the same path.

    torchrun --nproc_per_node=2 -m metasft train --config-name fomaml ...

Reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), uses gloo on CPU and nccl on
GPU, and gives rank-0-only printing. Collectives are no-ops at world size 1.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device_type: str) -> DistEnv:
    """Join torchrun's process group when launched by it; otherwise world size 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    env = DistEnv(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if world_size > 1 and not dist.is_initialized():
        _import_modules_that_capture_the_world_group()
        backend = "nccl" if device_type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=float(os.environ.get("METASFT_DIST_TIMEOUT", "600")))
        if device_type == "cuda":
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend=backend, timeout=timeout)
    return env


def _import_modules_that_capture_the_world_group() -> None:
    """Import, while no process group exists, the torch modules whose functions take
    ``group=dist.group.WORLD`` as a default argument.

    Such a default is evaluated once, at import. ``torch.distributed.nn.functional`` has ten of
    them, and it is imported lazily — by ``transformers.modeling_utils`` and peft through
    ``torch.distributed.fsdp`` → ``torch.distributed._shard`` — i.e. only when the model is loaded,
    after ``init_process_group``. Its defaults then hold the live default group, so
    ``destroy_process_group()`` cannot free it: gloo's worker and TCP-loop threads outlive it and
    the group is only destroyed during interpreter finalisation, with its threads still running —
    the state in which a successful rank aborted with ``terminate called without an active
    exception`` (SIGABRT), 1 run in 50 on a busy 2-core machine (benchmarks/stress_exit.py,
    docs/distributed.md "Clean exit"). Imported first, those defaults are ``None`` and the group
    dies in ``shutdown()`` with all its threads joined."""
    import torch.distributed.fsdp  # noqa: F401  (imports torch.distributed._shard, and with it nn.functional)
    import torch.distributed.nn.functional  # noqa: F401


def _release_groups_held_by_device_meshes() -> None:
    """Drop the process groups that surviving DeviceMeshes still hold.

    After FSDP2/DTensor work, torch's sharding-propagation caches keep ``OutputSharding`` →
    ``DTensorSpec`` → ``DeviceMesh`` objects alive for the life of the process, and a DeviceMesh
    holds its process groups (``_pg_registry``): the destroyed group, with gloo's threads, would
    live on into interpreter finalisation — the abort described above. A destroyed group is
    useless to a mesh, so emptying that registry loses nothing."""
    import sys

    if "torch.distributed.device_mesh" not in sys.modules:
        return
    from torch.distributed.device_mesh import DeviceMesh

    for obj in gc.get_objects():
        registry = getattr(obj, "_pg_registry", None) if isinstance(obj, DeviceMesh) else None
        if isinstance(registry, dict):
            registry.clear()


def shutdown() -> None:
    """Destroy the process group so that every backend thread is joined now, while the
    interpreter is fully alive (see :func:`_import_modules_that_capture_the_world_group`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _release_groups_held_by_device_meshes()
        # FSDP's per-module state (which holds the group too) sits in reference cycles with the
        # model: collect them now rather than at some later, possibly final, collection.
        gc.collect()


def has_dtensors(tensors) -> bool:
    """Whether any of ``tensors`` is a DTensor (FSDP2 shards parameters and gradients as such)."""
    return any(hasattr(t, "to_local") for t in tensors)


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum tensors across ranks in place, as one flat buffer (one collective, not one per tensor)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def all_reduce_scalars(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    buf = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard(items: list, env: DistEnv) -> list:
    """This rank's share of a list (round robin), identical for every run with the same world size."""
    return items[env.rank::env.world_size]


def resolve_device(name: str, env: DistEnv) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    from metasft.errors import ConfigError

    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.device: {name} requested but CUDA is not available")
        return torch.device(f"cuda:{env.local_rank}") if name == "cuda" else torch.device(name)
    return torch.device("cpu")
