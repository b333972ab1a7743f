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

The engine uses it for MAML's inner loop when the inner scope holds the head's ``lora_B`` and the
inner rule is SGD with a fixed or learned rate per tensor (the update is then a scalar times Gᵀz):
for one task, and for T tasks at once when the inner scope is exactly the head adapter's A and B
over states that reach the head directly (their target rows then run in one forward, each task's
through its own A, :class:`PerTaskLinear`, and factored B). FOMAML and Reptile use it too, first
order (the terms detached), with SGD at a fixed rate: their meta-gradient needs B only as one dense
sum over the tasks, Gᵀz at the query pass (:meth:`LowRankB.weight_grad`) or −Σ U M
(:meth:`LowRankB.displacement`). Everything else — other rules, first-order learned rates (which
need every step's dense gradient), FSDP2's sharded parameters, adaptation that leaves φ in the model
(``metasft adapt``, ``bench``) — keeps the dense path.
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
    scope's tensors; ``a_index``: lora_A's, when the inner scope is exactly the two (T tasks can then
    run their target rows together: :class:`PerTaskLinear`)."""

    layer: torch.nn.Module
    adapter: str
    index: int
    a_index: int | None = None


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
    indices = [i for i, param in enumerate(inner_params) if param is module.weight]
    if not indices:
        return None
    a_weight = head.lora_A[adapter].weight if adapter in head.lora_A else None
    others = [i for i, param in enumerate(inner_params) if param is not module.weight]
    a_index = others[0] if len(others) == 1 and inner_params[others[0]] is a_weight else None
    return HeadB(head, adapter, indices[0], a_index)


def _plain(module: torch.nn.Module, **values) -> None:
    """Plain attributes, not registered parameters: θ's tensors stay parameters of the layer they
    belong to, and functional_call sees no second name for them."""
    for name, value in values.items():
        object.__setattr__(module, name, value)


def _split(x: torch.Tensor, counts: list[int] | None) -> list[torch.Tensor]:
    """``x``'s rows task by task (tasks' rows are consecutive); one part when ``counts`` is None."""
    return [x] if counts is None else list(x.split(counts))


class LowRankB(torch.nn.Module):
    """Stands in for ``lora_B`` during an inner loop: each task's weight B_0 + U_t M_t, applied
    without forming it.

    One task (``counts`` None) takes any input shape. T tasks take their target rows concatenated,
    ``counts[t]`` rows of task t in order (:meth:`InnerLoop.stack_rows`): B_0 is then one matmul
    over every task's rows, read once, and its meta-gradient one dense tensor per pass, not per task.

    Records the input and output of its last call: the next inner step's gradient with respect to
    that output, with the input, is the step's update."""

    def __init__(self, base: torch.Tensor, left: list[torch.Tensor] | None = None,
                 right: list[torch.Tensor] | None = None):
        super().__init__()
        _plain(self, base=base, left=left, right=right, counts=None, last_input=None, last_output=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.base)
        if self.left is not None:
            parts = _split(x, self.counts)
            out = out + torch.cat([F.linear(F.linear(xt, r), l) for xt, l, r in zip(parts, self.left, self.right)])
        _plain(self, last_input=x, last_output=out)
        return out

    def _rows(self, grad_output: torch.Tensor, detach: bool) -> tuple[torch.Tensor, torch.Tensor]:
        g = grad_output.reshape(-1, grad_output.shape[-1])          # [n, vocabulary]
        z = self.last_input.reshape(-1, self.last_input.shape[-1])  # [n, rank]
        return (g.detach(), z.detach()) if detach else (g, z)

    def stepped(self, grad_output: torch.Tensor, rate: torch.Tensor | float, detach: bool = False) -> "LowRankB":
        """B after one SGD step, B − rate · Gᵀz per task, from the gradient G with respect to the last
        output; ``detach``: a first-order step, whose terms are constants.

        The loss computes the head at the target tokens only (metasft.losses.logits_at_targets), so
        G and z have one row per target; at any other row G would be zero and add nothing."""
        g, z = self._rows(grad_output, detach)
        g_parts, z_parts = _split(g, self.counts), _split(z, self.counts)
        left = [gt.transpose(0, 1) for gt in g_parts]
        right = [-rate * zt for zt in z_parts]
        if self.left is not None:
            left = [torch.cat([old, new], 1) for old, new in zip(self.left, left)]
            right = [torch.cat([old, new], 0) for old, new in zip(self.right, right)]
        return LowRankB(self.base, left, right)

    @torch.no_grad()
    def weight_grad(self, grad_output: torch.Tensor) -> torch.Tensor:
        """The gradient with respect to B of a loss whose gradient with respect to the last output is
        ``grad_output``, summed over the tasks' rows: Gᵀz, one dense tensor (a first-order
        meta-gradient, which treats B as a constant)."""
        g, z = self._rows(grad_output, detach=True)
        return g.transpose(0, 1) @ z

    @torch.no_grad()
    def displacement(self) -> torch.Tensor:
        """Σ_t (B_0 − B_t) = −Σ_t U_t M_t over the tasks, one dense tensor (Reptile's update)."""
        if self.left is None:
            return torch.zeros_like(self.base)
        return -(torch.cat(self.left, 1) @ torch.cat(self.right, 0))

    def dense(self, task: int = 0) -> torch.Tensor:
        """Task ``task``'s B as one tensor (for tests)."""
        return self.base if self.left is None else self.base + self.left[task] @ self.right[task]


class PerTaskLinear(torch.nn.Module):
    """Stands in for ``lora_A`` when T tasks' target rows run together: task t's rows by its own
    weight ``weight[t]`` (a ``[T, out, in]`` stack, in the graph)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        _plain(self, weight=weight, counts=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.linear(xt, w) for xt, w in zip(_split(x, self.counts), self.weight)])


@contextlib.contextmanager
def installed(head_b: HeadB, b: LowRankB, a: PerTaskLinear | None = None, counts: list[int] | None = None):
    """``b`` (and ``a``) as the head's ``lora_B`` (and ``lora_A``) for the duration, reading rows
    task by task per ``counts``; the layer's own modules are put back."""
    swaps = [(head_b.layer.lora_B, b)] + ([(head_b.layer.lora_A, a)] if a is not None else [])
    saved = [modules[head_b.adapter] for modules, _ in swaps]
    for modules, module in swaps:
        _plain(module, counts=counts)
        modules[head_b.adapter] = module
    try:
        yield
    finally:
        for (modules, _), old in zip(swaps, saved):
            modules[head_b.adapter] = old
