"""The head's LoRA ``B`` kept factored through a second-order inner loop: B_k = B_0 + U_k M_k.

An SGD step on the ``B`` of the output head's LoRA adapter is B − α Gᵀz, where z is ``lora_B``'s input
and G the loss's gradient with respect to its output. Both are non-zero only at the target positions
(about two a row), so after k steps the adapted B is B_0 plus a product of thin matrices:

    U_k = [G_1ᵀ … G_kᵀ]        vocabulary × n        (n: target positions of the k support batches)
    M_k = [−α_1 z_1; …; −α_k z_k]   n × rank

and its output on a feature x is x B_0ᵀ + (x M_kᵀ) U_kᵀ. This is the same step, to float rounding, as
the dense one (tests/unit/test_factored_head.py checks the adapted losses and the meta-gradient
against it in float64). What it saves is the dense vocabulary × rank tensors: on SmolLM2's full head
adapter (49,152 × 576) every inner step made a dense B, its gradient, and their second-order
backward — 72% of an ANIL meta-step (docs/real_model.md). Factored, those are vocabulary × n.

The engine uses it for MAML's inner loop on one task at a time when the inner scope holds the head's
``lora_B`` and the inner rule is SGD with a fixed or learned rate per tensor (the update is then a
scalar times Gᵀz). Everything else — other rules, task batching, first-order paths whose φ is held in
place — keeps the dense path.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metasft.errors import MetasftError


@dataclass(frozen=True)
class HeadB:
    """Where the head's LoRA B lives: its peft layer, the adapter's name, and its index in the inner
    scope's tensors."""

    layer: torch.nn.Module
    adapter: str
    index: int


def find_head_b(model, inner_params: list[torch.Tensor]) -> HeadB | None:
    """The inner scope's head ``lora_B``, when the head is a plain (vanilla, bias-free) LoRA layer
    with one active adapter; None otherwise (the dense path then runs)."""
    from metasft.scope import decoder_parts

    try:
        head = decoder_parts(model).head
    except MetasftError:
        return None
    lora_b = getattr(head, "lora_B", None)
    adapters = getattr(head, "active_adapters", None)
    if not isinstance(lora_b, torch.nn.ModuleDict) or not adapters or len(adapters) != 1:
        return None
    adapter = adapters[0]
    module = lora_b[adapter] if adapter in lora_b else None
    if type(module) is not torch.nn.Linear or module.bias is not None or adapter in getattr(head, "lora_variant", {}):
        return None
    for index, param in enumerate(inner_params):
        if param is module.weight:
            return HeadB(head, adapter, index)
    return None


class LowRankB(torch.nn.Module):
    """Stands in for ``lora_B`` during an inner loop: weight B_0 + U M, applied without forming it.

    Records the input and output of its last call: the next inner step's gradient with respect to
    that output, with the input, is the step's update."""

    def __init__(self, base: torch.Tensor, left: torch.Tensor | None = None, right: torch.Tensor | None = None):
        super().__init__()
        # Plain attributes, not registered parameters: θ's B stays a parameter of the layer it
        # belongs to, and functional_call sees no second name for it.
        for name, value in (("base", base), ("left", left), ("right", right), ("last_input", None), ("last_output", None)):
            object.__setattr__(self, name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.base)
        if self.left is not None:
            out = out + F.linear(F.linear(x, self.right), self.left)
        object.__setattr__(self, "last_input", x)
        object.__setattr__(self, "last_output", out)
        return out

    def stepped(self, grad_output: torch.Tensor, rate: torch.Tensor | float) -> "LowRankB":
        """B after one SGD step, B − rate · Gᵀz, from the gradient G with respect to the last output.

        The loss computes the head at the target tokens only (metasft.losses.logits_at_targets), so
        G and z have one row per target; at any other row G would be zero and add nothing."""
        g = grad_output.reshape(-1, grad_output.shape[-1])     # [n, vocabulary]
        z = self.last_input.reshape(-1, self.last_input.shape[-1])  # [n, rank]
        left = g.transpose(0, 1) if self.left is None else torch.cat([self.left, g.transpose(0, 1)], 1)
        right = -rate * z if self.right is None else torch.cat([self.right, -rate * z], 0)
        return LowRankB(self.base, left, right)

    def dense(self) -> torch.Tensor:
        return self.base if self.left is None else self.base + self.left @ self.right

    @contextlib.contextmanager
    def installed(self, head_b: HeadB):
        """This module as the head's ``lora_B`` for the duration (the parameter's module is put back)."""
        modules = head_b.layer.lora_B
        saved = modules[head_b.adapter]
        modules[head_b.adapter] = self
        try:
            yield self
        finally:
            modules[head_b.adapter] = saved
