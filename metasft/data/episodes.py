"""Sampling meta-batches and building each task's episode (support batches + query batch).

The tasks of meta-step ``s`` are a pure function of (seed, s): ``meta_batch_size`` distinct tasks
drawn without replacement. Every rank advances every sampled task's batch schedule (index lists
only, cheap) but collates only the episodes of its own tasks, so the data a task sees does not
depend on the number of ranks, and the schedule state saved by rank 0 is the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from metasft.data.collate import collate_for_rank
from metasft.data.tasks import BatchSchedule, Task, stable_seed
from metasft.errors import ConfigError


Batch = dict[str, torch.Tensor]


@dataclass
class Episode:
    """One task's data for one meta-step: the support batches of the K inner steps and the query
    batch (or, for the SFT baseline, one training batch in ``support_batches[0]``)."""

    task: str
    support_batches: list[Batch]
    query_batch: Batch | None = None
    num_targets: int | None = None  # global token count to normalise by (SFT baseline)


class EpisodeSampler:
    def __init__(self, tasks: list[Task], *, episodic: bool, meta_batch_size: int, inner_batch_size: int,
                 query_batch_size: int, num_inner_steps: int, seed: int, pad_token_id: int,
                 device: torch.device | str = "cpu", row_shard: tuple[int, int] = (0, 1)):
        if not tasks:
            raise ConfigError("meta.tasks: no meta-training tasks (every task is held out)")
        if meta_batch_size > len(tasks):
            raise ConfigError(
                f"meta.meta_batch_size: {meta_batch_size} is larger than the {len(tasks)} meta-training tasks"
            )
        self.tasks, self.episodic = tasks, episodic
        self.meta_batch_size, self.num_inner_steps = meta_batch_size, num_inner_steps
        self.seed, self.pad_token_id, self.device = seed, pad_token_id, torch.device(device)
        self.row_shard = row_shard  # (rank, world) when every rank takes a share of each batch (FSDP)
        if episodic:
            self.support = [BatchSchedule(len(t.support), inner_batch_size, seed, t.name, "support") for t in tasks]
            self.query = [BatchSchedule(len(t.query), query_batch_size, seed, t.name, "query") for t in tasks]
        else:
            # The SFT baseline trains on all of a task's data: support and query pooled.
            self.pooled = [t.support + t.query for t in tasks]
            self.support = [BatchSchedule(len(p), inner_batch_size, seed, t.name, "pooled")
                            for t, p in zip(tasks, self.pooled)]
            self.query = []

    def sample_tasks(self, step: int) -> list[int]:
        rng = np.random.default_rng([stable_seed(self.seed, "meta-batch"), step])
        return sorted(rng.choice(len(self.tasks), size=self.meta_batch_size, replace=False).tolist())

    def _batch(self, rows) -> dict[str, torch.Tensor]:
        rank, world = self.row_shard
        return collate_for_rank(rows, self.pad_token_id, rank, world, self.device)

    def episodes(self, step: int, mine=lambda task_ids: task_ids) -> tuple[list[Episode], int]:
        """Episodes of meta-step ``step`` for this rank's share (``mine`` picks it from the sampled
        task ids); returns them with the number of tasks in the whole meta-batch."""
        task_ids = self.sample_tasks(step)
        indices = {}
        for t in task_ids:  # advance every sampled schedule on every rank
            if self.episodic:
                support = [self.support[t].next_indices() for _ in range(self.num_inner_steps)]
                indices[t] = (support, self.query[t].next_indices())
            else:
                indices[t] = ([self.support[t].next_indices()], None)
        episodes = []
        if not self.episodic:
            # The token-mean denominator of the whole meta-batch, known to every rank without a collective.
            total_targets = sum(self.pooled[t][i].num_targets for t in task_ids for i in indices[t][0][0])
        for t in mine(task_ids):
            support_idx, query_idx = indices[t]
            task = self.tasks[t]
            if self.episodic:
                episodes.append(Episode(
                    task=task.name,
                    support_batches=[self._batch([task.support[i] for i in idx]) for idx in support_idx],
                    query_batch=self._batch([task.query[i] for i in query_idx]),
                ))
            else:
                episodes.append(Episode(task=task.name, support_batches=[self._batch([self.pooled[t][i] for i in support_idx[0]])],
                                        num_targets=total_targets))
        return episodes, len(task_ids)

    def state_dict(self) -> dict:
        return {"support": [s.state_dict() for s in self.support], "query": [s.state_dict() for s in self.query]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["support"]) != len(self.support) or len(state["query"]) != len(self.query):
            raise ConfigError("trainer.resume_mode: the checkpoint was made with a different task list")
        for schedule, s in zip(self.support, state["support"]):
            schedule.load_state_dict(s)
        for schedule, s in zip(self.query, state["query"]):
            schedule.load_state_dict(s)

