"""MAML with the full second-order meta-gradient (Finn et al., 2017, "Model-Agnostic
Meta-Learning for Fast Adaptation of Deep Networks").

    φ_i(θ) = θ − α Σ_k ∇L_support,k(φ_i,k(θ))   (graph kept: create_graph=True)
    g      = mean_i ∇_θ L_query(φ_i(θ))           (backpropagates through every inner step)

With learned inner rates (``meta.learn_inner_lr``; Meta-SGD, MAML++) each step is φ − α ⊙ ∇L with α
a meta-parameter in the same graph, so ∂/∂α comes from the same backward pass. With
``meta.inner_scope: head`` this is ANIL (Raghu et al., ICLR 2020): the inner loop adapts the head,
and the gradient reaches the body through the head's inner updates and the query pass.

Costs (9K+3)/(3K+3) times FOMAML's matmuls — one Hessian-vector product per inner step on top of
FOMAML's passes; tests/unit/test_compute_cost.py counts them. The support passes need attention
with a double backward: the engine forces the math SDPA kernel on them (only). φ is always a
function of θ through ``torch.func.functional_call``, so θ itself is never modified; activation
checkpointing is refused (recomputation would not see the functional weights).
"""

from __future__ import annotations

from metasft.algorithms.base import MetaAlgorithm
from metasft.algorithms.inner_loop import InnerLoop, TaskBatch, TaskMetrics


class MAML(MetaAlgorithm):
    name = "maml"
    second_order = True
    learned_rates = True

    def run(self, engine: InnerLoop, tasks: TaskBatch, weight: float, want_pre: bool) -> list[TaskMetrics]:
        metrics = engine.start_metrics(tasks, want_pre)
        # φ starts as θ broadcast to T copies, so the backward pass sums the T tasks' paths into θ.
        adapted = engine.adapt(tasks, metrics, second_order=True)
        query_losses = engine.losses(tasks.query, adapted)
        engine.record_losses(tasks, metrics, "query_loss_post", query_losses, count_tokens=True)
        engine.accumulate_through_inner_loop(query_losses.sum(), weight)  # ∇ w.r.t. θ (and α)
        return metrics
