"""Reptile (Nichol, Achiam & Schulman, 2018, "On First-Order Meta-Learning Algorithms").

    φ_i = K inner steps from θ (SGD at α, or Adam with ``meta.inner_optimizer: adam``)
    g   = mean_i (θ − φ_i)

so an outer SGD step with learning rate ε is the published update θ ← θ + ε·mean_i(φ_i − θ).
Outside the inner scope φ = θ, so those meta-parameters get no contribution.
The query set is not used by the update; its post-adaptation loss is logged when asked.
"""

from __future__ import annotations

import torch

from metasft.algorithms.base import MetaAlgorithm
from metasft.algorithms.inner_loop import InnerLoop, TaskBatch, TaskMetrics


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

    def run(self, engine: InnerLoop, tasks: TaskBatch, weight: float, want_pre: bool) -> list[TaskMetrics]:
        with_query = want_pre and tasks.query is not None
        metrics = engine.start_metrics(tasks, with_query)
        # Adam starts with fresh moments for every adaptation: Reptile's inner loop starts over per task.
        adapted = engine.adapt(tasks, metrics, rule=engine.update_rule(optimizer=self.inner_optimizer),
                               factor_head=True)  # φ read back only through the engine
        with torch.no_grad():
            if with_query:
                engine.record_losses(tasks, metrics, "query_loss_post", engine.losses(tasks.query, adapted))
            engine.accumulate(engine.displacement(adapted), weight, index=engine.inner_index)
        return metrics
