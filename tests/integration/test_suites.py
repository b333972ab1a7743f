"""`metasft suites build`: the built-in suites in the prepared layout, deterministic for a seed,
with held-out tasks that share nothing with meta-training (issue 14, point 2: countries and cipher)."""

import json

import pyarrow.parquet as pq
import pytest

from metasft.cli import main


def build(name, out, seed=0):
    assert main(["suites", "build", name, "--out", str(out), "--seed", str(seed)]) == 0
    return json.loads((out / "manifest.json").read_text())


def rows(out, task, split):
    return pq.read_table(out / task / f"{split}.parquet").to_pylist()


def test_countries_suite_holds_out_whole_fields_and_states_true_facts(tmp_path):
    from metasft.data.suites import COUNTRY_FIELDS, country_records

    manifest = build("countries", tmp_path / "a")
    tasks = manifest["tasks"]
    field_of = {name: info["field"] for name, info in tasks.items()}
    train = {field_of[t] for t in manifest["train_tasks"]}
    validation = {field_of[t] for t in manifest["validation_tasks"]}
    test = {field_of[t] for t in manifest["held_out_tasks"]}
    assert train and validation and test
    assert not (train & test) and not (train & validation) and not (validation & test)
    assert train | validation | test == set(COUNTRY_FIELDS)
    assert all(tasks[t]["split"] == "test" and tasks[t]["held_out"] for t in manifest["held_out_tasks"])
    # Every answer is the record's own value, in both styles.
    capitals = {r["name"]: r.get("capital") for r in country_records()}
    for row in rows(tmp_path / "a", "country_capital_short", "support"):
        country = row["prompt"].removeprefix("What is the capital of ").removesuffix("?")
        assert row["response"] == capitals[country]
    for row in rows(tmp_path / "a", "country_capital_sentence", "query"):
        country = row["prompt"].removeprefix("What is the capital of ").removesuffix("?")
        assert row["response"] == f"The capital of {country} is {capitals[country]}."
    support = {r["prompt"] for r in rows(tmp_path / "a", "country_region_short", "support")}
    query = {r["prompt"] for r in rows(tmp_path / "a", "country_region_short", "query")}
    assert len(support) == 100 and len(query) == 50 and not support & query


def test_suites_are_deterministic_for_a_seed(tmp_path):
    first, again = build("countries", tmp_path / "a", seed=3), build("countries", tmp_path / "b", seed=3)
    assert first == again
    for task in first["tasks"]:
        assert rows(tmp_path / "a", task, "support") == rows(tmp_path / "b", task, "support")
    other = build("countries", tmp_path / "c", seed=4)
    assert any(rows(tmp_path / "a", t, "support") != rows(tmp_path / "c", t, "support") for t in first["tasks"])


def test_cipher_suite_is_the_demo_s_family(tmp_path):
    from metasft.data.synthetic import pretraining_keys

    manifest = build("cipher", tmp_path / "c")
    assert (len(manifest["train_tasks"]), len(manifest["validation_tasks"]), len(manifest["held_out_tasks"])) == (200, 10, 20)
    keys = {tuple(int(d) for d in info["key"].split()) for info in manifest["tasks"].values()}
    assert len(keys) == 230 and not keys & set(pretraining_keys())


def test_missing_data_package_exits_2_with_the_install_command(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "countryinfo" else real(name, *a))
    assert main(["suites", "build", "countries", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install countryinfo" in err[0]
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_unknown_suite_exits_2(tmp_path, capsys):
    assert main(["suites", "build", "wordnett", "--out", str(tmp_path / "x")]) == 2
    assert "unknown suite 'wordnett'" in capsys.readouterr().err
