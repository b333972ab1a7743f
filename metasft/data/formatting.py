"""Turn raw rows into examples: single-turn (prompt/response) or multi-turn (messages).

Column names are configurable as in verl (``data.prompt_key`` / ``data.response_key``); a dotted key
such as ``extra_info.question`` reaches into a nested dict column (verl's ``prompt_dict_keys``).
A file is multi-turn when it has the messages column and not the prompt column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from metasft.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Example:
    """One training example. Exactly one of (prompt, response) or messages is set.

    ``source`` says where the row came from ("file row N") so errors can point at it."""

    prompt: str | None = None
    response: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # ((role, content), ...)
    source: str = ""

    @property
    def is_multi_turn(self) -> bool:
        return self.messages is not None

    def messages_as_dicts(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages or ()]

    def dedup_key(self) -> tuple:
        """Identity used for duplicate detection and support/query disjointness:
        the example's texts with whitespace runs collapsed."""
        if self.messages is not None:
            return tuple((role, _normalise(content)) for role, content in self.messages)
        return (_normalise(self.prompt or ""), _normalise(self.response or ""))

    def to_row(self) -> dict[str, Any]:
        if self.messages is not None:
            return {"messages": self.messages_as_dicts()}
        return {"prompt": self.prompt, "response": self.response}


def _normalise(text: str) -> str:
    return " ".join(text.split())


class _Missing:
    pass


_MISSING = _Missing()


def get_field(row: dict[str, Any], key: str) -> Any:
    """``row[key]``, where a dotted key walks into nested dicts; returns a sentinel when absent."""
    if key in row:
        return row[key]
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def is_multi_turn_file(rows: list[dict[str, Any]], prompt_key: str, messages_key: str) -> bool:
    first = rows[0]
    return get_field(first, prompt_key) is _MISSING and get_field(first, messages_key) is not _MISSING


def rows_to_examples(
    rows: list[dict[str, Any]],
    source: str,
    prompt_key: str = "prompt",
    response_key: str = "response",
    messages_key: str = "messages",
    drop_empty: bool = False,
) -> tuple[list[Example], int]:
    """Convert rows to examples, validating columns and types.

    Returns ``(examples, n_empty_dropped)``. With ``drop_empty`` a row whose text field is null or
    blank is dropped and counted (what `prepare` does, reporting it); otherwise it is an error that
    names the file, row and column. A missing or non-string column is always an error.
    """
    if not rows:
        raise DataError(f"{source}: no rows")
    multi = is_multi_turn_file(rows, prompt_key, messages_key)
    if not multi:
        for key in (prompt_key, response_key):
            if get_field(rows[0], key) is _MISSING:
                columns = ", ".join(sorted(rows[0])) or "none"
                raise DataError(
                    f"{source}: missing column '{key}' (columns: {columns}); set data.prompt_key/"
                    f"data.response_key, or give a '{messages_key}' column for multi-turn rows"
                )
    examples: list[Example] = []
    dropped = 0
    for index, row in enumerate(rows):
        where = f"{source} row {index}"
        if multi:
            example = _messages_example(get_field(row, messages_key), messages_key, where, drop_empty)
        else:
            example = _single_turn_example(row, prompt_key, response_key, where, drop_empty)
        if example is None:
            dropped += 1
        else:
            examples.append(example)
    return examples, dropped


def _single_turn_example(row, prompt_key, response_key, where, drop_empty) -> Example | None:
    texts = []
    for key in (prompt_key, response_key):
        value = get_field(row, key)
        if value is _MISSING:
            raise DataError(f"{where}: missing column '{key}'")
        if value is None or (isinstance(value, str) and not value.strip()):
            if drop_empty:
                return None
            raise DataError(f"{where}: column '{key}' is {'null' if value is None else 'empty'}")
        if not isinstance(value, str):
            raise DataError(f"{where}: column '{key}' is {type(value).__name__}, expected a string")
        texts.append(value)
    return Example(prompt=texts[0], response=texts[1], source=where)


def _messages_example(value, messages_key, where, drop_empty) -> Example | None:
    if value is None:
        if drop_empty:
            return None
        raise DataError(f"{where}: column '{messages_key}' is null")
    if hasattr(value, "tolist"):  # numpy arrays from some parquet writers
        value = value.tolist()
    if not isinstance(value, list) or not value:
        if drop_empty and isinstance(value, list):
            return None
        raise DataError(f"{where}: column '{messages_key}' must be a non-empty list of {{role, content}}")
    turns = []
    for turn_index, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: {messages_key}[{turn_index}] must be a dict with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{where}: {messages_key}[{turn_index}] has unknown role {role!r} (use {', '.join(ROLES)})")
        if content is None:
            if drop_empty:
                return None
            raise DataError(f"{where}: {messages_key}[{turn_index}].content is null")
        if not isinstance(content, str):
            raise DataError(
                f"{where}: {messages_key}[{turn_index}].content is {type(content).__name__}, expected a string"
            )
        turns.append((role, content))
    if not any(role == "assistant" for role, _ in turns):
        if drop_empty:
            return None
        raise DataError(f"{where}: conversation has no assistant turn to train on")
    return Example(messages=tuple(turns), source=where)
