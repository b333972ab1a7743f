"""Read task files (parquet / jsonl / json / csv) into rows, and write parquet atomically.

Every failure is a :class:`~metasft.errors.DataError` whose one line names the file (and the row or
line where there is one), so the CLI can report it without a traceback.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from metasft.errors import DataError

SUPPORTED_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Return the rows of a task file as a list of dicts (column name → value)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a .parquet/.jsonl/.json/.csv file")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{suffix}' (use {', '.join(SUPPORTED_SUFFIXES)})")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    reader = {".parquet": _read_parquet, ".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}
    rows = reader[suffix](path)
    if not rows:
        raise DataError(f"{path}: file has no rows")
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({_first_line(exc)})") from exc
    return table.to_pylist()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with _open_text(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {line_no}: invalid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {line_no}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    with _open_text(path) as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from exc
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} is a common wrapper
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {index}: expected a JSON object, got {type(row).__name__}")
    return data


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with _open_text(path, newline="") as handle:
        try:
            return list(csv.DictReader(handle))
        except csv.Error as exc:
            raise DataError(f"{path}: invalid CSV ({exc})") from exc


def _open_text(path: Path, newline: str | None = None):
    try:
        handle = open(path, encoding="utf-8", newline=newline)
        handle.read(1)
        handle.seek(0)
        return handle
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _temporary_beside(path: Path) -> tuple[int, str]:
    """A temporary file in ``path``'s folder (so the final rename is atomic), with the permissions a
    plain ``open`` would give (``mkstemp`` makes it private: 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def temporary_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new folder in ``parent`` to fill and then rename into place, with the permissions a plain
    ``mkdir`` would give (``mkdtemp`` makes it private: 0700, and a checkpoint keeps them)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~_umask())
    return path


def write_parquet_atomic(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write rows to ``path`` via a temporary file in the same directory and an atomic rename,
    so a crash never leaves a half-written parquet behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    fd, tmp = _temporary_beside(path)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, indent=2, sort_keys=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
