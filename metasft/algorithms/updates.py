"""Inner-loop update rules as small objects (STYLE.md: "an update rule is an object, not a branch").

Each rule maps (weights, gradients, inner step k) to new weights with plain differentiable tensor
ops, so one rule serves every storage: φ held in the model's own parameters (written back in place),
or per-task stacks ``[T, ...]`` (task batching), with the graph kept (MAML) or not (first order).

* :class:`SGD` — φ − α g, the inner step MAML-style training optimises for;
* :class:`LearnedSGD` — φ − α_k ⊙ g with α meta-parameters (Meta-SGD, MAML++: ``meta.learn_inner_lr``);
* :class:`Adam` — ``torch.optim.Adam``'s update (fresh moments per task: Reptile's optional inner
  optimizer, and ``adapt --optimizer adamw``, whose weight decay is 0). The update is elementwise,
  so stacked weights are T independent Adams.
"""

from __future__ import annotations

import math

import torch


class SGD:
    def __init__(self, lr: float):
        self.lr = lr

    def rate(self, index: int, k: int) -> float:
        return self.lr

    def subset(self, indices: list[int]) -> "SGD":
        """The rule for the tensors at ``indices`` only (their rates, in that order)."""
        return self

    def step(self, weights: list[torch.Tensor], grads: list[torch.Tensor], k: int) -> list[torch.Tensor]:
        # torch.add with alpha: one op per tensor instead of a mul and a sub.
        return [torch.add(w, g, alpha=-self.lr) for w, g in zip(weights, grads)]


class LearnedSGD:
    """One rate per tensor (``[]``) or per tensor and inner step (``[K]``); steps beyond the K that
    were learnt use the last rate. The rates stay in the graph, so MAML differentiates through them."""

    def __init__(self, rates: list[torch.Tensor]):
        self.rates = rates

    def rate(self, index: int, k: int) -> torch.Tensor:
        rate = self.rates[index]
        return rate if rate.dim() == 0 else rate[min(k, rate.shape[0] - 1)]

    def subset(self, indices: list[int]) -> "LearnedSGD":
        return LearnedSGD([self.rates[i] for i in indices])

    def step(self, weights: list[torch.Tensor], grads: list[torch.Tensor], k: int) -> list[torch.Tensor]:
        return [w - self.rate(i, k) * g for i, (w, g) in enumerate(zip(weights, grads))]


class Adam:
    """``torch.optim.Adam(lr)`` (betas 0.9/0.999, eps 1e-8, no weight decay), written out."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.steps, self.exp_avg, self.exp_avg_sq = 0, None, None

    def step(self, weights: list[torch.Tensor], grads: list[torch.Tensor], k: int) -> list[torch.Tensor]:
        beta1, beta2 = self.betas
        if self.exp_avg is None:
            self.exp_avg = [torch.zeros_like(g) for g in grads]
            self.exp_avg_sq = [torch.zeros_like(g) for g in grads]
        self.steps += 1
        bias1, bias2 = 1 - beta1 ** self.steps, 1 - beta2 ** self.steps
        out = []
        for w, g, m, v in zip(weights, grads, self.exp_avg, self.exp_avg_sq):
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(bias2)).add_(self.eps)
            out.append(torch.addcdiv(w.detach(), m, denom, value=-self.lr / bias1))
        return out


def step_in_place(rule, params: list[torch.Tensor], grads: list[torch.Tensor], k: int) -> None:
    """Apply ``rule`` to parameters in place (under ``no_grad``). SGD adds into them directly; the
    others compute the new values and copy them in."""
    if isinstance(rule, SGD):
        torch._foreach_add_(params, grads, alpha=-rule.lr)
    else:
        torch._foreach_copy_(params, rule.step(params, grads, k))
