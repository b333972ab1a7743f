"""Evaluation of a model on a task's rows: the §2.3 loss, token accuracy, and exact match /
ROUGE-L of greedy generations (batched, left-padded, with the KV cache).

Rows that all begin with the same tokens (in-context rows: one task's demonstrations before each
query) can share them (``evaluate_rows(share_prefix=True)``): the common prefix runs once, its keys
and values are copied to every row of a batch, and only each row's own tokens run after it.

    metasft eval --checkpoint runs/fomaml/step_1000 --data data/maml/legal/query.parquet
"""

from __future__ import annotations

import contextlib
import copy

import torch

from metasft.data.collate import collate, pad_id
from metasft.data.formatting import Example
from metasft.data.tokenize import Encoded
from metasft.losses import accepts_logits_to_keep, cache_keyword, target_logits, token_loss_sum
from metasft.metrics import exact_match, rouge_l


def _reference(example: Example) -> str:
    if example.messages is not None:
        return [content for role, content in example.messages if role == "assistant"][-1]
    return example.response or ""


def _prompt_ids(row: Encoded) -> list[int]:
    """Everything before the last run of target tokens: what the model sees before it answers."""
    mask = row.target_mask
    end = len(mask)
    while end > 0 and not mask[end - 1]:
        end -= 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return row.input_ids[:start] if start > 0 else row.input_ids[:1]


def shared_prefix_length(rows: list[Encoded]) -> int:
    """How many leading tokens every row has in common, stopping before the token whose logits
    predict a row's first target: every row keeps that token, so its loss and its first generated
    token are computed after the prefix."""
    if not rows:
        return 0
    limit = min(len(_prompt_ids(row)) for row in rows) - 1
    for row in rows:
        first_target = next((t for t, m in enumerate(row.target_mask) if m), len(row.input_ids))
        limit = min(limit, first_target - 1)
    first = rows[0].input_ids
    length = 0
    while length < limit and all(row.input_ids[length] == first[length] for row in rows):
        length += 1
    return length


class SharedPrefix:
    """The keys and values of tokens every row starts with, computed once and copied per batch."""

    @torch.no_grad()
    def __init__(self, model, ids: list[int], device: torch.device):
        self.length = len(ids)
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
        self.cache = out.cache if hasattr(out, "cache") else out.past_key_values

    def for_batch(self, rows: int):
        """A copy for ``rows`` rows (a forward appends to the cache it is given)."""
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(rows)
        return cache

    def suffixes(self, rows: list[Encoded]) -> list[Encoded]:
        return [Encoded(input_ids=row.input_ids[self.length:], target_mask=row.target_mask[self.length:],
                        source=row.source) for row in rows]

    def batch(self, rows: list[Encoded], pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
        """``rows`` (whole) collated after the prefix: their own tokens right-padded, attending to
        the prefix, at positions that continue it."""
        batch = collate(self.suffixes(rows), pad_token_id)
        width = batch["input_ids"].shape[1]
        batch["attention_mask"] = torch.cat(
            [torch.ones((len(rows), self.length), dtype=torch.long), batch["attention_mask"]], 1)
        batch["position_ids"] = (self.length + torch.arange(width)).expand(len(rows), width)
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["past_key_values"] = self.for_batch(len(rows))
        return batch


@torch.no_grad()
def loss_and_token_accuracy(model, rows: list[Encoded], batch_size: int, pad_token_id: int,
                            device: torch.device, autocast_dtype: torch.dtype | None = None,
                            engine=None, prefix: SharedPrefix | None = None) -> dict[str, float]:
    """``engine``: an :class:`~metasft.algorithms.InnerLoop` over ``model``; the layers below its inner
    scope then run once per row (its prefix cache), not once per evaluation. ``prefix``: the tokens
    every row starts with, already run (:class:`SharedPrefix`)."""
    total_loss, correct, count = 0.0, 0, 0
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = prefix.batch(chunk, pad_token_id, device) if prefix is not None else \
            {k: v.to(device) for k, v in collate(chunk, pad_token_id).items()}
        with ctx, (engine.prefixed(batch) if engine is not None else contextlib.nullcontext(batch)) as batch:
            logits, labels, positions = target_logits(model, batch)
        loss_sum, n = token_loss_sum(logits, labels, positions)
        labels = labels[:, 1:] if positions is None else labels[:, positions + 1]
        predicted = logits[:, :-1] if positions is None else logits
        mask = labels != -100
        correct += int(((predicted.argmax(-1) == labels) & mask).sum())
        total_loss += float(loss_sum)
        count += int(n)
    return {"query_loss": total_loss / max(count, 1), "token_accuracy": correct / max(count, 1), "target_tokens": count}


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
             device: torch.device) -> list[str]:
    """Greedy continuations of token-id prompts, ``batch_size`` at a time (left padding + KV cache)."""
    outputs: list[str] = []
    pad_token = pad_id(tokenizer)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), pad_token, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            input_ids[i, width - len(p):] = torch.tensor(p)
            attention[i, width - len(p):] = 1
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                   pad_token_id=pad_token, eos_token_id=tokenizer.eos_token_id)
        outputs += _decode(tokenizer, generated[:, width:].tolist())
    return outputs


def _decode(tokenizer, rows: list[list[int]]) -> list[str]:
    """Generated token rows as text, each cut at its first EOS."""
    texts = []
    for row in rows:
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


@torch.no_grad()
def generate_after_prefix(model, tokenizer, prompts: list[list[int]], prefix: SharedPrefix, max_new_tokens: int,
                          batch_size: int, device: torch.device, step_logits: list | None = None) -> list[str]:
    """:func:`generate` for prompts that all begin with ``prefix``'s tokens: a greedy loop that runs
    only each prompt's own tokens, right-padded after the prefix's copied keys and values. Padding is
    never attended to and every row's positions continue its own tokens, so each row gets the tokens
    it would alone (up to rounding). ``step_logits``: given a list, each step's ``[rows, vocabulary]``
    logits are appended to it, batch by batch (for tests)."""
    outputs: list[str] = []
    pad_token = pad_id(tokenizer)
    keyword = cache_keyword(model)
    for start in range(0, len(prompts), batch_size):
        chunk = [p[prefix.length:] for p in prompts[start:start + batch_size]]
        rows, width = len(chunk), max(len(p) for p in chunk)
        lengths = torch.tensor([len(p) for p in chunk], device=device)
        input_ids = torch.full((rows, width), pad_token, dtype=torch.long)
        for i, p in enumerate(chunk):
            input_ids[i, :len(p)] = torch.tensor(p)
        input_ids = input_ids.to(device)
        attention = torch.cat([torch.ones((rows, prefix.length), dtype=torch.long, device=device),
                               (torch.arange(width, device=device) < lengths[:, None]).long()], 1)
        positions = (prefix.length + torch.arange(width, device=device)).expand(rows, width)
        cache = prefix.for_batch(rows)
        tokens, done = [], torch.zeros(rows, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            extra = {keyword: cache}
            if step == 0 and accepts_logits_to_keep(model):
                # Only each row's last prompt token predicts: the head runs there alone.
                keep = torch.unique(lengths - 1)
                extra["logits_to_keep"] = keep
                index = torch.searchsorted(keep, lengths - 1)
            else:
                index = lengths - 1 if step == 0 else torch.full_like(lengths, input_ids.shape[1] - 1)
            logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                           **extra).logits[torch.arange(rows, device=device), index]
            if step_logits is not None:
                step_logits.append(logits.clone())
            chosen = torch.where(done, torch.full_like(lengths, pad_token), logits.argmax(-1))
            tokens.append(chosen)
            done |= chosen == tokenizer.eos_token_id
            if bool(done.all()):
                break
            # The next token goes after the padding in the cache, at the position after the row's last.
            input_ids = chosen[:, None]
            attention = torch.cat([attention, attention.new_ones((rows, 1))], 1)
            positions = (prefix.length + lengths + step)[:, None]
        outputs += _decode(tokenizer, torch.stack(tokens, 1).tolist())
    return outputs


def evaluate_rows(model, tokenizer, rows: list[Encoded], examples: list[Example], *, batch_size: int = 32,
                  max_new_tokens: int | None = None, with_generation: bool = True,
                  device: torch.device | None = None, autocast_dtype: torch.dtype | None = None,
                  engine=None, with_loss: bool = True, share_prefix: bool = False) -> dict[str, float]:
    """All metrics of one set of rows (without ``with_loss``: the generated ones only); the model is
    put in eval mode and left as it was. ``engine``: see :func:`loss_and_token_accuracy` (generation
    runs every layer). ``share_prefix``: run the tokens every row starts with once
    (:func:`shared_prefix_length`), for rows that share a long prefix such as in-context rows
    (ignored with ``engine``, whose cache already holds each row's frozen layers, and with
    ``autocast_dtype``)."""
    device = device or next(model.parameters()).device
    pad_token = pad_id(tokenizer)
    was_training = model.training
    model.eval()
    try:
        # Generation runs without autocast, so a prefix cached under it would not match its dtype.
        shared = shared_prefix_length(rows) if share_prefix and engine is None and autocast_dtype is None else 0
        prefix = SharedPrefix(model, rows[0].input_ids[:shared], device) if shared else None
        result = loss_and_token_accuracy(model, rows, batch_size, pad_token, device, autocast_dtype, engine, prefix) \
            if with_loss else {}
        if with_generation:
            if max_new_tokens is None:
                max_new_tokens = max(r.num_targets for r in rows) + 4
            prompts = [_prompt_ids(r) for r in rows]
            predictions = generate_after_prefix(model, tokenizer, prompts, prefix, max_new_tokens, batch_size, device) \
                if prefix is not None else generate(model, tokenizer, prompts, max_new_tokens, batch_size, device)
            references = [_reference(e) for e in examples]
            result["exact_match"] = sum(map(exact_match, predictions, references)) / len(rows)
            result["rouge_l"] = sum(map(rouge_l, predictions, references)) / len(rows)
            result["predictions"] = predictions
    finally:
        model.train(was_training)
    return result


def eval_command(args) -> dict:
    """``metasft eval``: metrics of a model directory on a data file, as one JSON object."""
    import json
    import sys

    from rich.console import Console
    from rich.progress import Progress

    from metasft.checkpoint import load_pretrained
    from metasft.config import DataConfig
    from metasft.data.tasks import encode_file
    from metasft.data.io import write_json_atomic
    from metasft.distributed import DistEnv
    from metasft.errors import MetasftError
    from metasft.distributed import resolve_device

    if args.batch_size < 1:
        raise MetasftError(f"--batch-size: {args.batch_size} must be >= 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise MetasftError(f"--max-new-tokens: {args.max_new_tokens} must be >= 1")
    model, tokenizer, saved = load_pretrained(args.checkpoint)
    data_cfg = saved.data if saved is not None else DataConfig()
    examples, rows = encode_file(args.data, data_cfg, tokenizer)
    device = resolve_device(args.device, DistEnv())
    model.to(device)
    result: dict = {"checkpoint": str(args.checkpoint), "data": str(args.data), "rows": len(rows)}
    # One progress step per batch of rows: evaluation runs batch by batch.
    chunks = [range(i, min(i + args.batch_size, len(rows))) for i in range(0, len(rows), args.batch_size)]
    parts: list[dict] = []
    with Progress(console=Console(stderr=True), transient=True) as progress:
        bar = progress.add_task("evaluating", total=len(chunks))
        for chunk in chunks:
            parts.append(evaluate_rows(model, tokenizer, [rows[i] for i in chunk], [examples[i] for i in chunk],
                                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                       with_generation=not args.no_generation, device=device))
            progress.advance(bar)
    tokens = sum(p["target_tokens"] for p in parts)
    result["query_loss"] = sum(p["query_loss"] * p["target_tokens"] for p in parts) / max(tokens, 1)
    result["token_accuracy"] = sum(p["token_accuracy"] * p["target_tokens"] for p in parts) / max(tokens, 1)
    result["target_tokens"] = tokens
    if not args.no_generation:
        for metric in ("exact_match", "rouge_l"):
            result[metric] = sum(p[metric] * len(chunk) for p, chunk in zip(parts, chunks)) / len(rows)
        if args.predictions:
            result["predictions"] = [text for p in parts for text in p["predictions"]]
    if args.output:
        write_json_atomic(result, args.output)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return result
