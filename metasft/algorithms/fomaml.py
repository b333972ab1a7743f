"""First-order MAML (Finn et al., 2017, §5.2; "FOMAML" in Nichol et al., 2018).

    φ_i = θ − α Σ_k ∇L_support,k(φ_i,k)        (K plain-SGD steps, no graph kept)
    g   = mean_i ∇_φ L_query(φ_i)               (the query gradient at the adapted weights)

With learned inner rates (``meta.learn_inner_lr``) α is a meta-parameter too; its first-order
gradient is −⟨∇_φ L_query(φ_i), g_k⟩ per tensor (``InnerLoop.accumulate_first_order_rates``).
With ``meta.inner_scope: head`` this is first-order ANIL; with LoRA on it is META-LoRA.
"""

from __future__ import annotations

from metasft.algorithms.base import MetaAlgorithm
from metasft.algorithms.inner_loop import InnerLoop, TaskBatch, TaskMetrics


class FOMAML(MetaAlgorithm):
    name = "fomaml"
    learned_rates = True

    def run(self, engine: InnerLoop, tasks: TaskBatch, weight: float, want_pre: bool) -> list[TaskMetrics]:
        metrics = engine.start_metrics(tasks, want_pre)
        adapted = engine.adapt(tasks, metrics, factor_head=True)  # φ read back only through the engine
        query_losses = engine.losses(tasks.query, adapted)
        engine.record_losses(tasks, metrics, "query_loss_post", query_losses, count_tokens=True)
        # Every meta-parameter's gradient: the inner scope's at φ (summed over tasks), the rest at θ.
        grads, inner = engine.first_order_grads(query_losses.sum(), adapted)
        engine.accumulate(grads, weight)
        engine.accumulate_first_order_rates(inner, adapted, weight)  # learned inner rates only
        return metrics
