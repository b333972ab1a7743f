"""Few-shot adaptation of θ to one task, shared by the trainer's held-out evaluation, ``metasft
adapt`` and the benchmark, so every number in metasft comes from one protocol.

By default it adapts the way MAML-style training optimises for: K plain-SGD steps at ``inner_lr``
on support batches of ``inner_batch_size`` drawn by the same batch schedule as training.
"""

from __future__ import annotations

import torch

from metasft.algorithms.inner_loop import InnerLoop
from metasft.data.collate import collate
from metasft.data.tasks import BatchSchedule, Task
from metasft.losses import token_loss_sum, forward_logits


@torch.no_grad()
def dataset_loss(engine: InnerLoop, rows, batch_size: int, pad_token_id: int) -> tuple[float, int]:
    """Token-mean loss over all ``rows`` (batched), at the model's current weights; and the count."""
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(engine.device) for k, v in collate(rows[start:start + batch_size], pad_token_id).items()}
        with engine._context():
            s, n = token_loss_sum(forward_logits(engine.model, batch), batch["labels"])
        total += float(s)
        count += int(n)
    return total / max(count, 1), count


def adapt_and_score(engine: InnerLoop, task: Task, *, num_steps: int, batch_size: int, eval_batch_size: int,
                    seed: int, pad_token_id: int) -> dict[str, float]:
    """Query loss of ``task`` before and after ``num_steps`` inner SGD steps from θ; θ is put back."""
    engine.snapshot()
    try:
        pre, _ = dataset_loss(engine, task.query, eval_batch_size, pad_token_id)
        schedule = BatchSchedule(len(task.support), batch_size, seed, task.name, "adapt")
        batches = []
        for _ in range(num_steps):
            rows = [task.support[i] for i in schedule.next_indices()]
            batches.append({k: v.to(engine.device) for k, v in collate(rows, pad_token_id).items()})
        engine.adapt_in_place(batches)
        post, _ = dataset_loss(engine, task.query, eval_batch_size, pad_token_id)
    finally:
        engine.restore()
    return {"query_loss_pre": pre, "query_loss_post": post}
