"""Readers for every format, column handling (nested keys, multi-turn) and their errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metasft.data.formatting import rows_to_examples
from metasft.data.io import read_rows, temporary_dir, write_json_atomic, write_parquet_atomic
from metasft.errors import DataError

ROWS = [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]


def write(tmp_path, suffix, rows=ROWS):
    path = tmp_path / f"data{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        path.write_text("prompt,response\n" + "".join(f"{r['prompt']},{r['response']}\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".json", ".csv"])
def test_every_format_reads_the_same_rows(tmp_path, suffix):
    assert read_rows(write(tmp_path, suffix)) == ROWS


@pytest.mark.parametrize("content,message", [
    (None, "file not found"),
    (b"", "file is empty"),
    (b"PAR1 this is not parquet", "not a readable parquet file"),
])
def test_bad_parquet_files(tmp_path, content, message):
    path = tmp_path / "x.parquet"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_rows(path)


def test_truncated_parquet(tmp_path):
    path = write(tmp_path, ".parquet")
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match="not a readable parquet file"):
        read_rows(path)


def test_jsonl_error_names_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        read_rows(path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("hi")
    with pytest.raises(DataError, match="unsupported file type"):
        read_rows(path)


def test_nested_keys_like_verl_dict_keys():
    rows = [{"extra_info": {"question": "q", "answer": "a"}}]
    examples, _ = rows_to_examples(rows, "f", "extra_info.question", "extra_info.answer")
    assert (examples[0].prompt, examples[0].response) == ("q", "a")


def test_missing_column_names_file_and_columns():
    with pytest.raises(DataError, match=r"f: missing column 'response' \(columns: answer, prompt\)"):
        rows_to_examples([{"prompt": "a", "answer": "b"}], "f")


@pytest.mark.parametrize("value,kind", [(None, "null"), ("  ", "empty"), (3, "int, expected a string")])
def test_bad_values_name_the_row(value, kind):
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": value}]
    with pytest.raises(DataError, match=f"f row 1: column 'response' is {kind}"):
        rows_to_examples(rows, "f")


def test_drop_empty_counts_instead_of_failing():
    rows = [{"prompt": "a", "response": "b"}, {"prompt": None, "response": "b"}]
    examples, dropped = rows_to_examples(rows, "f", drop_empty=True)
    assert len(examples) == 1 and dropped == 1


def test_multi_turn_rows_and_their_errors():
    good = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    examples, _ = rows_to_examples(good, "f")
    assert examples[0].messages == (("user", "hi"), ("assistant", "yo"))
    with pytest.raises(DataError, match="unknown role 'bot'"):
        rows_to_examples([{"messages": [{"role": "bot", "content": "x"}]}], "f")
    with pytest.raises(DataError, match="no assistant turn"):
        rows_to_examples([{"messages": [{"role": "user", "content": "x"}]}], "f")


def test_dedup_key_normalises_whitespace():
    a, _ = rows_to_examples([{"prompt": "a  b\n", "response": " c"}], "f")
    b, _ = rows_to_examples([{"prompt": "a b", "response": "c"}], "f")
    assert a[0].dedup_key() == b[0].dedup_key()


def test_atomic_writes_get_the_permissions_open_would_give(tmp_path):
    """Prepared data, results and checkpoints are written through a temporary file or folder; they
    must not stay private as mkstemp (0600) and mkdtemp (0700) make them, or a shared data or run
    folder is unreadable to its other users."""
    import os

    old = os.umask(0o022)
    try:
        write_parquet_atomic([{"prompt": "a", "response": "b"}], tmp_path / "rows.parquet")
        write_json_atomic({"a": 1}, tmp_path / "result.json")
        folder = temporary_dir(tmp_path, ".step_1.tmp-")  # a checkpoint's, before its rename
    finally:
        os.umask(old)
    for name in ("rows.parquet", "result.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert folder.stat().st_mode & 0o777 == 0o755
    assert read_rows(tmp_path / "rows.parquet") == [{"prompt": "a", "response": "b"}]
