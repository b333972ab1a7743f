"""The synthetic suite's guarantees, and the text metrics."""

import pyarrow.parquet as pq
import pytest

from metasft.data.synthetic import generate_suite
from metasft.errors import ConfigError
from metasft.metrics import exact_match, rouge_l


def test_suite_is_deterministic_disjoint_and_correctly_keyed(tmp_path):
    manifest = generate_suite(tmp_path / "a", num_tasks=110, num_held_out=10, support_size=20, query_size=10, seed=3)
    again = generate_suite(tmp_path / "b", num_tasks=110, num_held_out=10, support_size=20, query_size=10, seed=3)
    assert len(manifest["tasks"]) == 110 and len(manifest["held_out_tasks"]) == 10
    assert not set(manifest["train_tasks"]) & set(manifest["held_out_tasks"])
    keys = [t["key"] for t in manifest["tasks"].values()]
    assert len(set(keys)) == 110
    for name, task in manifest["tasks"].items():
        key = list(map(int, task["key"].split()))
        support = pq.read_table(tmp_path / "a" / task["support_file"]).to_pylist()
        query = pq.read_table(tmp_path / "a" / task["query_file"]).to_pylist()
        assert support == pq.read_table(tmp_path / "b" / again["tasks"][name]["support_file"]).to_pylist()
        assert not {r["prompt"] for r in support} & {r["prompt"] for r in query}
        for row in support[:3] + query[:3]:
            digits = [int(x) for x in row["prompt"].removeprefix("map: ").split()]
            assert row["response"] == " " + " ".join(str(key[d]) for d in digits)


def test_suite_rejects_impossible_sizes(tmp_path):
    with pytest.raises(ConfigError, match="num_tasks"):
        generate_suite(tmp_path, num_tasks=800, symbols=6)
    with pytest.raises(ConfigError, match="support_size"):
        generate_suite(tmp_path, support_size=1000, query_size=500, length=2)


def test_exact_match_strips_whitespace():
    assert exact_match(" 1 2 3\n", "1 2 3") == 1.0
    assert exact_match("1 2", "1 2 3") == 0.0


def test_rouge_l_against_hand_computed_values():
    assert rouge_l("a b c d", "a b c d") == 1.0
    assert rouge_l("", "a") == 0.0
    # LCS("a x c d", "a b c d") = 3 -> P = R = 3/4.
    assert rouge_l("a x c d", "a b c d") == pytest.approx(0.75)
    # LCS("a b", "a c b d") = 2 -> P = 1, R = 1/2, F = 2/3.
    assert rouge_l("a b", "a c b d") == pytest.approx(2 / 3)
