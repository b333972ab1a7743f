"""MAML with the full second-order meta-gradient (Finn et al., 2017, "Model-Agnostic
Meta-Learning for Fast Adaptation of Deep Networks").

    φ_i(θ) = θ − α Σ_k ∇L_support,k(φ_i,k(θ))   (graph kept: create_graph=True)
    g      = mean_i ∇_θ L_query(φ_i(θ))           (backpropagates through every inner step)

With learned inner rates (``meta.learn_inner_lr``; Meta-SGD, MAML++) each step is φ − α ⊙ ∇L with α
a meta-parameter in the same graph, so ∂/∂α comes from the same backward pass.

Costs (9K+3)/(3K+3) times FOMAML's matmuls — one Hessian-vector product per inner step on top of
FOMAML's passes; tests/unit/test_compute_cost.py counts them. The support passes need attention
with a double backward: the engine forces the math SDPA kernel on them (only). The inner
steps run through ``torch.func.functional_call`` so θ itself is never modified; activation
checkpointing is refused (recomputation would not see the functional weights).
"""

from __future__ import annotations


from metasft.algorithms.base import MetaAlgorithm
from metasft.algorithms.inner_loop import Episode, InnerLoop, TaskBatch, TaskMetrics, _tokens


class MAML(MetaAlgorithm):
    name = "maml"
    second_order = True
    learned_rates = True

    def run_task(self, engine: InnerLoop, episode: Episode, weight: float, want_pre: bool) -> TaskMetrics:
        metrics = TaskMetrics(episode.task)
        if want_pre:
            metrics.query_loss_pre = engine.eval_loss(episode.query_batch)
        adapted = engine.adapt_functional(episode.support_batches, create_graph=True, metrics=metrics)
        query_loss = engine.loss(episode.query_batch, adapted)
        metrics.query_loss_post = float(query_loss.detach())
        metrics.tokens += _tokens(episode.query_batch)
        engine.accumulate_through_inner_loop(query_loss, weight)  # ∇ w.r.t. θ (and α), through the inner loop
        return metrics

    def run_batch(self, engine: InnerLoop, batch: TaskBatch, weight: float, want_pre: bool) -> list[TaskMetrics]:
        metrics = self.new_metrics(batch)
        if want_pre:
            engine.record_query_loss_pre(batch, metrics)
        # φ starts as θ broadcast to T copies, so the backward pass sums the T tasks' paths into θ.
        adapted = engine.adapt_batched(batch, metrics, create_graph=True)
        query_losses = engine.batched_losses(adapted, batch.query)
        engine.record_query_losses(batch, metrics, query_losses, "query_loss_post", count_tokens=True)
        engine.accumulate_through_inner_loop(query_losses.sum(), weight)
        return metrics
