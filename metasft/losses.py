"""The one loss used everywhere (SPEC §2.3): a token mean over the whole batch.

``loss = sum over target tokens of -log p(token) / number of target tokens``, where the count is
that of the *whole* batch (or of a larger global batch when ``num_targets`` is given), so the value
does not depend on how a batch is split into micro-batches or across ranks (torchtitan normalises
by a global token count in the same way).
"""

from __future__ import annotations

import contextlib
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


def cache_keyword(model) -> str:
    """The forward argument that takes a KV cache: ``cache`` in newer transformers releases,
    ``past_key_values`` before (still accepted there, with a deprecation warning)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def forward_logits(model, batch: dict[str, torch.Tensor], positions: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of ``model`` on ``batch``, at every position or only at ``positions`` (1-D).

    A batch with ``past_key_values`` continues those keys and values (its ``attention_mask`` covers
    them too; see :class:`metasft.evaluate.SharedPrefix`).

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
    if batch.get("past_key_values") is not None:
        extra[cache_keyword(model)] = batch["past_key_values"]
    return model(
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=batch.get("past_key_values") is not None,
        **extra,
    ).logits


def target_logits(model, batch: dict[str, torch.Tensor]):
    """``(logits, labels, positions)`` for :func:`token_loss_sum`: logits at the target positions
    only when the model allows it (``positions`` then says which), else at every position."""
    positions = target_positions(batch["labels"]) if accepts_logits_to_keep(model) else None
    return forward_logits(model, batch, positions), batch["labels"], positions


def output_head(module) -> torch.nn.Module | None:
    """The output projection of a causal LM (through a peft wrapper), or None."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return head if isinstance(head, torch.nn.Module) else None


@contextlib.contextmanager
def _head_rows(head: torch.nn.Module, mask: torch.Tensor):
    """Within: ``head`` is applied to the hidden states at ``mask`` only, ``[rows, length, hidden]``
    → ``[n, hidden]`` (row by row), so its output is ``[n, vocabulary]``."""

    calls = []  # yielded: non-empty once the head has run on the gathered states

    def gather(module, args):
        hidden = args[0]
        if hidden.shape[:2] != mask.shape:
            raise RuntimeError(f"output head called on hidden states of shape {tuple(hidden.shape)}, "
                               f"expected [rows, length] = {tuple(mask.shape)}")
        calls.append(module)
        return (hidden[mask], *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield calls
    finally:
        handle.remove()


def logits_at_targets(model, batch: dict[str, torch.Tensor], module=None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(logits [n, vocabulary], targets [n])`` at the ``n`` target tokens of ``batch``, row by row;
    None when ``model`` (``module``: the ``nn.Module`` behind a functional ``model``) has no output
    head to restrict.

    Only the hidden states that predict a target reach the head. ``logits_to_keep`` keeps the
    positions where *any* row has a target, which in a batch of rows of different lengths is most
    positions of every row: on SmolLM2's 49,152-word head, 20 WordNet rows had ~35 kept positions
    each for ~2 targets, and the head's matmuls were most of an SFT step."""
    head = output_head(module if module is not None else model)
    if head is None:
        return None
    shifted = batch["labels"][:, 1:]
    targets = shifted != IGNORE_INDEX
    predicts = torch.cat([targets, targets.new_zeros((targets.shape[0], 1))], 1)  # the last position predicts nothing
    with _head_rows(head, predicts) as calls:
        logits = forward_logits(model, batch)
    if not calls:  # a model that computes its logits without calling its head module: all positions came back
        logits = logits[predicts]
    return logits, shifted[targets]


def target_loss_sum(model, batch: dict[str, torch.Tensor], positions: torch.Tensor | None = None, module=None,
                    gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_loss_sum` of ``model`` on ``batch``, with logits computed only where needed: at
    the target tokens (:func:`logits_at_targets`) when ``gather`` and the model has an output head;
    else at ``positions`` when given, or at those of ``batch``, when the model accepts
    ``logits_to_keep``. Under vmap (``gather=False``) a task's target tokens cannot be gathered (their
    count is data-dependent) and the caller gives the positions of all tasks. ``module``: the
    ``nn.Module`` behind a functional ``model``."""
    at_targets = logits_at_targets(model, batch, module) if gather else None
    if at_targets is not None:
        logits, targets = at_targets
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return F.cross_entropy(logits, targets, reduction="sum"), targets.new_tensor(targets.numel())
    if not accepts_logits_to_keep(module if module is not None else model):
        positions = None
    elif positions is None:
        positions = target_positions(batch["labels"])
    return token_loss_sum(forward_logits(model, batch, positions), batch["labels"], positions)


def lm_loss(model, batch: dict[str, torch.Tensor], num_targets: int | torch.Tensor | None = None,
            positions: torch.Tensor | None = None, module=None, gather: bool = True) -> torch.Tensor:
    """Token-mean loss of ``model`` on ``batch`` (:func:`target_loss_sum`); divide by ``num_targets``
    when given (global count)."""
    total, count = target_loss_sum(model, batch, positions, module, gather)
    if num_targets is None:
        num_targets = batch.get("global_num_targets")  # set when a batch is split across ranks
    denominator = count if num_targets is None else torch.as_tensor(num_targets, device=total.device)
    return total / denominator.clamp(min=1)
