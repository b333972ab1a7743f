"""What an algorithm is: how a pass of tasks adds to the meta-gradient, and what it supports.

Algorithms are thin (STYLE.md): each file says which loss is differentiated, whether the graph
through the inner loop is kept, and how the tasks' contribution is formed, in one ``run`` method for
one task or many. Everything else — storage of the adapted weights, outer optimizer, clipping,
schedule, all-reduce, logging, checkpointing — lives in the engine and the trainer. A new algorithm
is its own file plus one entry in ``ALGORITHMS`` (``metasft/algorithms/__init__.py``); config
validation reads the declarations below.
"""

from __future__ import annotations

from metasft.algorithms.inner_loop import Episode, InnerLoop, TaskBatch, TaskMetrics


class MetaAlgorithm:
    name: str = ""
    #: differentiates through the inner loop (needs double backward; refuses activation checkpointing
    #: and FSDP)
    second_order: bool = False
    #: the episode holds K support batches and a query batch (False: one SFT batch)
    episodic: bool = True
    #: the meta-gradient differentiates the query loss (Reptile's does not use it)
    query_gradient: bool = True
    #: fewest inner steps that define the algorithm
    min_inner_steps: int = 0
    #: meta.learn_inner_lr (α as meta-parameters)
    learned_rates: bool = False
    #: meta.inner_optimizer values
    inner_optimizers: tuple[str, ...] = ("sgd",)
    #: several tasks can adapt in one pass (meta.task_batching)
    batches_tasks: bool = True

    @classmethod
    def batched(cls) -> bool:
        """Has a task-batched form: ``meta.task_batching`` can apply."""
        return cls.batches_tasks

    @classmethod
    def from_config(cls, meta_cfg) -> "MetaAlgorithm":
        return cls()

    def task_weight(self, num_tasks: int) -> float:
        """Weight of one task's contribution: the meta-gradient is the *mean* over the meta-batch."""
        return 1.0 / num_tasks

    def run(self, engine: InnerLoop, tasks: TaskBatch, weight: float, want_pre: bool) -> list[TaskMetrics]:
        """Add ``weight`` × each task's meta-gradient contribution to ``engine.meta_grad``; return
        each task's metrics. θ's inner scope may hold adapted weights on return (the caller restores)."""
        raise NotImplementedError

    def run_task(self, engine: InnerLoop, episode: Episode, weight: float, want_pre: bool) -> TaskMetrics:
        """``run`` for one task, from θ (put back first: a task before may have adapted in place)."""
        engine.restore()
        return self.run(engine, engine.stack([episode]), weight, want_pre)[0]
