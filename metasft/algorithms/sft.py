"""The multi-task SFT baseline that meta-learning has to beat.

    g = ∇_θ L(B),  B = one batch of ``inner_batch_size`` examples from each task of the meta-batch

L is the §2.3 token mean over the whole batch B, so each task's part is its summed token loss
divided by B's total target count (``episode.num_targets``), and the parts add up.
"""

from __future__ import annotations

from metasft.algorithms.base import MetaAlgorithm
from metasft.algorithms.inner_loop import InnerLoop, TaskBatch, TaskMetrics, _tokens


class SFT(MetaAlgorithm):
    name = "sft"
    episodic = False
    batches_tasks = False  # no inner loop: its tasks already share one batch per step

    def task_weight(self, num_tasks: int) -> float:
        return 1.0  # each part is already normalised by the global token count

    def run(self, engine: InnerLoop, tasks: TaskBatch, weight: float, want_pre: bool) -> list[TaskMetrics]:
        (episode,) = tasks.episodes
        metrics = TaskMetrics(episode.task)
        batch = episode.support_batches[0]
        loss = engine.loss(batch, num_targets=episode.num_targets)
        metrics.tokens += _tokens(batch)
        metrics.extra["loss_part"] = float(loss.detach())
        metrics.finite = bool(loss.detach().isfinite())
        engine.accumulate(engine.grad(loss), weight)
        return [metrics]


class MetaICL(SFT):
    """MetaICL (Min et al., 2022): the same multi-task SFT step, on rows in which each training
    example follows ``meta.metaicl_demos`` demonstrations of its own task (built once by
    :func:`metasft.data.in_context.metaicl_tasks`), so the model learns to learn in context."""

    name = "metaicl"
