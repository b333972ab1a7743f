"""First-order MAML (Finn et al., 2017, §5.2; "FOMAML" in Nichol et al., 2018).

    φ_i = θ − α Σ_k ∇L_support,k(φ_i,k)        (K plain-SGD steps, no graph kept)
    g   = mean_i ∇_φ L_query(φ_i)               (the query gradient at the adapted weights)

With learned inner rates (``meta.learn_inner_lr``) α is a meta-parameter too; its first-order
gradient is −⟨∇_φ L_query(φ_i), g_k⟩ per tensor (``InnerLoop.accumulate_first_order_rates``).

With LoRA on (``model.lora_rank > 0``) this is META-LoRA: θ is only the adapter weights.
"""

from __future__ import annotations


from metasft.algorithms.base import MetaAlgorithm
from metasft.algorithms.inner_loop import Episode, InnerLoop, TaskBatch, TaskMetrics, _tokens


class FOMAML(MetaAlgorithm):
    name = "fomaml"
    learned_rates = True

    def run_task(self, engine: InnerLoop, episode: Episode, weight: float, want_pre: bool) -> TaskMetrics:
        metrics = TaskMetrics(episode.task)
        engine.restore()
        if want_pre:
            metrics.query_loss_pre = engine.eval_loss(episode.query_batch)
        engine.adapt_in_place(episode.support_batches, metrics)
        query_loss = engine.loss(episode.query_batch)
        metrics.query_loss_post = float(query_loss.detach())
        metrics.tokens += _tokens(episode.query_batch)
        grads = engine.grad(query_loss)  # every meta-parameter: the inner scope at φ, the rest at θ
        engine.accumulate(grads, weight)
        engine.accumulate_first_order_rates(engine.inner_part(grads), weight)  # learned inner rates only
        return metrics

    def run_batch(self, engine: InnerLoop, batch: TaskBatch, weight: float, want_pre: bool) -> list[TaskMetrics]:
        metrics = self.new_metrics(batch)
        if want_pre:
            engine.record_query_loss_pre(batch, metrics)
        adapted = engine.adapt_batched(batch, metrics)
        query_losses = engine.batched_losses(adapted, batch.query)
        engine.record_query_losses(batch, metrics, query_losses, "query_loss_post", count_tokens=True)
        # The inner scope's gradients come stacked [T, ...] (task t's in slice t), the rest summed.
        grads, inner = engine.query_grads(query_losses.sum(), adapted)
        engine.accumulate(grads, weight)
        engine.accumulate_first_order_rates(inner, weight)  # learned inner rates only
        return metrics
