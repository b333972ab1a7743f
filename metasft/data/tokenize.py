"""Tokenise examples into model inputs with exactly-right loss targets (SPEC §2.2).

Single-turn rows follow verl's ``SFTDataset`` for the *inputs*::

    prompt_text  = apply_chat_template([{"role": "user", "content": prompt}],
                                       tokenize=False, add_generation_prompt=True)
    input_ids    = tok(prompt_text, add_special_tokens=False) + tok(response + eos, add_special_tokens=False)

and fixes its *targets*: ``target_mask[t] == 1`` means the loss predicts ``input_ids[t]`` from the
positions before it, and it is 1 exactly on the response tokens including EOS. (verl's loss mask is
shifted by one: it trains the last prompt token and never EOS — verl issue #3562.)

Multi-turn rows (``messages``) are rendered incrementally with the chat template, as verl's
``MultiTurnSFTDataset`` does: every assistant turn's tokens (content and end-of-turn) are targets;
system/user/tool turns and the assistant header added by the generation prompt are context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from metasft.data.formatting import Example
from metasft.errors import DataError

TRUNCATION_MODES = ("error", "left", "right")


@dataclass
class Encoded:
    """A tokenised example (unpadded). ``target_mask[t]`` is 1 where the loss predicts ``input_ids[t]``."""

    input_ids: list[int]
    target_mask: list[int]
    source: str = ""

    @property
    def num_targets(self) -> int:
        return sum(self.target_mask)

    def tensors(self):
        """``(input_ids, labels)`` as tensors, built on first use and kept: batches are assembled
        every inner step, tokenisation and list-to-tensor conversion happen once per row."""
        cached = self.__dict__.get("_tensors")
        if cached is None:
            import torch

            ids = torch.tensor(self.input_ids, dtype=torch.long)
            labels = torch.where(torch.tensor(self.target_mask, dtype=torch.bool), ids, torch.full_like(ids, -100))
            cached = self.__dict__["_tensors"] = (ids, labels)
        return cached

    def __len__(self) -> int:
        return len(self.input_ids)


def uses_chat_template(tokenizer, chat_template: str = "auto") -> bool:
    """``data.chat_template``: ``auto`` uses the tokenizer's template when it has one; ``none`` never."""
    return chat_template != "none" and bool(getattr(tokenizer, "chat_template", None))


def encode_examples(
    examples: Sequence[Example],
    tokenizer,
    max_length: int,
    truncation: str = "error",
    chat_template: str = "auto",
) -> list[Encoded]:
    """Tokenise every example (batched tokenizer calls for the single-turn rows)."""
    if truncation not in TRUNCATION_MODES:
        raise DataError(f"data.truncation: {truncation!r} is not one of {', '.join(TRUNCATION_MODES)}")
    if tokenizer.eos_token is None:
        raise DataError("tokenizer has no eos_token: cannot mark the end of a response")
    templated = uses_chat_template(tokenizer, chat_template)
    results: list[Encoded | None] = [None] * len(examples)

    single = [i for i, ex in enumerate(examples) if not ex.is_multi_turn]
    if single:
        prompts = [_prompt_text(tokenizer, examples[i].prompt, templated) for i in single]
        responses = [examples[i].response + tokenizer.eos_token for i in single]
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
        for i, p_ids, r_ids in zip(single, prompt_ids, response_ids):
            results[i] = _finish(list(p_ids) + list(r_ids), [0] * len(p_ids) + [1] * len(r_ids),
                                 examples[i].source, max_length, truncation)
    for i, ex in enumerate(examples):
        if ex.is_multi_turn:
            ids, mask = _encode_messages(ex, tokenizer, templated)
            results[i] = _finish(ids, mask, ex.source, max_length, truncation)
    return results  # type: ignore[return-value]


def encode_example(example: Example, tokenizer, max_length: int, truncation: str = "error",
                   chat_template: str = "auto") -> Encoded:
    return encode_examples([example], tokenizer, max_length, truncation, chat_template)[0]


def _prompt_text(tokenizer, prompt: str, templated: bool) -> str:
    if not templated:
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode_messages(example: Example, tokenizer, templated: bool) -> tuple[list[int], list[int]]:
    if not templated:
        raise DataError(f"{example.source}: multi-turn rows need a tokenizer with a chat template")
    messages = example.messages_as_dicts()
    eos = tokenizer.eos_token
    # Split the rendered conversation into (text, is_target) segments by rendering growing
    # prefixes; each segment is what one more message (or the assistant header) adds.
    segments: list[tuple[str, bool]] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            with_header = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else _header_only(tokenizer)
            _check_prefix(rendered, with_header, example.source)
            segments.append((with_header[len(rendered):], False))
            rendered = with_header
        full = _render(tokenizer, messages[: i + 1])
        _check_prefix(rendered, full, example.source)
        added = full[len(rendered):]
        if message["role"] == "assistant":
            # Train up to and including the end-of-turn token; what the template puts after it
            # (a newline, say) is formatting between turns, not something the model must emit.
            end = added.rfind(eos) + len(eos) if eos and eos in added else len(added)
            segments.extend([(added[:end], True), (added[end:], False)])
        else:
            segments.append((added, False))
        rendered = full
    ids: list[int] = []
    mask: list[int] = []
    texts = [text for text, _ in segments if text]
    flags = [flag for text, flag in segments if text]
    for seg_ids, flag in zip(tokenizer(texts, add_special_tokens=False)["input_ids"], flags):
        ids.extend(seg_ids)
        mask.extend([int(flag)] * len(seg_ids))
    return ids, mask


def _header_only(tokenizer) -> str:
    # A conversation that opens with an assistant turn: the header is what the generation prompt
    # adds to an empty conversation (render one dummy turn and strip it).
    dummy = [{"role": "user", "content": "x"}]
    base = _render(tokenizer, dummy)
    return _render(tokenizer, dummy, add_generation_prompt=True)[len(base):]


def _check_prefix(prefix: str, text: str, source: str) -> None:
    if not text.startswith(prefix):
        raise DataError(
            f"{source}: the chat template does not render conversations incrementally "
            "(a prefix of the conversation renders differently), so assistant turns cannot be located"
        )


def _finish(ids: list[int], mask: list[int], source: str, max_length: int, truncation: str) -> Encoded:
    if len(ids) > max_length:
        if truncation == "error":
            raise DataError(
                f"{source}: {len(ids)} tokens exceed data.max_length={max_length} "
                "(raise data.max_length or set data.truncation=left|right)"
            )
        if truncation == "left":
            ids, mask = ids[-max_length:], mask[-max_length:]
        else:
            ids, mask = ids[:max_length], mask[:max_length]
    if mask:
        mask[0] = 0  # the first token has no context to be predicted from
    return Encoded(input_ids=ids, target_mask=mask, source=source)
