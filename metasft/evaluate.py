"""Evaluation of a model on a task's rows: the §2.3 loss, token accuracy, and exact match /
ROUGE-L of greedy generations (batched, left-padded, with the KV cache).

    metasft eval --checkpoint runs/fomaml/step_1000 --data data/maml/legal/query.parquet
"""

from __future__ import annotations

import contextlib

import torch

from metasft.data.collate import collate
from metasft.data.formatting import Example
from metasft.data.tokenize import Encoded
from metasft.losses import target_logits, token_loss_sum
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


@torch.no_grad()
def loss_and_token_accuracy(model, rows: list[Encoded], batch_size: int, pad_token_id: int,
                            device: torch.device, autocast_dtype: torch.dtype | None = None,
                            engine=None) -> dict[str, float]:
    """``engine``: an :class:`~metasft.algorithms.InnerLoop` over ``model``; the layers below its inner
    scope then run once per row (its prefix cache), not once per evaluation."""
    total_loss, correct, count = 0.0, 0, 0
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size], pad_token_id).items()}
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
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            input_ids[i, width - len(p):] = torch.tensor(p)
            attention[i, width - len(p):] = 1
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                   pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
        for row in generated[:, width:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id)]
            outputs.append(tokenizer.decode(row, skip_special_tokens=True))
    return outputs


def evaluate_rows(model, tokenizer, rows: list[Encoded], examples: list[Example], *, batch_size: int = 32,
                  max_new_tokens: int | None = None, with_generation: bool = True,
                  device: torch.device | None = None, autocast_dtype: torch.dtype | None = None,
                  engine=None, with_loss: bool = True) -> dict[str, float]:
    """All metrics of one set of rows (without ``with_loss``: the generated ones only); the model is
    put in eval mode and left as it was. ``engine``: see :func:`loss_and_token_accuracy` (generation
    runs every layer)."""
    device = device or next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        result = loss_and_token_accuracy(model, rows, batch_size, pad_id, device, autocast_dtype, engine) \
            if with_loss else {}
        if with_generation:
            if max_new_tokens is None:
                max_new_tokens = max(r.num_targets for r in rows) + 4
            predictions = generate(model, tokenizer, [_prompt_ids(r) for r in rows], max_new_tokens, batch_size, device)
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
