"""Reptile (Nichol, Achiam & Schulman, 2018, "On First-Order Meta-Learning Algorithms").

    φ_i = K inner steps from θ (SGD at α, or Adam with ``meta.inner_optimizer: adam``)
    g   = mean_i (θ − φ_i)

so an outer SGD step with learning rate ε is the published update θ ← θ + ε·mean_i(φ_i − θ).
The query set is not used by the update; its post-adaptation loss is logged when asked.
"""

from __future__ import annotations

import torch

from metasft.algorithms.base import MetaAlgorithm
from metasft.algorithms.inner_loop import Episode, InnerLoop, TaskBatch, TaskMetrics


class Reptile(MetaAlgorithm):
    name = "reptile"
    query_gradient = False
    min_inner_steps = 1
    inner_optimizers = ("sgd", "adam")

    def __init__(self, inner_optimizer: str = "sgd"):
        self.inner_optimizer = inner_optimizer

    @classmethod
    def from_config(cls, meta_cfg) -> "Reptile":
        return cls(meta_cfg.inner_optimizer)

    def run_task(self, engine: InnerLoop, episode: Episode, weight: float, want_pre: bool) -> TaskMetrics:
        metrics = TaskMetrics(episode.task)
        engine.restore()
        if want_pre and episode.query_batch is not None:
            metrics.query_loss_pre = engine.eval_loss(episode.query_batch)
        optimizer = None
        if self.inner_optimizer == "adam":
            # Fresh moments per task: Reptile's inner loop starts over for every task.
            optimizer = torch.optim.Adam(engine.params, lr=engine.inner_lr)
        engine.adapt_in_place(episode.support_batches, metrics, optimizer=optimizer)
        if want_pre and episode.query_batch is not None:
            metrics.query_loss_post = engine.eval_loss(episode.query_batch)
        # meta_grad += weight·(θ − φ), as two in-place adds: no parameter-sized temporaries.
        engine.accumulate(engine.theta, weight)
        engine.accumulate(engine.params, -weight)
        return metrics

    def run_batch(self, engine: InnerLoop, batch: TaskBatch, weight: float, want_pre: bool) -> list[TaskMetrics]:
        metrics = self.new_metrics(batch)
        with_query = want_pre and batch.query is not None
        if with_query:
            engine.record_query_loss_pre(batch, metrics)
        adapted = engine.adapt_batched(batch, metrics, inner_optimizer=self.inner_optimizer)
        with torch.no_grad():
            if with_query:
                engine.record_query_losses(batch, metrics, engine.batched_losses(adapted, batch.query),
                                           "query_loss_post", count_tokens=False)
            # Σ_t (θ − φ_t), differences first: θ − φ is small next to θ, and subtracting per task
            # keeps its rounding relative to the difference.
            # Outside the inner scope φ = θ: those meta-parameters get no contribution.
            engine.accumulate([(engine.params[i].unsqueeze(0) - phi).sum(0) for i, phi in
                               zip(engine.inner_index, adapted.values())], weight, index=engine.inner_index)
        return metrics
