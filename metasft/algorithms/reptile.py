"""Reptile (Nichol, Achiam & Schulman, 2018, "On First-Order Meta-Learning Algorithms").

    φ_i = K inner steps from θ (SGD at α, or Adam with ``meta.inner_optimizer: adam``)
    g   = mean_i (θ − φ_i)

so an outer SGD step with learning rate ε is the published update θ ← θ + ε·mean_i(φ_i − θ).
The query set is not used by the update; its post-adaptation loss is logged when asked.
"""

from __future__ import annotations

import torch

from metasft.algorithms.base import MetaAlgorithm
from metasft.algorithms.inner_loop import Episode, InnerLoop, TaskMetrics


class Reptile(MetaAlgorithm):
    name = "reptile"

    def __init__(self, inner_optimizer: str = "sgd"):
        self.inner_optimizer = inner_optimizer

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
