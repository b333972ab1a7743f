"""In-context few-shot rows: a task's demonstrations rendered before one example, in the data's own
format, with the loss on that example's response only (or on every response, for MetaICL training).

- **Chat data** (the tokenizer's chat template is used): the demonstrations become earlier user /
  assistant turns of one conversation, and the example its last turn(s). With Example rows that
  carry ``messages``, a demonstration contributes all of its turns.
- **Raw text**: each demonstration's own encoding (prompt + response + EOS) is concatenated before
  the example's, token by token, exactly as each row alone is encoded.

When the demonstrations do not all fit ``max_length``, the ones farthest from the example are
dropped until the row fits, and :func:`render_in_context` says how many were kept; the example
itself is never cut for them (it is truncated, or refused, exactly as it would be alone).

Used by ``metasft bench`` (``adaptations: [in_context]``) and by the ``metaicl`` algorithm.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from metasft.data.formatting import Example
from metasft.data.tokenize import Encoded, _encode_messages, _finish, encode_examples, uses_chat_template


def _turns(example: Example) -> tuple[tuple[str, str], ...]:
    if example.messages is not None:
        return tuple(example.messages)
    return (("user", example.prompt or ""), ("assistant", example.response or ""))


def _chat(demos: Sequence[Example], example: Example, tokenizer, loss_on_demos: bool) -> tuple[list[int], list[int]]:
    context = tuple(turn for demo in demos for turn in _turns(demo))
    ids, mask = _encode_messages(Example(messages=context + _turns(example), source=example.source), tokenizer, True)
    if demos and not loss_on_demos:
        # The conversation of the demonstrations alone renders to a prefix of the whole one (the
        # template renders incrementally, which _encode_messages checks), so its length marks
        # where the example's turns start.
        start = len(_encode_messages(Example(messages=context, source=example.source), tokenizer, True)[0])
        mask = [0] * start + mask[start:]
    return ids, mask


def render_in_context(demos: Sequence[Example], example: Example, tokenizer, *, max_length: int,
                      truncation: str = "error", chat_template: str = "auto",
                      loss_on_demos: bool = False) -> tuple[Encoded, int]:
    """``(row, demonstrations used)``: ``demos`` (in order) then ``example`` as one row.

    Targets: the example's response tokens (through EOS / end of turn), as when it is encoded alone;
    with ``loss_on_demos`` also every demonstration's. The demonstrations nearest the example are
    kept when not all fit."""
    alone = encode_examples([example], tokenizer, max_length, truncation, chat_template)[0]
    templated = uses_chat_template(tokenizer, chat_template)
    demos = list(demos)
    if not templated:
        encoded = encode_examples(demos, tokenizer, 10**9, "error", chat_template) if demos else []
        return _join_raw(encoded, alone, max_length, loss_on_demos)

    # Chat: keep the largest number of nearest demonstrations that fit. A row's length only grows with
    # each demonstration added, so the fewest to drop is found by bisection (log2(n) renders), exact
    # even when demonstrations differ widely in length.
    if not demos:
        return alone, 0
    limit = max(max_length, len(alone))

    def render(first: int):
        return _chat(demos[first:], example, tokenizer, loss_on_demos)

    first, rendered = 0, render(0)
    if len(rendered[0]) > limit:
        low, high = 0, len(demos)  # dropping `low` does not fit; dropping all (`high`) does
        while high - low > 1:
            middle = (low + high) // 2
            candidate = render(middle)
            if len(candidate[0]) <= limit:
                high, rendered = middle, candidate
            else:
                low = middle
        if high == len(demos):
            return alone, 0
        first = high
    ids, mask = rendered
    mask = list(mask)
    mask[0] = 0
    return Encoded(input_ids=list(ids), target_mask=mask, source=example.source), len(demos) - first


def _join_raw(demos: Sequence[Encoded], alone: Encoded, max_length: int, loss_on_demos: bool) -> tuple[Encoded, int]:
    """Raw text: the encoded demonstrations nearest the example that fit, then the example, token
    by token; ``(row, demonstrations used)``."""
    room = max_length - len(alone)
    kept = 0
    while kept < len(demos) and len(demos[-1 - kept]) <= room:
        room -= len(demos[-1 - kept])
        kept += 1
    if not kept:
        return alone, 0
    ids: list[int] = []
    mask: list[int] = []
    for demo in demos[len(demos) - kept:]:
        ids += demo.input_ids
        mask += demo.target_mask if loss_on_demos else [0] * len(demo)
    row = _finish(ids + alone.input_ids, mask + list(alone.target_mask), alone.source, max_length=10**9,
                  truncation="error")
    return row, kept


def metaicl_tasks(tasks: list, tokenizer, *, demos: int, loss_on_demos: bool, seed: int, max_length: int,
                  truncation: str = "error", chat_template: str = "auto") -> list:
    """Meta-training tasks for ``metaicl``: every example of a task (support and query pooled, as the
    SFT baseline trains on both) becomes one row that follows ``demos`` other examples of the same
    task. The demonstrations of row i are a seeded draw (seed, task, i) made once, so a run resumes
    exactly and every rank builds the same rows."""
    from metasft.data.tasks import Task, stable_seed

    templated = uses_chat_template(tokenizer, chat_template)
    built = []
    for task in tasks:
        pool = list(task.support_examples) + list(task.query_examples)
        encoded = list(task.support) + list(task.query)  # each example encoded alone, as loaded
        rows = []
        for i, example in enumerate(pool):
            others = [j for j in range(len(pool)) if j != i]
            rng = np.random.default_rng([stable_seed(seed, task.name, "metaicl"), i])
            chosen = [others[j] for j in rng.choice(len(others), size=min(demos, len(others)), replace=False)] \
                if others else []
            if templated:
                row, _ = render_in_context([pool[j] for j in chosen], example, tokenizer, max_length=max_length,
                                           truncation=truncation, chat_template=chat_template,
                                           loss_on_demos=loss_on_demos)
            else:  # raw text joins the rows' own encodings: no need to tokenise them again
                row, _ = _join_raw([encoded[j] for j in chosen], encoded[i], max_length, loss_on_demos)
            rows.append(row)
        built.append(Task(name=task.name, support=rows, query=[], held_out=task.held_out, validation=task.validation,
                          support_examples=pool))
    return built
