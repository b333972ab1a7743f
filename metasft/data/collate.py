"""Dynamic padding: a batch is padded to its own longest row, never to ``max_length``.

Rows are right-padded; padding has ``attention_mask == 0`` (never attended to) and label
``IGNORE_INDEX`` (never a target). ``labels[t] = input_ids[t]`` where the loss predicts token t.
"""

from __future__ import annotations

from typing import Sequence

import torch

from metasft.data.tokenize import Encoded

IGNORE_INDEX = -100


def pad_id(tokenizer) -> int:
    """The token a batch is padded with: the tokenizer's pad token, else its EOS (never a target,
    never attended to, so which token it is does not matter)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(batch: Sequence[Encoded], pad_token_id: int, pad_to_length: int | None = None) -> dict[str, torch.Tensor]:
    """Stack encoded rows into ``input_ids``, ``attention_mask``, ``position_ids`` and ``labels``.

    ``pad_to_length`` pads every row to a fixed length instead (used only to measure what dynamic
    padding saves)."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    lengths = [len(row) for row in batch]
    width = max(lengths) if pad_to_length is None else pad_to_length
    # Rows keep their tensors (built once per row, see Encoded.tensors): a batch is two pads.
    ids, labels = zip(*(row.tensors() for row in batch))
    input_ids = _pad(ids, width, pad_token_id)
    labels = _pad(labels, width, IGNORE_INDEX)
    lengths_t = torch.tensor(lengths)
    positions = torch.arange(width).unsqueeze(0)
    attention_mask = (positions < lengths_t.unsqueeze(1)).long()
    # verl's compute_position_id_with_mask: positions count attended tokens, padding stays at 0.
    position_ids = positions * attention_mask
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "labels": labels}


def _pad(rows, width: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : row.numel()] = row
    return out


def num_target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Number of tokens the loss predicts in a collated batch (labels shifted by one)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def collate_for_rank(rows: Sequence[Encoded], pad_token_id: int, rank: int = 0, world_size: int = 1,
                     device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Collate this rank's share of ``rows`` (round robin) for the FSDP strategy, where every rank
    works on the same batch. ``global_num_targets`` carries the whole batch's target count, so each
    rank's loss is its summed token loss over the *global* count and the ranks' losses add up to the
    batch's token mean. A rank left without rows gets a one-token row with no target."""
    local = list(rows[rank::world_size]) if world_size > 1 else list(rows)
    if not local:
        local = [Encoded(input_ids=[pad_token_id], target_mask=[0])]
    batch = collate(local, pad_token_id)
    if world_size > 1:
        batch["global_num_targets"] = torch.tensor(sum(r.num_targets for r in rows))
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
