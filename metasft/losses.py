"""The one loss used everywhere (SPEC §2.3): a token mean over the whole batch.

``loss = sum over target tokens of -log p(token) / number of target tokens``, where the count is
that of the *whole* batch (or of a larger global batch when ``num_targets`` is given), so the value
does not depend on how a batch is split into micro-batches or across ranks (torchtitan normalises
by a global token count in the same way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metasft.data.collate import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token negative log-likelihoods over target positions, and their count.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``; positions labelled ``IGNORE_INDEX`` are skipped.
    Computed in float32 for half-precision logits (float64 logits stay float64, for exact tests).
    """
    shift_logits = logits[:, :-1, :]
    if shift_logits.dtype in (torch.float16, torch.bfloat16):
        shift_logits = shift_logits.float()
    shift_labels = labels[:, 1:]
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    count = (shift_labels != IGNORE_INDEX).sum()
    return total, count


def forward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of ``model`` on ``batch``. A batch without ``attention_mask``/``position_ids`` (the
    task-batched path's stacked batches) is plain causal attention from position 0, which gives
    right-padded rows exactly the logits the mask would at every non-padding position."""
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
    ).logits


def lm_loss(model, batch: dict[str, torch.Tensor], num_targets: int | torch.Tensor | None = None) -> torch.Tensor:
    """Token-mean loss of ``model`` on ``batch``; divide by ``num_targets`` when given (global count)."""
    total, count = token_loss_sum(forward_logits(model, batch), batch["labels"])
    if num_targets is None:
        num_targets = batch.get("global_num_targets")  # set when a batch is split across ranks
    denominator = count if num_targets is None else torch.as_tensor(num_targets, device=total.device)
    return total / denominator.clamp(min=1)
