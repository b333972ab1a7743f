"""`metasft prepare`: deterministic, disjoint splits with requested sizes and an accurate manifest."""

import json

import pyarrow.parquet as pq
import pytest

from metasft.data.prepare import prepare
from metasft.errors import ConfigError, DataError


def make_task_files(tmp_path):
    """Two tasks with duplicates (exact and whitespace-variant) and a null row; one held out."""
    a_rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(40)]
    a_rows += [{"prompt": "q3", "response": "a3"}, {"prompt": " q4 ", "response": "a4\n"},
               {"prompt": None, "response": "x"}]
    b_rows = [{"question": f"b{i}", "answer": f"c{i}"} for i in range(25)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a_rows))
    (tmp_path / "b.json").write_text(json.dumps(b_rows))
    config = {
        "alpha": {"input_file": str(tmp_path / "a.jsonl"), "support_ratio": 0.25},
        "beta": {"input_file": "b.json", "prompt_key": "question", "response_key": "answer", "split": "test"},
    }
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(config))
    return path


def read_split(out, task, split):
    return pq.read_table(out / task / f"{split}.parquet").to_pylist()


def test_prepare_splits_are_disjoint_sized_and_reported(tmp_path):
    config = make_task_files(tmp_path)
    out = tmp_path / "out"
    manifest, reports = prepare(config, out, seed=3, support_size=10, query_size=20)
    alpha = {r.name: r for r in reports}["alpha"]
    assert alpha.read == 43
    assert alpha.dropped == {"null or empty": 1, "duplicate": 2, "beyond requested sizes": 10}
    support, query = read_split(out, "alpha", "support"), read_split(out, "alpha", "query")
    assert (len(support), len(query)) == (10, 20)
    key = lambda r: (" ".join(r["prompt"].split()), " ".join(r["response"].split()))  # noqa: E731
    assert not {key(r) for r in support} & {key(r) for r in query}
    assert manifest["tasks"]["alpha"]["support_rows"] == 10
    assert manifest["held_out_tasks"] == ["beta"] and manifest["train_tasks"] == ["alpha"]
    assert manifest["tasks"]["beta"]["held_out"] is True
    assert set(read_split(out, "beta", "support")[0]) == {"prompt", "response", "source"}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert len(manifest["tasks"]["alpha"]["sources"][0]["sha256"]) == 64


def test_prepare_is_deterministic_and_seed_dependent(tmp_path):
    config = make_task_files(tmp_path)
    prepare(config, tmp_path / "o1", seed=1)
    prepare(config, tmp_path / "o2", seed=1)
    prepare(config, tmp_path / "o3", seed=2)
    for split in ("support", "query"):
        assert read_split(tmp_path / "o1", "alpha", split) == read_split(tmp_path / "o2", "alpha", split)
    assert read_split(tmp_path / "o1", "alpha", "support") != read_split(tmp_path / "o3", "alpha", "support")


def test_ratio_split_keeps_every_usable_row(tmp_path):
    config = make_task_files(tmp_path)
    manifest, _ = prepare(config, tmp_path / "out")
    alpha = manifest["tasks"]["alpha"]
    assert alpha["support_rows"] == 10 and alpha["query_rows"] == 30  # 40 unique rows, ratio 0.25


def test_balance_caps_every_task_at_the_smallest(tmp_path):
    config = make_task_files(tmp_path)
    manifest, reports = prepare(config, tmp_path / "out", balance=True)
    sizes = {name: t["support_rows"] + t["query_rows"] for name, t in manifest["tasks"].items()}
    assert sizes == {"alpha": 25, "beta": 25}
    assert {r.name: r for r in reports}["alpha"].dropped["balance"] == 15


def test_short_task_warns(tmp_path):
    config = make_task_files(tmp_path)
    _, reports = prepare(config, tmp_path / "out", support_size=20, query_size=100)
    assert any("fewer than --query-size 100" in w for w in {r.name: r for r in reports}["beta"].warnings)


def test_failure_leaves_existing_output_untouched(tmp_path):
    config = make_task_files(tmp_path)
    out = tmp_path / "out"
    prepare(config, out, seed=1)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (tmp_path / "b.json").write_text("[]")  # the second task becomes empty
    with pytest.raises(DataError, match="file has no rows"):
        prepare(config, out, seed=2)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.parametrize("entry,message", [
    ({"support_ratio": 0.5}, "missing key 'input_file'"),
    ({"input_file": "a.jsonl", "support_ratio": 1.5}, "support_ratio=1.5"),
    ({"input_file": "a.jsonl", "colour": 1}, "unknown key 'colour'"),
    ({"input_file": "a.jsonl", "split": "dev"}, "split='dev'"),
    ({"input_file": "a.jsonl", "max_samples": 0}, "max_samples=0"),
])
def test_bad_task_config_entries_name_the_task(tmp_path, entry, message):
    make_task_files(tmp_path)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"gamma": entry}))
    with pytest.raises(ConfigError, match=f"task 'gamma'.*{message}"):
        prepare(path, tmp_path / "out")


def test_task_names_cannot_escape_the_output_dir(tmp_path):
    make_task_files(tmp_path)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"../evil": {"input_file": str(tmp_path / "a.jsonl")}}))
    with pytest.raises(ConfigError, match="path separators"):
        prepare(path, tmp_path / "out")
    assert not (tmp_path / "evil").exists()
