"""The one loss used everywhere (SPEC §2.3): a token mean over the whole batch.

``loss = sum over target tokens of -log p(token) / number of target tokens``, where the count is
that of the *whole* batch (or of a larger global batch when ``num_targets`` is given), so the value
does not depend on how a batch is split into micro-batches or across ranks (torchtitan normalises
by a global token count in the same way).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from metasft.data.collate import IGNORE_INDEX


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose logits predict a target (``labels[..., t + 1]`` set) in any row, 1-D.

    Computing logits only there, not at every position, is what makes a large vocabulary cheap: an
    SFT row is mostly prompt, and a 49,152-word head over every prompt token dominated the memory
    and a third of the time of a SmolLM2 meta-step. Works on stacked ``[T, rows, length]`` labels too."""
    return (labels[..., 1:] != IGNORE_INDEX).flatten(0, -2).any(0).nonzero().squeeze(1)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor,
                   positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token negative log-likelihoods over target positions, and their count.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``; positions labelled ``IGNORE_INDEX`` are skipped.
    With ``positions``, ``logits[:, i]`` are those of position ``positions[i]`` only
    (:func:`forward_logits` with the same positions). Computed in float32 for half-precision logits
    (float64 logits stay float64, for exact tests).
    """
    if positions is None:
        shift_logits, shift_labels = logits[:, :-1, :], labels[:, 1:]
    else:
        shift_logits, shift_labels = logits, labels[:, positions + 1]
    if shift_logits.dtype in (torch.float16, torch.bfloat16):
        shift_logits = shift_logits.float()
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    count = (shift_labels != IGNORE_INDEX).sum()
    return total, count


_ACCEPTS_LOGITS_TO_KEEP: dict[type, bool] = {}


def accepts_logits_to_keep(model) -> bool:
    """Whether ``model``'s forward takes ``logits_to_keep`` (transformers' causal LMs do; a peft
    wrapper passes it through to its base model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = type(base)
    if kind not in _ACCEPTS_LOGITS_TO_KEEP:
        try:
            _ACCEPTS_LOGITS_TO_KEEP[kind] = "logits_to_keep" in inspect.signature(base.forward).parameters
        except (TypeError, ValueError):
            _ACCEPTS_LOGITS_TO_KEEP[kind] = False
    return _ACCEPTS_LOGITS_TO_KEEP[kind]


def forward_logits(model, batch: dict[str, torch.Tensor], positions: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of ``model`` on ``batch``, at every position or only at ``positions`` (1-D).

    A batch
    without ``attention_mask``/``position_ids`` (the task-batched path's stacked batches) is plain
    causal attention from position 0, which gives right-padded rows exactly the logits the mask
    would at every non-padding position."""
    extra = {} if positions is None else {"logits_to_keep": positions}
    # A batch carrying ``inputs_embeds`` holds the hidden states entering the first layer still to run
    # (metasft.scope.LayerWindow: the layers below were computed once and are skipped).
    if "inputs_embeds" in batch:
        extra["inputs_embeds"] = batch["inputs_embeds"]
    else:
        extra["input_ids"] = batch["input_ids"]
    return model(
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
        **extra,
    ).logits


def target_logits(model, batch: dict[str, torch.Tensor]):
    """``(logits, labels, positions)`` for :func:`token_loss_sum`: logits at the target positions
    only when the model allows it (``positions`` then says which), else at every position."""
    positions = target_positions(batch["labels"]) if accepts_logits_to_keep(model) else None
    return forward_logits(model, batch, positions), batch["labels"], positions


def lm_loss(model, batch: dict[str, torch.Tensor], num_targets: int | torch.Tensor | None = None,
            positions: torch.Tensor | None = None, module=None) -> torch.Tensor:
    """Token-mean loss of ``model`` on ``batch``; divide by ``num_targets`` when given (global count).

    Logits are computed only at the target positions when the model accepts ``logits_to_keep``:
    ``positions`` when given (under vmap, where they cannot be computed from a task's labels), else
    those of ``batch``. ``module``: the ``nn.Module`` behind a functional ``model``."""
    if not accepts_logits_to_keep(module if module is not None else model):
        positions = None
    elif positions is None:
        positions = target_positions(batch["labels"])
    total, count = token_loss_sum(forward_logits(model, batch, positions), batch["labels"], positions)
    if num_targets is None:
        num_targets = batch.get("global_num_targets")  # set when a batch is split across ranks
    denominator = count if num_targets is None else torch.as_tensor(num_targets, device=total.device)
    return total / denominator.clamp(min=1)
