"""`metasft adapt`, `metasft eval` and `metasft bench` end to end on a tiny model and our own
cipher-like suite (not the built-in one)."""

import csv
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from metasft.cli import main

from conftest import write_tasks


def make_prepared_suite(root, n_train=4, n_held_out=2, n_validation=0):
    """A cipher-like suite in the prepared layout, written with `metasft prepare` from jsonl files:
    ``n_train`` tasks for training, then ``n_validation`` validation and ``n_held_out`` test tasks."""
    from conftest import cipher_rows

    config = {}
    for t in range(n_train + n_validation + n_held_out):
        path = root / f"raw{t}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in cipher_rows(500 + t, 40)))
        split = "train" if t < n_train else "validation" if t < n_train + n_validation else "test"
        config[f"c{t}"] = {"input_file": str(path), "split": split}
    (root / "tasks.json").write_text(json.dumps(config))
    assert main(["prepare", "--config", str(root / "tasks.json"), "--output-dir", str(root / "data"),
                 "--support-size", "20", "--query-size", "10"]) == 0
    return root / "data"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir):
    """A short FOMAML run whose checkpoint the adapt/eval tests use."""
    root = tmp_path_factory.mktemp("trained")
    overrides = write_tasks(root / "tasks", 3, 10, 6, held_out=1)
    assert main(["train", f"model.partial_pretrain={tiny_llama_dir}", "meta.algorithm=fomaml", "meta.meta_batch_size=2",
                 "meta.inner_batch_size=5", "meta.num_inner_steps=2", "meta.inner_lr=0.1", "meta.outer_lr=0.003",
                 "trainer.total_training_steps=2", "data.chat_template=none", "trainer.logger=[jsonl]",
                 f"trainer.default_local_dir={root / 'run'}", *overrides]) == 0
    return root


def test_adapt_then_eval(tmp_path, trained, capsys):
    data = trained / "tasks" / "task2" / "support.parquet"
    out = tmp_path / "adapted"
    assert main(["adapt", "--checkpoint", str(trained / "run" / "step_2"), "--data", str(data), "--n-shots", "6",
                 "--output", str(out)]) == 0
    info = json.loads((out / "adapt_info.json").read_text())
    assert info["steps"] == 2 and info["lr"] == 0.1 and info["batch_size"] == 5  # the checkpoint's meta settings
    before = load_file(trained / "run" / "step_2" / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--data", str(trained / "tasks" / "task2" / "query.parquet"),
                 "--output", str(tmp_path / "m.json"), "--predictions"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((tmp_path / "m.json").read_text())
    assert result["rows"] == 6 and len(result["predictions"]) == 6
    assert 0 <= result["exact_match"] <= 1 and 0 <= result["token_accuracy"] <= 1 and result["query_loss"] > 0


def test_adapting_a_base_model_needs_lr_and_steps(tmp_path, tiny_llama_dir, trained, capsys):
    data = trained / "tasks" / "task2" / "support.parquet"
    code = main(["adapt", "--checkpoint", str(tiny_llama_dir), "--data", str(data), "--n-shots", "4", "--output",
                 str(tmp_path / "x")])
    assert code == 2 and "give --lr and --steps or --epochs" in capsys.readouterr().err
    assert main(["adapt", "--checkpoint", str(tiny_llama_dir), "--data", str(data), "--n-shots", "4", "--lr", "0.1",
                 "--epochs", "2", "--batch-size", "2", "--output", str(tmp_path / "y")]) == 0
    assert json.loads((tmp_path / "y" / "adapt_info.json").read_text())["steps"] == 4
    assert not (tmp_path / "x").exists()


def test_generation_batched_equals_one_at_a_time(trained, tokenizer):
    from metasft.checkpoint import load_pretrained
    from metasft.evaluate import _prompt_ids, generate
    from metasft.data.formatting import rows_to_examples
    from metasft.data.io import read_rows
    from metasft.data.tokenize import encode_examples

    model, tok, _ = load_pretrained(trained / "run" / "step_2")
    examples, _ = rows_to_examples(read_rows(trained / "tasks" / "task0" / "query.parquet"), "q")
    prompts = [_prompt_ids(r) for r in encode_examples(examples, tok, 64, chat_template="none")]
    assert generate(model, tok, prompts, 6, 16, torch.device("cpu")) == generate(model, tok, prompts, 6, 1, torch.device("cpu"))


@pytest.mark.slow
def test_bench_writes_everything_and_is_reproducible(tmp_path, tiny_llama_dir, trained):
    data = make_prepared_suite(tmp_path)
    config = {
        "base_model": str(tiny_llama_dir), "tasks_dir": str(data), "n_shots": [4, 8], "seeds": [0, 1],
        "adapt": {"optimizer": "sgd", "lr": 0.1, "steps": 2, "batch_size": 4},
        "eval": {"batch_size": 16},
        "data": {"chat_template": "none", "max_length": 64},
        "train_overrides": ["trainer.total_training_steps=2", "meta.meta_batch_size=2", "meta.inner_batch_size=4",
                            "meta.num_inner_steps=2", "meta.query_batch_size=4", "meta.inner_lr=0.1", "meta.outer_lr=0.003"],
        "methods": [{"name": "fomaml", "config_name": "fomaml"},
                    {"name": "existing", "checkpoint": str(trained / "run" / "step_2")},
                    {"name": "sweep", "config_name": "reptile", "grid": ["meta.inner_lr=[0.05, 0.2]"],
                     "overrides": ["optim.name=sgd", "meta.outer_lr=0.5"]}],
        "output_dir": str(tmp_path / "bench"),
    }
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    assert main(["bench", "--config", str(tmp_path / "bench.yaml")]) == 0
    out = tmp_path / "bench"
    rows = list(csv.DictReader(open(out / "results.csv")))
    methods = {r["method"] for r in rows}
    assert methods == {"base", "sft", "fomaml", "existing", "sweep[inner_lr=0.05]", "sweep[inner_lr=0.2]"}
    assert len(rows) == len(methods) * 2 * 2 * 2  # held-out tasks × n_shots × seeds
    assert {"method", "task", "n_shots", "seed", "query_loss", "token_accuracy", "exact_match", "rouge_l"} <= set(rows[0])
    result = json.loads((out / "results.json").read_text())
    assert result["methods"]["fomaml"]["train_peak_mib"] > 0 and result["methods"]["fomaml"]["steps"] == 2
    assert "± " in (out / "results.md").read_text()
    assert (out / "adaptation.png").stat().st_size > 10_000
    assert [s["variant"] for s in result["sweep"]] and (out / "best_config.yaml").is_file()
    assert "Sweep ranking" in (out / "results.md").read_text()
    # Same seed, fresh output directory: identical results.csv.
    config["output_dir"] = str(tmp_path / "bench2")
    (tmp_path / "bench2.yaml").write_text(yaml.safe_dump(config))
    assert main(["bench", "--config", str(tmp_path / "bench2.yaml")]) == 0
    assert (out / "results.csv").read_text() == (tmp_path / "bench2" / "results.csv").read_text()


def test_bench_chooses_each_adaptation_lr_on_validation_tasks_only(tmp_path, tiny_llama_dir):
    data = make_prepared_suite(tmp_path, n_train=2, n_held_out=2, n_validation=2)
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["validation_tasks"] == ["c2", "c3"] and manifest["held_out_tasks"] == ["c4", "c5"]
    grid = [0.01, 0.3, 3.0]
    config = {"base_model": str(tiny_llama_dir), "tasks_dir": str(data), "n_shots": [2, 6], "seeds": [0],
              "adapt": {"lr_grid": grid, "steps": 3, "batch_size": 4}, "metric": "query_loss",
              "eval": {"generation": False}, "data": {"chat_template": "none"},
              "methods": [{"name": "sft", "checkpoint": str(tiny_llama_dir)}], "output_dir": str(tmp_path / "b")}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    assert main(["bench", "--config", str(tmp_path / "bench.yaml")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "b" / "results.csv")))
    validation = list(csv.DictReader(open(tmp_path / "b" / "validation.csv")))
    assert {r["task"] for r in rows} == {"c4", "c5"} and {r["task"] for r in validation} == {"c2", "c3"}
    for method in ("base", "sft"):
        for n_shots in ("2", "6"):
            # The choice, recomputed from the validation rows: lowest mean query loss over tasks.
            mean = {lr: sum(float(r["query_loss"]) for r in validation if r["method"] == method
                            and r["n_shots"] == n_shots and float(r["adapt_lr"]) == lr) / 2 for lr in grid}
            best = min(grid, key=mean.get)
            used = {float(r["adapt_lr"]) for r in rows if r["method"] == method and r["n_shots"] == n_shots}
            assert used == {best}, (method, n_shots, mean)
    result = json.loads((tmp_path / "b" / "results.json").read_text())
    assert set(result["methods"]["sft"]["adapt_lr"]) == {"2", "6"}
    assert "chosen per method and n_shots on 2 validation tasks" in (tmp_path / "b" / "results.md").read_text()


def test_bench_can_choose_the_adaptation_lr_by_query_loss_without_generating_on_validation_tasks(tmp_path,
                                                                                              tiny_llama_dir):
    """adapt.select_lr_by: query_loss. The reported metric is exact match (generated), but the rate is
    the one with the lowest mean validation query loss, and validation tasks are scored without
    generating."""
    data = make_prepared_suite(tmp_path, n_train=2, n_held_out=2, n_validation=2)
    grid = [0.01, 0.3, 3.0]
    config = {"base_model": str(tiny_llama_dir), "tasks_dir": str(data), "n_shots": [4], "seeds": [0],
              "adapt": {"lr_grid": grid, "steps": 3, "batch_size": 4, "select_lr_by": "query_loss"},
              "metric": "exact_match", "eval": {"max_new_tokens": 4}, "data": {"chat_template": "none"},
              "methods": [{"name": "sft", "checkpoint": str(tiny_llama_dir)}], "output_dir": str(tmp_path / "b")}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    assert main(["bench", "--config", str(tmp_path / "bench.yaml")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "b" / "results.csv")))
    validation = list(csv.DictReader(open(tmp_path / "b" / "validation.csv")))
    assert all(r["exact_match"] == "" for r in validation) and all(r["exact_match"] != "" for r in rows)
    for method in ("base", "sft"):
        mean = {lr: sum(float(r["query_loss"]) for r in validation if r["method"] == method
                        and float(r["adapt_lr"]) == lr) / 2 for lr in grid}
        used = {float(r["adapt_lr"]) for r in rows if r["method"] == method}
        assert used == {min(grid, key=mean.get)}, (method, mean)
    assert "on 2 validation tasks by the lowest query loss" in (tmp_path / "b" / "results.md").read_text()


def test_bench_evaluates_each_method_at_its_best_validation_checkpoint(tmp_path, tiny_llama_dir):
    """select_checkpoint: best_validation. The trainer saves at every evaluation on the validation
    tasks; bench evaluates the step those evaluations ranked best, recomputed here from metrics.jsonl."""
    data = make_prepared_suite(tmp_path, n_train=2, n_held_out=1, n_validation=1)
    config = {"base_model": str(tiny_llama_dir), "tasks_dir": str(data), "n_shots": [4], "seeds": [0],
              "adapt": {"steps": 2, "batch_size": 4, "lr": 0.1}, "metric": "query_loss",
              "eval": {"generation": False}, "data": {"chat_template": "none"}, "select_checkpoint": "best_validation",
              "train_overrides": ["meta.meta_batch_size=2", "meta.inner_batch_size=4", "meta.num_inner_steps=1",
                                  "meta.outer_lr=0.05", "trainer.total_training_steps=6", "trainer.test_freq=2"],
              "methods": [{"name": "fomaml", "config_name": "fomaml"}], "output_dir": str(tmp_path / "b")}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    assert main(["bench", "--config", str(tmp_path / "bench.yaml")]) == 0
    result = json.loads((tmp_path / "b" / "results.json").read_text())
    for method in ("sft", "fomaml"):
        run = tmp_path / "b" / "runs" / method
        assert sorted(p.name for p in run.glob("step_*")) == ["step_2", "step_4", "step_6"]
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses = {r["step"]: r["val/query_loss_post"] for r in records if "val/query_loss_post" in r}
        assert sorted(losses) == [2, 4, 6] and not any(k.startswith("heldout/") for r in records for k in r)
        info = result["methods"][method]
        assert info["selected_step"] == min(losses, key=losses.get)
        assert info["checkpoint"] == str(run / f"step_{info['selected_step']}")
        assert info["selected_by"] == "val/query_loss_post"
    assert "evaluated checkpoint" in (tmp_path / "b" / "results.md").read_text()


def test_best_validation_step_ranks_exact_match_then_loss_and_keeps_the_last_record(tmp_path):
    from metasft.bench import best_validation_step

    records = [{"step": 10, "val/exact_match": 0.5, "val/query_loss_post": 0.9},
               {"step": 20, "val/exact_match": 0.8, "val/query_loss_post": 0.7},
               {"step": 25, "loss": 1.0},                                               # a training record
               {"step": 30, "val/exact_match": 0.8, "val/query_loss_post": 0.4},        # the tie's lower loss
               {"step": 40, "val/exact_match": 0.2, "val/query_loss_post": 0.1},
               {"step": 30, "val/exact_match": 0.1, "val/query_loss_post": 2.0}]        # step 30 again (resumed)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert best_validation_step(tmp_path, "exact_match") == (20, "val/exact_match")
    assert best_validation_step(tmp_path, "query_loss") == (40, "val/query_loss_post")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 5, "heldout/query_loss_post": 1.0}) + "\n")
    with pytest.raises(Exception, match="no evaluation on validation tasks"):
        best_validation_step(tmp_path, "exact_match")


@pytest.mark.parametrize("change,needle", [
    ({"select_checkpoint": "best_validation"}, "select_checkpoint: best_validation needs tasks prepared with split: validation"),
    ({"base_model": ""}, "base_model: required"),
    ({"n_shots": [0]}, "n_shots"),
    ({"methods": [{"name": "x"}]}, "exactly one of config, config_name, checkpoint"),
    ({"methods": [{"name": "x", "checkpoint": "/nope"}]}, "method x: /nope: no such checkpoint directory"),
    ({"colour": 1}, "colour: unknown config key"),
    ({"n_shots": [500]}, "n_shots: 500 exceeds task"),
    ({"adapt": {"lr_grid": [0.1, 0.3]}}, "adapt.lr_grid: needs validation tasks"),
    ({"held_out_tasks": ["c2"], "validation_tasks": ["c2"]}, "validation_tasks: task 'c2' is also in held_out_tasks"),
    ({"validation_tasks": ["c0"], "adapt": {"lr_grid": [0.1]}}, "validation_tasks: task 'c0' is a meta-training task"),
])
def test_bench_bad_config(tmp_path, tiny_llama_dir, change, needle, capsys):
    data = make_prepared_suite(tmp_path, 2, 1)
    config = {"base_model": str(tiny_llama_dir), "tasks_dir": str(data), "n_shots": [2],
              "output_dir": str(tmp_path / "b"), "methods": [{"name": "sft", "checkpoint": str(tiny_llama_dir)}],
              "data": {"chat_template": "none"}}
    config.update(change)
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    assert main(["bench", "--config", str(tmp_path / "bench.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


@pytest.mark.slow
def test_bench_evaluates_every_method_in_context_too(tmp_path, tiny_llama_dir, trained):
    """adaptations: [gradient, in_context] (issue 15): one in-context row per (method, task, n_shots,
    seed) beside the gradient rows; shots_used never above n_shots, and below it when data.max_length
    cannot hold them all (8 demonstrations of ~12 tokens do not fit 64); a metaicl method trains and
    is scored both ways; identical numbers when re-run with the same seed."""
    data = make_prepared_suite(tmp_path)
    config = {
        "base_model": str(tiny_llama_dir), "tasks_dir": str(data), "n_shots": [2, 8], "seeds": [0, 1],
        "adaptations": ["gradient", "in_context"],
        "adapt": {"optimizer": "sgd", "lr": 0.1, "steps": 2, "batch_size": 4},
        "eval": {"batch_size": 16, "max_query_rows": 6},
        "data": {"chat_template": "none", "max_length": 64},
        "train_overrides": ["trainer.total_training_steps=2", "meta.meta_batch_size=2", "meta.inner_batch_size=4",
                            "meta.outer_lr=0.003", "meta.inner_lr=0.1", "meta.num_inner_steps=2"],
        "methods": [{"name": "metaicl", "config_name": "metaicl", "overrides": ["meta.metaicl_demos=3"]},
                    {"name": "existing", "checkpoint": str(trained / "run" / "step_2")}],
        "output_dir": str(tmp_path / "bench"),
    }
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    assert main(["bench", "--config", str(tmp_path / "bench.yaml")]) == 0
    out = tmp_path / "bench"
    rows = list(csv.DictReader(open(out / "results.csv")))
    methods = {"base", "sft", "metaicl", "existing"}
    assert {r["method"] for r in rows} == methods
    for adaptation in ("gradient", "in_context"):
        keys = [(r["method"], r["task"], r["n_shots"], r["seed"]) for r in rows if r["adaptation"] == adaptation]
        assert len(keys) == len(set(keys)) == len(methods) * 2 * 2 * 2  # methods × tasks × n_shots × seeds
    in_context = [r for r in rows if r["adaptation"] == "in_context"]
    assert all(int(r["shots_used_min"]) <= float(r["shots_used"]) <= int(r["n_shots"]) for r in in_context)
    assert all(float(r["shots_used"]) == 2 for r in in_context if r["n_shots"] == "2")
    assert all(float(r["shots_used"]) < 8 for r in in_context if r["n_shots"] == "8")
    assert all(r["adapt_lr"] == "" for r in in_context)
    # In context, nothing is trained: the base model scores differently than after gradient steps.
    base = {(r["adaptation"], r["task"], r["n_shots"], r["seed"]): r["query_loss"] for r in rows if r["method"] == "base"}
    assert any(base[("in_context",) + k[1:]] != v for k, v in base.items() if k[0] == "gradient")
    table = (out / "results.md").read_text()
    assert "| metaicl | in_context | 8 |" in table and "| base | gradient | 2 |" in table
    result = json.loads((out / "results.json").read_text())
    assert {(e["method"], e["adaptation"]) for e in result["summary"]} == {(m, a) for m in methods
                                                                          for a in ("gradient", "in_context")}
    config["output_dir"] = str(tmp_path / "again")
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(config))
    assert main(["bench", "--config", str(tmp_path / "again.yaml")]) == 0
    assert (out / "results.csv").read_text() == (tmp_path / "again" / "results.csv").read_text()


def test_bench_refuses_unknown_adaptations(tmp_path, tiny_llama_dir, capsys):
    data = make_prepared_suite(tmp_path)
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"base_model": str(tiny_llama_dir), "tasks_dir": str(data),
                                                    "adaptations": ["gradient", "prompting"]}))
    assert main(["bench", "--config", str(tmp_path / "b.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "adaptations" in err[0] and "prompting" in err[0]


def test_bench_refuses_to_add_sft_on_an_adapter_folder_before_training(tmp_path, tiny_llama_dir, capsys):
    """The added sft trains full weights, which a LoRA adapter folder as base_model loads frozen: one
    line naming the key and the folder, before any method trains."""
    from metasft.bench.methods import base_with_fresh_adapters
    from metasft.config import ModelConfig

    data = make_prepared_suite(tmp_path)
    adapters = base_with_fresh_adapters(str(tiny_llama_dir), ModelConfig(lora_rank=2, lora_alpha=4,
                                                                         target_modules=["q_proj"]),
                                        tmp_path / "adapters")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({
        "base_model": str(adapters), "tasks_dir": str(data), "output_dir": str(tmp_path / "bench"),
        "methods": [{"name": "fomaml", "config_name": "fomaml"}]}))
    capsys.readouterr()
    assert main(["bench", "--config", str(tmp_path / "b.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("metasft bench: error: methods: ") and str(adapters) in err[0]
    assert not (tmp_path / "bench" / "runs").exists()  # nothing was trained


def make_labelled_suite(root, n_train=2, n_held_out=1, labels=("red", "blue", "green"), per_class=6, n_validation=0):
    """A 3-way classification suite (the response is the class), prepared with `metasft prepare`:
    ``n_train`` training, then ``n_validation`` validation and ``n_held_out`` test tasks."""
    config = {}
    for t in range(n_train + n_validation + n_held_out):
        path = root / f"raw{t}.jsonl"
        rows = [{"prompt": f"t{t} word {i}", "response": labels[i % len(labels)]} for i in range(per_class * len(labels))]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        split = "train" if t < n_train else "validation" if t < n_train + n_validation else "test"
        config[f"c{t}"] = {"input_file": str(path), "split": split}
    (root / "tasks.json").write_text(json.dumps(config))
    assert main(["prepare", "--config", str(root / "tasks.json"), "--output-dir", str(root / "data"),
                 "--support-size", str(per_class * len(labels) * 2 // 3), "--query-size",
                 str(per_class * len(labels) // 3)]) == 0
    return root / "data"


def test_bench_per_class_shots_give_every_class_n_rows_and_name_a_short_class(tmp_path, tiny_llama_dir, capsys):
    """shots: per_class (N-way K-shot): n_shots rows of every class, both adaptations; the table
    and plot say shots per class; a class with too few support rows is one line naming it."""
    data = make_labelled_suite(tmp_path)
    config = {"base_model": str(tiny_llama_dir), "tasks_dir": str(data), "n_shots": [1, 2], "shots": "per_class",
              "adaptations": ["gradient", "in_context"], "adapt": {"lr": 0.1, "steps": 1, "batch_size": 4},
              "data": {"chat_template": "none", "max_length": 256}, "output_dir": str(tmp_path / "bench"),
              "methods": [{"name": "sft", "checkpoint": str(tiny_llama_dir)}]}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    assert main(["bench", "--config", str(tmp_path / "bench.yaml")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "bench" / "results.csv")))
    assert rows and all(float(r["shots_used"]) == 3 * int(r["n_shots"]) for r in rows)  # 3 classes × n
    assert "| shots per class |" in (tmp_path / "bench" / "results.md").read_text()
    capsys.readouterr()
    config["n_shots"] = [5]  # each class has 4 support rows
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    assert main(["bench", "--config", str(tmp_path / "bench.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "n_shots: 5 per class exceeds task" in err[0] and "of class" in err[0], err


@pytest.mark.slow
def test_bench_base_adapters_from_gives_the_base_fresh_adapters_in_the_lora_scope(tmp_path, tiny_llama_tied_dir,
                                                                               capsys):
    """With a head tied to the embeddings, the base cannot adapt top_layers:1 in full weights (one
    line says so); base_adapters_from gives it the LoRA method's adapters at B = 0: the base's own
    function (same logits), adapted in the same parameters as the method."""
    from transformers import AutoModelForCausalLM

    from metasft.checkpoint import load_pretrained

    data = make_labelled_suite(tmp_path)
    lora = ["model.lora_rank=4", "model.lora_alpha=8", "model.target_modules=[q_proj, v_proj, lm_head]"]
    config = {"base_model": str(tiny_llama_tied_dir), "tasks_dir": str(data), "n_shots": [2],
              "adapt": {"lr": 0.1, "steps": 1, "batch_size": 4, "inner_scope": "top_layers:1"},
              "data": {"chat_template": "none", "max_length": 64}, "output_dir": str(tmp_path / "bench"),
              "train_overrides": ["trainer.total_training_steps=1", "meta.meta_batch_size=2", "meta.inner_batch_size=4",
                                  "meta.num_inner_steps=1", "meta.query_batch_size=4"],
              "methods": [{"name": "sft", "config_name": "sft", "overrides": lora}]}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    assert main(["bench", "--config", str(tmp_path / "bench.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "top_layers:1" in err[0] and "tie" in err[0], err
    config["base_adapters_from"] = "sft"
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    assert main(["bench", "--config", str(tmp_path / "bench.yaml")]) == 0
    result = json.loads((tmp_path / "bench" / "results.json").read_text())
    base = tmp_path / "bench" / "base_adapters"
    assert result["methods"]["base"]["checkpoint"] == str(base)
    assert json.loads((base / "adapter_config.json").read_text())["r"] == 4
    assert {r["method"] for r in csv.DictReader(open(tmp_path / "bench" / "results.csv"))} == {"base", "sft"}
    adapted, _, _ = load_pretrained(base)
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_tied_dir)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    assert torch.allclose(adapted(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-6)
    config["base_adapters_from"] = "nope"
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    assert main(["bench", "--config", str(tmp_path / "bench.yaml")]) == 2
    assert "base_adapters_from: 'nope' is not a method in methods" in capsys.readouterr().err


def test_bench_base_adapters_from_a_checkpoint_takes_its_saved_adapter_settings(tmp_path, tiny_llama_tied_dir,
                                                                                capsys):
    """base_adapters_from may name a checkpoint method: the base's fresh adapters follow the model
    settings saved in its metasft_config.yaml; a checkpoint without one is refused in one line."""
    from metasft.bench.methods import base_with_fresh_adapters
    from metasft.checkpoint import CONFIG_FILE
    from metasft.config import load_config

    data = make_labelled_suite(tmp_path)
    lora = ["model.lora_rank=3", "model.lora_alpha=6", "model.target_modules=[q_proj, v_proj]"]
    saved = load_config(name="sft", overrides=lora)
    checkpoint = base_with_fresh_adapters(str(tiny_llama_tied_dir), saved.model, tmp_path / "trained")
    config = {"base_model": str(tiny_llama_tied_dir), "tasks_dir": str(data), "n_shots": [1], "shots": "per_class",
              "adapt": {"lr": 0.1, "steps": 1, "batch_size": 3}, "base_adapters_from": "meta",
              "data": {"chat_template": "none", "max_length": 64}, "output_dir": str(tmp_path / "bench"),
              "methods": [{"name": "meta", "checkpoint": str(checkpoint)},
                          {"name": "sft", "checkpoint": str(checkpoint)}]}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    assert main(["bench", "--config", str(tmp_path / "bench.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "base_adapters_from:" in err[0] and CONFIG_FILE in err[0], err
    assert not (tmp_path / "bench" / "base_adapters").exists()
    (checkpoint / CONFIG_FILE).write_text(saved.to_yaml())
    assert main(["bench", "--config", str(tmp_path / "bench.yaml")]) == 0
    adapter = json.loads((tmp_path / "bench" / "base_adapters" / "adapter_config.json").read_text())
    assert adapter["r"] == 3 and adapter["lora_alpha"] == 6 and set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    result = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert result["methods"]["base"]["checkpoint"] == str(tmp_path / "bench" / "base_adapters")


def test_fresh_base_adapters_keep_a_full_head_and_reload_as_the_base(tmp_path, tiny_llama_tied_dir):
    """base_adapters_from with model.lora_full_head: the saved base has the full-rank head adapter
    (rank = hidden, A = I, B = 0), and loads back as a checkpoint computing the base's logits."""
    from transformers import AutoModelForCausalLM

    from metasft.bench.methods import base_with_fresh_adapters
    from metasft.checkpoint import load_pretrained
    from metasft.config import ModelConfig

    like = ModelConfig(lora_rank=2, lora_alpha=4, target_modules=["lm_head"], lora_full_head=True)
    out = base_with_fresh_adapters(str(tiny_llama_tied_dir), like, tmp_path / "base_adapters")
    adapted, _, _ = load_pretrained(out)
    hidden = adapted.config.hidden_size
    assert json.loads((out / "adapter_config.json").read_text())["rank_pattern"] == {"lm_head": hidden}
    head = adapted.get_output_embeddings()
    assert torch.equal(head.lora_A["default"].weight, torch.eye(hidden))
    assert not head.lora_B["default"].weight.any()
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_tied_dir)
    assert torch.allclose(adapted(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-6)


def test_bench_prefix_cache_dir_shares_the_frozen_layers_states_and_changes_no_score(tmp_path, tiny_llama_tied_dir):
    """With a head-only adapter every decoder layer is frozen: ``prefix_cache_dir`` keeps each
    evaluated row's states there, one folder for every method of that frozen model; the scores equal
    a bench that keeps them in memory, and a second bench computes no row again."""
    from metasft.bench.methods import base_with_fresh_adapters
    from metasft.config import ModelConfig

    data = make_labelled_suite(tmp_path, n_held_out=2, n_validation=1)
    like = ModelConfig(lora_rank=2, lora_alpha=4, target_modules=["lm_head"], lora_full_head=True)
    adapters = base_with_fresh_adapters(str(tiny_llama_tied_dir), like, tmp_path / "head_adapters")
    config = {"base_model": str(adapters), "tasks_dir": str(data), "n_shots": [1], "shots": "per_class",
              "adapt": {"lr_grid": [0.1, 1.0], "steps": 2, "batch_size": 3, "inner_scope": "head",
                        "select_lr_by": "query_loss"},
              "eval": {"max_new_tokens": 3}, "data": {"chat_template": "none", "max_length": 64},
              "methods": [{"name": "sft", "checkpoint": str(adapters)}]}

    def bench(name, **extra):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**config, **extra, "output_dir": str(tmp_path / name)}))
        assert main(["bench", "--config", str(tmp_path / f"{name}.yaml")]) == 0
        return list(csv.DictReader(open(tmp_path / name / "results.csv")))

    in_memory = bench("memory")
    cache = tmp_path / "cache"
    on_disk = bench("disk", prefix_cache_dir=str(cache))
    (folder,) = list(cache.iterdir())  # base and sft: one frozen model, one folder
    stamps = {f: f.stat().st_mtime_ns for f in folder.glob("*.pt")}
    # The validation task's and both held-out tasks' query rows and shots: 3 tasks × (6 + 3) rows.
    assert len(stamps) == 3 * (6 + 3)
    for a, b in zip(in_memory, on_disk):
        assert (a["method"], a["task"], a["adapt_lr"], a["exact_match"]) == (b["method"], b["task"], b["adapt_lr"],
                                                                           b["exact_match"])
        assert float(a["query_loss"]) == pytest.approx(float(b["query_loss"]), rel=1e-5)
    assert bench("again", prefix_cache_dir=str(cache)) == on_disk
    assert {f: f.stat().st_mtime_ns for f in folder.glob("*.pt")} == stamps
