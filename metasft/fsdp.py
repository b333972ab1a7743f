"""FSDP2 strategy (``model.use_fsdp: true``): everything that touches ``torch.distributed.fsdp``.

    torchrun --nproc_per_node=8 -m metasft train --config-name fomaml model.use_fsdp=true ...

Parameters are sharded with ``fully_shard`` per decoder layer, then the root. Unlike the
task-parallel strategy, every rank works on *every* task of the meta-batch, each on its share of
every batch's rows; each rank's loss is its summed token loss divided by the batch's *global*
target count, so FSDP's reduce-scatter must sum (divide factor 1) rather than average — the same
reason torchtune undoes FSDP's gradient averaging. Gradients then arrive already reduced, sharded
like the parameters, and the engine's foreach updates run on the local shards.

First-order algorithms (FOMAML, Reptile, SFT) and LoRA are supported; second-order MAML is
refused by config validation (its graph through the inner loop would span FSDP's all-gathers).
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from metasft.errors import MetasftError

FULL_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of an HF causal LM (plain or peft-wrapped)."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise MetasftError("model.use_fsdp: found no *DecoderLayer modules to shard in this model")
    return layers


def shard_model(model: torch.nn.Module, bf16: bool) -> torch.nn.Module:
    """``fully_shard`` every decoder layer, then the root; bf16 compute with fp32 reduction when asked."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Each rank's loss is already normalised by the global token count: sum, don't average.
            module.set_gradient_divide_factor(1.0)
            # gloo has no PREMUL_SUM: scale separately and reduce with plain SUM (NCCL likes it too).
            module.set_force_sum_reduction_for_comms(True)
    return model


def reshard_all(model: torch.nn.Module) -> None:
    """Drop every gathered (unsharded) parameter copy. FSDP2 keeps the root's parameters gathered
    after a forward that no backward follows (a ``no_grad`` evaluation); a later in-place write to
    the shards (restoring θ, an SGD step) would then be invisible to the next forward, which
    would reuse the stale gathered copy. Call this before writing to parameters."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU (a collective: every rank must call it)."""
    return get_model_state_dict(model, options=FULL_CPU)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(model, optimizer, options=FULL_CPU)


def load_full_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
