"""`metasft suites build`: the built-in suites in the prepared layout, deterministic for a seed,
with held-out tasks that share nothing with meta-training (issue 14, point 2: wordnet, countries and
cipher). The WordNet tests read Debian's wordnet-base, which `make test` installs."""

import json

import pyarrow.parquet as pq

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


def test_wordnet_held_out_tasks_use_categories_never_seen_in_meta_training(tmp_path):
    from metasft.data.suites import WORDNET_LABELS, wordnet_synsets

    manifest = build("wordnet", tmp_path / "w")
    tasks = manifest["tasks"]
    categories = {split: {c for t in manifest[key] for c in tasks[t]["categories"]}
                  for split, key in (("train", "train_tasks"), ("validation", "validation_tasks"),
                                     ("test", "held_out_tasks"))}
    assert (len(manifest["train_tasks"]), len(manifest["validation_tasks"]), len(manifest["held_out_tasks"])) == (100, 5, 10)
    assert not categories["train"] & categories["test"]
    assert not categories["train"] & categories["validation"] and not categories["validation"] & categories["test"]
    synsets = wordnet_synsets()
    for name in (manifest["held_out_tasks"][0], manifest["train_tasks"][0]):
        info = tasks[name]
        assert info["ways"] == 5 and len(set(info["categories"])) == 5 and set(info["labels"]) <= set(WORDNET_LABELS)
        label_of = dict(zip(info["categories"], info["labels"]))
        support, query = rows(tmp_path / "w", name, "support"), rows(tmp_path / "w", name, "query")
        assert len(support) == 50 and len(query) == 25
        assert not {r["prompt"] for r in support} & {r["prompt"] for r in query}
        for row in support + query:
            # The answer is the task's label of the word's own WordNet category, one of the options shown.
            _, category, word = row["source"].split(" ", 2)
            assert row["response"] == label_of[category]
            assert f"Labels: {', '.join(sorted(info['labels']))}." in row["prompt"] and f"Word: {word}\n" in row["prompt"]
            assert any(w == word for w, _ in synsets[category])
        counts = {label: sum(r["response"] == label for r in support) for label in info["labels"]}
        assert set(counts.values()) == {10}
    # Each task gives its categories its own labels: the same category is not always the same word.
    label_sets = {}
    for name in manifest["train_tasks"]:
        for category, label in zip(tasks[name]["categories"], tasks[name]["labels"]):
            label_sets.setdefault(category, set()).add(label)
    assert all(len(labels) > 1 for labels in label_sets.values())


def test_wordnet_reads_the_real_database(tmp_path):
    from metasft.data.suites import wordnet_synsets

    synsets = wordnet_synsets()
    assert sum(len(v) for v in synsets.values()) == 117659  # WordNet 3.0's synsets
    dogs = dict(synsets["noun.animal"])
    assert dogs["dog"].startswith("a member of the genus Canis")
    assert not any(w.endswith(")") for w, _ in synsets["adj.all"])  # syntactic markers like "galore(ip)" dropped
    assert "galore" in dict(synsets["adj.all"])


def test_missing_wordnet_exits_2_with_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WNSEARCHDIR", str(tmp_path / "nowhere"))
    assert main(["suites", "build", "wordnet", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apt-get install wordnet-base" in err[0] and "nowhere" in err[0]
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_suites_are_deterministic_for_a_seed(tmp_path):
    for suite in ("countries", "wordnet"):
        first = build(suite, tmp_path / suite / "a", seed=3)
        again = build(suite, tmp_path / suite / "b", seed=3)
        assert first == again
        for task in first["tasks"]:
            assert rows(tmp_path / suite / "a", task, "support") == rows(tmp_path / suite / "b", task, "support")
        other = build(suite, tmp_path / suite / "c", seed=4)
        assert first["tasks"] != other["tasks"] or any(
            rows(tmp_path / suite / "a", t, "support") != rows(tmp_path / suite / "c", t, "support") for t in first["tasks"])


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


def test_wordnet_cloze_blanks_held_out_words_never_seen_in_meta_training(tmp_path):
    from metasft.data.suites import CLOZE_LABELS, WORDNET_LABELS, build_wordnet_cloze, wordnet_sentences

    manifest = build("wordnet_cloze", tmp_path / "c")
    tasks = manifest["tasks"]
    assert (len(manifest["train_tasks"]), len(manifest["validation_tasks"]), len(manifest["held_out_tasks"])) == (1000, 5, 10)
    words = {split: {w for t in manifest[key] for w in tasks[t]["words"]}
             for split, key in (("train", "train_tasks"), ("validation", "validation_tasks"), ("test", "held_out_tasks"))}
    assert not words["train"] & words["test"] and not words["train"] & words["validation"]
    assert not words["validation"] & words["test"]
    assert not set(CLOZE_LABELS) & set(WORDNET_LABELS)  # other answer words than the category suite's
    sentences = set(wordnet_sentences())
    for name in (manifest["held_out_tasks"][0], manifest["train_tasks"][0]):
        info = tasks[name]
        label_of = dict(zip(info["words"], info["labels"]))
        support, query = rows(tmp_path / "c", name, "support"), rows(tmp_path / "c", name, "query")
        assert len(support) == 50 and len(query) == 25
        for row in support + query:
            word = row["source"].split(" ", 1)[1]
            assert row["response"] == label_of[word]  # the label of the blanked word
            sentence = row["prompt"].split("\nSentence: ", 1)[1].rsplit("\nWhich label?", 1)[0]
            assert "____" in sentence and word not in sentence.lower().split()
            # The blank filled in again is (a window of) a real WordNet gloss or example.
            filled = sentence.replace("____", word)
            assert any(filled.lower() in s.lower() for s in sentences if word in s.lower())
        assert {sum(r["response"] == label for r in support) for label in info["labels"]} == {10}
    again = build_wordnet_cloze(tmp_path / "again", seed=0)
    assert again == manifest


def test_more_held_out_tasks_keep_every_other_task_and_the_first_held_out_ones(tmp_path, capsys):
    plain = build("wordnet", tmp_path / "plain")
    assert main(["suites", "build", "wordnet", "--out", str(tmp_path / "more"), "--held-out-tasks", "13"]) == 0
    more = json.loads((tmp_path / "more" / "manifest.json").read_text())
    assert more["train_tasks"] == plain["train_tasks"] and more["validation_tasks"] == plain["validation_tasks"]
    assert more["held_out_tasks"][:10] == plain["held_out_tasks"] and len(more["held_out_tasks"]) == 13
    for task in plain["tasks"]:
        for split in ("support", "query"):
            assert (tmp_path / "more" / task / f"{split}.parquet").read_bytes() == \
                (tmp_path / "plain" / task / f"{split}.parquet").read_bytes(), (task, split)
    added = set(more["held_out_tasks"][10:])
    assert all(rows(tmp_path / "more", t, "query") != rows(tmp_path / "more", plain["held_out_tasks"][0], "query")
               for t in added)
    # The added tasks' categories come from the held-out pool, never from meta-training's.
    train_categories = {c for t in more["train_tasks"] for c in more["tasks"][t]["categories"]}
    assert not {c for t in added for c in more["tasks"][t]["categories"]} & train_categories

    capsys.readouterr()
    assert main(["suites", "build", "cipher", "--out", str(tmp_path / "c"), "--held-out-tasks", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--held-out-tasks applies to wordnet and wordnet_cloze" in err[0]
    assert not (tmp_path / "c").exists()
