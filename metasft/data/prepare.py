"""``metasft prepare``: raw task files → per-task support/query parquet + manifest (SPEC §2.1).

    metasft prepare --config task_config.json --output-dir data/maml --balance \
        --support-size 500 --query-size 1000 --seed 42

For each task: read rows, drop null/blank rows and exact duplicates (after whitespace
normalisation; counted), shuffle deterministically by (seed, task), cap at ``max_samples``
(and, with ``--balance``, at the smallest task's size), then split into disjoint support and query
sets. Outputs are written to a staging directory and moved into place only when every task
succeeded, and the manifest is written last, so a failure never leaves a half-prepared directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from metasft.config import validate_task_name
from metasft.data.formatting import Example, rows_to_examples
from metasft.data.io import read_rows, write_json_atomic, write_parquet_atomic
from metasft.data.tasks import MANIFEST, stable_seed
from metasft.errors import ConfigError, DataError, MetasftError

TASK_KEYS = {"input_file", "support_ratio", "max_samples", "prompt_key", "response_key", "messages_key", "split"}
MANIFEST_VERSION = 1


@dataclass
class TaskEntry:
    name: str
    input_files: list[Path]
    support_ratio: float = 0.5
    max_samples: int | None = None
    prompt_key: str = "prompt"
    response_key: str = "response"
    messages_key: str = "messages"
    held_out: bool = False
    validation: bool = False  # held out, for choices (bench's adaptation lr), never for final scores


@dataclass
class TaskReport:
    name: str
    split: str
    read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    support: int = 0
    query: int = 0
    warnings: list[str] = field(default_factory=list)


def read_task_config(path: str | os.PathLike) -> list[TaskEntry]:
    """Parse the task config (JSON or YAML): ``{task name: {input_file, support_ratio, ...}}``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: task config not found")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("tasks"), dict):
        data = data["tasks"]
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: expected a mapping of task name -> {{input_file, support_ratio, ...}}")
    return [_task_entry(name, entry, path) for name, entry in data.items()]


def _task_entry(name: Any, entry: Any, path: Path) -> TaskEntry:
    where = f"{path}: task {name!r}"
    if not isinstance(name, str):
        raise ConfigError(f"{where}: task names must be strings")
    validate_task_name(name, where)
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping with input_file, got {type(entry).__name__}")
    unknown = sorted(set(entry) - TASK_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(TASK_KEYS))})")
    if "input_file" not in entry:
        raise ConfigError(f"{where}: missing key 'input_file'")
    files = entry["input_file"] if isinstance(entry["input_file"], list) else [entry["input_file"]]
    if not files or not all(isinstance(f, str) and f for f in files):
        raise ConfigError(f"{where}: input_file must be a path or a list of paths")
    ratio = entry.get("support_ratio", 0.5)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ConfigError(f"{where}: support_ratio={ratio!r} must be a number strictly between 0 and 1")
    max_samples = entry.get("max_samples")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 2):
        raise ConfigError(f"{where}: max_samples={max_samples!r} must be an integer >= 2 or null")
    split = entry.get("split", "train")
    if split not in ("train", "validation", "test"):
        raise ConfigError(f"{where}: split={split!r} must be 'train', 'validation' or 'test' (both held out)")
    keys = {}
    for key in ("prompt_key", "response_key", "messages_key"):
        value = entry.get(key, TaskEntry.__dataclass_fields__[key].default)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {key} must be a non-empty string")
        keys[key] = value
    return TaskEntry(
        name=name,
        input_files=[_resolve(f, path) for f in files],
        support_ratio=float(ratio),
        max_samples=max_samples,
        held_out=split != "train",
        validation=split == "validation",
        **keys,
    )


def _resolve(file: str, config_path: Path) -> Path:
    """Relative input paths are taken from the working directory, else from the config's directory."""
    candidate = Path(file).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    beside = config_path.parent / candidate
    return beside if beside.exists() else candidate


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _collect(entry: TaskEntry, seed: int) -> tuple[list[Example], TaskReport]:
    report = TaskReport(entry.name, "validation" if entry.validation else "test" if entry.held_out else "train")
    examples: list[Example] = []
    for file in entry.input_files:
        rows = read_rows(file)
        report.read += len(rows)
        found, empty = rows_to_examples(rows, f"task {entry.name!r}: {file}", entry.prompt_key,
                                        entry.response_key, entry.messages_key, drop_empty=True)
        if empty:
            report.dropped["null or empty"] = report.dropped.get("null or empty", 0) + empty
        examples.extend(found)
    unique: dict[tuple, Example] = {}
    for example in examples:
        unique.setdefault(example.dedup_key(), example)
    if len(unique) < len(examples):
        report.dropped["duplicate"] = len(examples) - len(unique)
    ordered = list(unique.values())
    order = np.random.default_rng(stable_seed(seed, entry.name, "prepare")).permutation(len(ordered))
    shuffled = [ordered[i] for i in order]
    if entry.max_samples is not None and len(shuffled) > entry.max_samples:
        report.dropped["max_samples"] = len(shuffled) - entry.max_samples
        shuffled = shuffled[: entry.max_samples]
    return shuffled, report


def _split_sizes(n: int, ratio: float, support_size: int | None, query_size: int | None) -> tuple[int, int]:
    if support_size is not None:
        n_support = support_size
    elif query_size is not None:
        n_support = n - query_size
    else:
        n_support = int(round(n * ratio))
    n_support = max(0, min(n_support, n))
    n_query = n - n_support if query_size is None else min(query_size, n - n_support)
    return n_support, n_query


def prepare(
    task_config: str | os.PathLike,
    output_dir: str | os.PathLike,
    seed: int = 42,
    balance: bool = False,
    support_size: int | None = None,
    query_size: int | None = None,
) -> tuple[dict[str, Any], list[TaskReport]]:
    """Prepare every task of ``task_config`` into ``output_dir``; returns (manifest, reports)."""
    for flag, value in (("--support-size", support_size), ("--query-size", query_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: {value} must be >= 1")
    entries = read_task_config(task_config)
    collected = [_collect(entry, seed) for entry in entries]
    if balance:
        cap = min(len(examples) for examples, _ in collected)
        for i, (examples, report) in enumerate(collected):
            if len(examples) > cap:
                report.dropped["balance"] = len(examples) - cap
                collected[i] = (examples[:cap], report)

    prepared: list[PreparedTask] = []
    reports = []
    for entry, (examples, report) in zip(entries, collected):
        n_support, n_query = _split_sizes(len(examples), entry.support_ratio, support_size, query_size)
        if n_support == 0 or n_query == 0:
            raise DataError(
                f"task {entry.name!r}: {len(examples)} usable rows cannot make a non-empty support and query "
                f"set (support {n_support}, query {n_query})"
            )
        if support_size is not None and n_support < support_size:
            report.warnings.append(f"support has {n_support} rows, fewer than --support-size {support_size}")
        if query_size is not None and n_query < query_size:
            report.warnings.append(f"query has {n_query} rows, fewer than --query-size {query_size}")
        unused = len(examples) - n_support - n_query
        if unused:
            report.dropped["beyond requested sizes"] = unused
        report.support, report.query = n_support, n_query
        prepared.append(PreparedTask(
            name=entry.name, support=examples[:n_support], query=examples[n_support:n_support + n_query],
            held_out=entry.held_out, validation=entry.validation,
            info={"rows_read": report.read, "dropped": dict(report.dropped),
                  "sources": [{"path": str(f), "sha256": file_sha256(f)} for f in entry.input_files]}))
        reports.append(report)
    options = {"balance": balance, "support_size": support_size, "query_size": query_size,
               "task_config": str(task_config)}
    manifest = write_prepared(output_dir, prepared, seed=seed, options=options)
    return manifest, reports


@dataclass
class PreparedTask:
    """A task's final support and query examples, ready to be written."""

    name: str
    support: list[Example]
    query: list[Example]
    held_out: bool = False
    validation: bool = False  # held out, for choices only (implies held_out)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def split(self) -> str:
        return "validation" if self.validation else "test" if self.held_out else "train"


def write_prepared(output_dir: str | os.PathLike, tasks: list[PreparedTask], seed: int,
                   options: dict[str, Any]) -> dict[str, Any]:
    """Write ``<output_dir>/<task>/{support,query}.parquet`` and ``manifest.json`` (the layout that
    ``meta.tasks_dir`` reads). Files go to a staging directory first and are moved into place
    only when every task is written; the manifest comes last."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=output_dir))
    except OSError as exc:
        raise MetasftError(f"--output-dir {output_dir}: cannot write there ({exc.strerror})") from exc
    manifest_tasks: dict[str, Any] = {}
    try:
        for task in tasks:
            validate_task_name(task.name, "task")
            write_parquet_atomic([_out_row(e) for e in task.support], staging / task.name / "support.parquet")
            write_parquet_atomic([_out_row(e) for e in task.query], staging / task.name / "query.parquet")
            manifest_tasks[task.name] = {
                "support_file": f"{task.name}/support.parquet",
                "query_file": f"{task.name}/query.parquet",
                "held_out": task.held_out or task.validation,
                "split": task.split,
                "format": "messages" if task.support[0].is_multi_turn else "prompt_response",
                "support_rows": len(task.support),
                "query_rows": len(task.query),
                **task.info,
            }
        manifest = {
            "metasft_manifest_version": MANIFEST_VERSION,
            "seed": seed,
            "options": options,
            "train_tasks": [t.name for t in tasks if not t.held_out],
            "held_out_tasks": [t.name for t in tasks if t.split == "test"],
            "validation_tasks": [t.name for t in tasks if t.split == "validation"],
            "tasks": manifest_tasks,
        }
        for name in manifest_tasks:
            target = output_dir / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / name, target)
        write_json_atomic(manifest, output_dir / MANIFEST)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _out_row(example: Example) -> dict[str, Any]:
    """Prepared rows use the standard column names (``prompt``/``response`` or ``messages``) and
    keep where they came from."""
    row = example.to_row()
    row["source"] = example.source
    return row
