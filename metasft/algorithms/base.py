"""What an algorithm is: how one task's episode adds to the meta-gradient.

Algorithms are thin (STYLE.md): each file says which loss is differentiated, whether the graph
through the inner loop is kept, and how the task's contribution is formed. Everything else —
outer optimizer, clipping, schedule, all-reduce, logging, checkpointing — lives in the trainer.
"""

from __future__ import annotations

from metasft.algorithms.inner_loop import Episode, InnerLoop, TaskBatch, TaskMetrics


class MetaAlgorithm:
    """Subclasses set ``name``, their declarations below (config validation reads them), and
    ``run_task`` (``run_batch`` to be task-batched)."""

    name: str = ""
    #: differentiates through the inner loop (needs double backward; refuses activation checkpointing
    #: and FSDP)
    second_order: bool = False
    #: fewest inner steps that define the algorithm
    min_inner_steps: int = 0
    #: meta.learn_inner_lr (α as meta-parameters)
    learned_rates: bool = False
    #: meta.inner_optimizer values
    inner_optimizers: tuple[str, ...] = ("sgd",)
    #: the episode holds K support batches and a query batch (False: one SFT batch)
    episodic: bool = True
    #: the meta-gradient differentiates the query loss (Reptile's does not use it)
    query_gradient: bool = True

    @classmethod
    def batched(cls) -> bool:
        """Has a task-batched form (``run_batch``): ``meta.task_batching`` can apply."""
        return cls.run_batch is not MetaAlgorithm.run_batch

    @classmethod
    def from_config(cls, meta_cfg) -> "MetaAlgorithm":
        return cls()

    def task_weight(self, num_tasks: int) -> float:
        """Weight of one task's contribution: the meta-gradient is the *mean* over the meta-batch."""
        return 1.0 / num_tasks

    def run_task(self, engine: InnerLoop, episode: Episode, weight: float, want_pre: bool) -> TaskMetrics:
        """Add ``weight`` × this task's meta-gradient to ``engine.meta_grad``; return its metrics.

        On return the model's parameters may hold adapted weights; the caller restores θ."""
        raise NotImplementedError

    def run_batch(self, engine: InnerLoop, batch: TaskBatch, weight: float, want_pre: bool) -> list[TaskMetrics]:
        """``run_task`` for the T tasks of ``batch`` in one batched pass (``meta.task_batching``):
        the same contributions, to floating-point rounding. Leaves θ untouched."""
        raise NotImplementedError(f"{self.name} has no task-batched form")

    @staticmethod
    def new_metrics(batch: TaskBatch) -> list[TaskMetrics]:
        return [TaskMetrics(ep.task) for ep in batch.episodes]
