"""Tasks: per-task support and query data, tokenised once, and their batch schedules (SPEC §3).

A training config lists tasks explicitly (``meta.tasks``) or points at a directory written by
``metasft prepare`` (``meta.tasks_dir``, read through its ``manifest.json``). Every task is tokenised
once at load; batches are then index lists into the pre-tokenised rows.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metasft.config import DataConfig, MetaConfig, TaskSpec, validate_task_name
from metasft.data.formatting import Example, rows_to_examples
from metasft.data.io import read_rows
from metasft.data.tokenize import Encoded, encode_examples
from metasft.errors import ConfigError, DataError, MetasftError

MANIFEST = "manifest.json"


@dataclass
class Task:
    """One task of the meta-distribution: support rows adapt, query rows score the adaptation."""

    name: str
    support: list[Encoded]
    query: list[Encoded]
    held_out: bool = False
    validation: bool = False  # held out, and used for choices and curves rather than final scores
    support_examples: list[Example] = field(default_factory=list, repr=False)
    query_examples: list[Example] = field(default_factory=list, repr=False)


def resolve_task_specs(meta: MetaConfig) -> list[TaskSpec]:
    """The task list of a config: ``meta.tasks`` as given, or read from ``meta.tasks_dir``'s manifest."""
    if meta.tasks:
        return list(meta.tasks)
    if not meta.tasks_dir:
        raise ConfigError("meta.tasks: no tasks; list meta.tasks or set meta.tasks_dir to a `metasft prepare` output")
    return read_manifest_specs(meta.tasks_dir)


def read_manifest_specs(tasks_dir: str | Path) -> list[TaskSpec]:
    root = Path(tasks_dir)
    path = root / MANIFEST
    if not path.is_file():
        raise ConfigError(f"meta.tasks_dir: {path} not found (write it with `metasft prepare`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        entries = manifest["tasks"]
        specs = []
        for name, entry in entries.items():
            validate_task_name(name, f"{path}: task")
            specs.append(TaskSpec(
                name=name,
                support_files=[str(root / entry["support_file"])],
                query_files=[str(root / entry["query_file"])],
                held_out=bool(entry.get("held_out", False)),
                validation=entry.get("split") == "validation",
            ))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: not a valid metasft manifest ({type(exc).__name__}: {exc})") from exc
    if not specs:
        raise DataError(f"{path}: manifest lists no tasks")
    return specs


def load_examples(files: list[str], data: DataConfig, where: str) -> list[Example]:
    examples: list[Example] = []
    for file in files:
        rows = read_rows(file)
        found, _ = rows_to_examples(rows, f"{where} {file}".strip(), data.prompt_key, data.response_key, data.messages_key)
        examples.extend(found)
    return examples


def encode_file(path: str, data: DataConfig, tokenizer) -> tuple[list[Example], list[Encoded]]:
    """A data file's examples and their encodings under ``data`` (for `adapt` and `eval`)."""
    examples = load_examples([path], data, "")
    return examples, encode_examples(examples, tokenizer, data.max_length, data.truncation, data.chat_template)


def load_task(spec: TaskSpec, data: DataConfig, tokenizer) -> Task:
    """Read and tokenise one task; an empty support or query set is an error naming the task."""
    sets = {}
    for split, files in (("support", spec.support_files), ("query", spec.query_files)):
        examples = load_examples(files, data, f"task {spec.name!r} {split}:")
        if not examples:
            raise DataError(f"task {spec.name!r}: {split} set is empty")
        encoded = encode_examples(examples, tokenizer, data.max_length, data.truncation, data.chat_template)
        sets[split] = (examples, encoded)
    return Task(
        name=spec.name,
        support=sets["support"][1],
        query=sets["query"][1],
        held_out=spec.held_out or spec.validation,
        validation=spec.validation,
        support_examples=sets["support"][0],
        query_examples=sets["query"][0],
    )


def load_tasks(meta: MetaConfig, data: DataConfig, tokenizer) -> list[Task]:
    return [load_task(spec, data, tokenizer) for spec in resolve_task_specs(meta)]


def stable_seed(*parts: object) -> int:
    """A seed derived from strings/ints that is the same in every process and Python run
    (``hash()`` of a string is salted per process, so it cannot be used)."""
    return zlib.crc32("\x1f".join(map(str, parts)).encode("utf-8"))


class BatchSchedule:
    """Which rows of one (task, split) each successive batch uses.

    Batches are drawn without replacement from a shuffle of the rows; when fewer than a batch
    remain, a fresh shuffle starts (the leftover rows wait for the next pass, like ``drop_last``).
    When the batch size is at least the number of rows, every batch is the whole set, in order.
    The shuffle of pass ``e`` is a pure function of (seed, task, split, e), so the state to resume
    exactly is just two integers.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, task: str, split: str):
        if num_rows < 1:
            raise MetasftError(f"task {task!r}: {split} set is empty")
        self.num_rows, self.batch_size = num_rows, batch_size
        self.seed, self.task, self.split = seed, task, split
        self.epoch, self.cursor = 0, 0
        self._order: np.ndarray | None = None

    @property
    def whole_set(self) -> bool:
        return self.batch_size >= self.num_rows

    def _permutation(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.default_rng([stable_seed(self.seed, self.task, self.split), self.epoch])
            self._order = rng.permutation(self.num_rows)
        return self._order

    def next_indices(self) -> list[int]:
        if self.whole_set:
            return list(range(self.num_rows))
        if self.cursor + self.batch_size > self.num_rows:
            self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        order = self._permutation()
        indices = order[self.cursor:self.cursor + self.batch_size].tolist()
        self.cursor += self.batch_size
        return indices

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor, self._order = int(state["epoch"]), int(state["cursor"]), None
