"""`metasft train` end to end on a tiny Llama: the exact one-step update of every algorithm,
LoRA scope, checkpoints that load with transformers/peft, and bit-exact resume."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from metasft.cli import main
from metasft.data.collate import collate
from metasft.data.formatting import rows_to_examples
from metasft.data.io import read_rows
from metasft.data.tokenize import encode_examples

from conftest import write_tasks
from references import ref_adapt, ref_loss

N_TASKS, N_SUPPORT, N_QUERY, INNER_LR, K = 3, 4, 3, 0.2, 2

EXACT = ["optim.name=sgd", "meta.outer_lr=1", "optim.clip_grad=null", "optim.weight_decay=0",
         "trainer.total_training_steps=1", "trainer.precision=fp32", f"meta.meta_batch_size={N_TASKS}",
         "meta.inner_batch_size=64", "meta.query_batch_size=64", f"meta.inner_lr={INNER_LR}",
         f"meta.num_inner_steps={K}", "data.chat_template=none", "optim.lr_scheduler=constant",
         "trainer.logger=[jsonl]", "trainer.device=cpu"]


def run_train(model_dir, run_dir, overrides, algorithm="fomaml"):
    code = main(["train", f"model.partial_pretrain={model_dir}", f"meta.algorithm={algorithm}",
                 f"trainer.default_local_dir={run_dir}", *overrides])
    assert code == 0


def whole_set_batches(task_dir, tokenizer):
    batches = []
    for split in ("support", "query"):
        examples, _ = rows_to_examples(read_rows(task_dir / f"{split}.parquet"), split)
        batches.append(collate(encode_examples(examples, tokenizer, 1024, chat_template="none"), tokenizer.pad_token_id))
    return batches


def reference_meta_gradient(model, algorithm, tasks_root, tokenizer):
    """Float64 meta-gradient over all tasks, whole sets as batches (every inner step the same)."""
    model = model.double()
    theta = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in theta.items()}
    for t in range(N_TASKS):
        support, query = whole_set_batches(tasks_root / f"task{t}", tokenizer)
        if algorithm == "maml":
            from torch.func import functional_call
            from torch.nn.attention import SDPBackend, sdpa_kernel

            names = list(theta)
            call = lambda w, b: ref_loss(lambda **kw: functional_call(model, dict(zip(names, w)), args=(), kwargs=kw), b)  # noqa: E731
            with sdpa_kernel(SDPBackend.MATH):
                fast = list(theta.values())
                for _ in range(K):
                    grads = torch.autograd.grad(call(fast, support), fast, create_graph=True)
                    fast = [w - INNER_LR * g for w, g in zip(fast, grads)]
                grads = torch.autograd.grad(call(fast, query), list(theta.values()))
            contribution = dict(zip(names, grads))
        else:
            adapted = ref_adapt(model, [support] * K, lr=INNER_LR)
            if algorithm == "fomaml":
                adapted.zero_grad()
                ref_loss(adapted, query).backward()
                contribution = {n: p.grad for n, p in adapted.named_parameters() if n in theta}
            else:  # reptile
                contribution = {n: theta[n].detach() - p.detach() for n, p in adapted.named_parameters() if n in theta}
        for n in total:
            total[n] += contribution[n] / N_TASKS
    return total


def moved_by_minus(before, after, grads) -> float:
    """‖(after − before) + grads‖ / ‖grads‖ over the meta-learned parameters."""
    after = dict(after.named_parameters())
    deltas = {n: after[n].detach().double() - p.detach().double() for n, p in before.named_parameters() if n in grads}
    num = sum(((deltas[n] + grads[n]) ** 2).sum() for n in grads) ** 0.5
    den = sum((grads[n] ** 2).sum() for n in grads) ** 0.5
    return float(num / den)


# The sequential engine (task_batching=false) and the batched one (true) must both take the step.
@pytest.mark.parametrize("batching", ["false", "true"])
@pytest.mark.parametrize("algorithm", ["fomaml", "maml", "reptile"])
def test_one_sgd_meta_step_moves_weights_by_minus_the_meta_gradient(tmp_path, tiny_llama_tied_dir, tokenizer,
                                                                    algorithm, batching):
    overrides = write_tasks(tmp_path / "tasks", N_TASKS, N_SUPPORT, N_QUERY)
    run_train(tiny_llama_tied_dir, tmp_path / "run", EXACT + overrides + [f"meta.task_batching={batching}"], algorithm)
    grads = reference_meta_gradient(AutoModelForCausalLM.from_pretrained(tiny_llama_tied_dir), algorithm,
                                    tmp_path / "tasks", tokenizer)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "step_1")
    assert moved_by_minus(AutoModelForCausalLM.from_pretrained(tiny_llama_tied_dir), after, grads) <= 1e-4
    assert after.lm_head.weight is after.model.embed_tokens.weight  # still tied after the update


@pytest.mark.parametrize("algorithm", ["fomaml", "maml", "reptile"])
def test_one_sgd_meta_step_on_lora_adapters_with_task_batching(tmp_path, tiny_llama_dir, tokenizer, algorithm):
    """META-LoRA scope through `metasft train` with task batching on: the adapters move by minus
    the float64 reference meta-gradient, computed from the run's own initial adapters."""
    from peft import AutoPeftModelForCausalLM

    from metasft.config import load_config
    from metasft.distributed import DistEnv
    from metasft.train import Trainer

    overrides = write_tasks(tmp_path / "tasks", N_TASKS, N_SUPPORT, N_QUERY)
    args = EXACT + overrides + ["meta.task_batching=true", "model.lora_rank=4", "model.lora_alpha=8"]
    run_train(tiny_llama_dir, tmp_path / "run", args, algorithm)
    # The initial adapters: a trainer built from the same config draws the same lora_A (seeded).
    initial = Trainer(load_config(overrides=[f"model.partial_pretrain={tiny_llama_dir}", f"meta.algorithm={algorithm}",
                                             f"trainer.default_local_dir={tmp_path / 'init'}", *args]), DistEnv()).model
    grads = reference_meta_gradient(initial, algorithm, tmp_path / "tasks", tokenizer)
    assert grads and all("lora_" in n for n in grads)
    after = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run" / "step_1")
    assert moved_by_minus(initial, after, grads) <= 1e-4


def test_lora_run_keeps_base_weights_and_saves_a_peft_adapter(tmp_path, tiny_llama_dir):
    from peft import AutoPeftModelForCausalLM

    overrides = write_tasks(tmp_path / "tasks", N_TASKS, N_SUPPORT, N_QUERY)
    run_train(tiny_llama_dir, tmp_path / "run", EXACT + overrides + [
        "model.lora_rank=4", "model.lora_alpha=8", "trainer.total_training_steps=2", "optim.name=adamw",
        "meta.outer_lr=0.01"])
    step = tmp_path / "run" / "step_2"
    assert (step / "adapter_model.safetensors").is_file() and not (step / "model.safetensors").exists()
    peft_model = AutoPeftModelForCausalLM.from_pretrained(step)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    base_state = base.state_dict()
    lora_b_moved = False
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            lora_b_moved |= "lora_B" in name and bool(param.abs().sum() > 0)
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(param, base_state[key]), name
    assert lora_b_moved
    assert len(load_file(step / "adapter_model.safetensors")) > 0


@pytest.mark.parametrize("lora", [False, True])
def test_resume_continues_the_same_trajectory(tmp_path, tiny_llama_dir, lora):
    weights_file = "adapter_model.safetensors" if lora else "model.safetensors"
    overrides = (["model.lora_rank=4", "model.lora_alpha=8"] if lora else []) + write_tasks(tmp_path / "tasks", 4, 8, 4) + [
        "meta.meta_batch_size=2", "meta.inner_batch_size=3", "meta.query_batch_size=3", "meta.num_inner_steps=2",
        "trainer.total_training_steps=4", "trainer.save_freq=2", "optim.name=adamw", "meta.outer_lr=0.003",
        "optim.lr_scheduler=cosine", "optim.warmup_steps_ratio=0.25", "data.chat_template=none",
        "trainer.logger=[jsonl]", "trainer.device=cpu"]
    run_train(tiny_llama_dir, tmp_path / "straight", overrides)
    run_train(tiny_llama_dir, tmp_path / "broken", overrides + ["trainer.total_training_steps=4"])
    # Interrupt after step 2: drop what came later and resume from the step-2 checkpoint.
    import shutil

    shutil.rmtree(tmp_path / "broken" / "step_4")
    run_train(tiny_llama_dir, tmp_path / "broken", overrides)
    a = load_file(tmp_path / "straight" / "step_4" / weights_file)
    b = load_file(tmp_path / "broken" / "step_4" / weights_file)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if not lora:
        first = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
        assert any(not torch.equal(a[k], first[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "broken" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_train_logs_metrics_and_held_out_evaluation(tmp_path, tiny_llama_dir):
    overrides = write_tasks(tmp_path / "tasks", 4, 6, 4, held_out=1) + [
        "meta.meta_batch_size=2", "meta.inner_batch_size=3", "meta.query_batch_size=4", "meta.num_inner_steps=2",
        "meta.inner_lr=0.05", "meta.outer_lr=0.003", "trainer.total_training_steps=3", "trainer.test_freq=3",
        "trainer.keep=1", "trainer.save_freq=1", "data.chat_template=none", "trainer.logger=[jsonl,tensorboard]",
        "trainer.precision=bf16", "trainer.device=cpu"]
    run_train(tiny_llama_dir, tmp_path / "run", overrides)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    last = records[-1]
    for key in ("query_loss_pre", "query_loss_post", "tokens_per_s", "grad_norm", "heldout/query_loss_pre",
                "heldout/query_loss_post"):
        assert isinstance(last[key], float), key
    assert [p.name for p in (tmp_path / "run").glob("step_*")] == ["step_3"]  # keep=1
    assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_periodic_evaluation_uses_validation_tasks_only(tmp_path, tiny_llama_dir):
    """With a validation task in the data, the run is watched on it alone (val/...), never on the
    test tasks; its pre-adaptation loss is the checkpoint's loss on the validation query set."""
    override = write_tasks(tmp_path / "tasks", 4, 6, 4, held_out=1)[0]
    override = override.replace("task2/query.parquet], held_out: false", "task2/query.parquet], validation: true")
    overrides = [override, "meta.meta_batch_size=2", "meta.inner_batch_size=3", "meta.query_batch_size=4",
                 "meta.num_inner_steps=2", "meta.inner_lr=0.05", "meta.outer_lr=0.003", "trainer.total_training_steps=4",
                 "trainer.test_freq=2", "trainer.test_exact_match_rows=3", "data.chat_template=none",
                 "trainer.logger=[jsonl]", "trainer.device=cpu"]
    run_train(tiny_llama_dir, tmp_path / "run", overrides)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "val/query_loss_post" in r]
    assert [r["step"] for r in evaluated] == [2, 4]
    assert not any(key.startswith("heldout/") for r in records for key in r)
    assert all(0.0 <= r["val/exact_match"] <= 1.0 for r in evaluated)
    seconds = [r["train_seconds"] for r in records]
    assert seconds == sorted(seconds) and seconds[0] > 0
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "step_4"), "--data",
                 str(tmp_path / "tasks" / "task2" / "query.parquet"), "--no-generation",
                 "--output", str(tmp_path / "eval.json")]) == 0
    expected = json.loads((tmp_path / "eval.json").read_text())["query_loss"]
    assert evaluated[-1]["val/query_loss_pre"] == pytest.approx(expected, rel=1e-5)


def test_sft_baseline_trains(tmp_path, tiny_llama_dir):
    overrides = write_tasks(tmp_path / "tasks", 3, 6, 4) + [
        "meta.meta_batch_size=3", "meta.inner_batch_size=4", "meta.outer_lr=0.01", "trainer.total_training_steps=4",
        "data.chat_template=none", "trainer.logger=[jsonl]", "trainer.device=cpu"]
    run_train(tiny_llama_dir, tmp_path / "run", overrides, algorithm="sft")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0]


@pytest.mark.parametrize("chat,loss", [(False, "target"), (True, "all")], ids=["raw-target", "chat-all"])
def test_one_metaicl_step_equals_plain_sft_on_the_concatenated_sequences(tmp_path, tiny_llama_dir, tokenizer, chat, loss):
    """MetaICL (issue 15): with one support and one query row per task and one demonstration, each
    training row is the *other* row then this one. One SGD(lr=1) metaicl step must equal one sft
    step on a suite whose rows are those concatenations written out: raw text with the loss on the
    final response (prompt = demo + EOS + prompt), or a chat conversation with the loss on every
    assistant turn (plain multi-turn SFT)."""
    from conftest import cipher_rows, write_task_files

    pairs = [cipher_rows(2000 + t, 2) for t in range(N_TASKS)]
    eos = tokenizer.eos_token
    joined = []
    for a, b in pairs:
        rows = []
        for demo, target in ((b, a), (a, b)):
            if chat:
                rows.append({"messages": [{"role": "user", "content": demo["prompt"]},
                                          {"role": "assistant", "content": demo["response"]},
                                          {"role": "user", "content": target["prompt"]},
                                          {"role": "assistant", "content": target["response"]}]})
            else:
                rows.append({"prompt": demo["prompt"] + demo["response"] + eos + target["prompt"],
                             "response": target["response"]})
        joined.append(([rows[0]], [rows[1]]))
    template = "auto" if chat else "none"
    common = [o.replace("data.chat_template=none", f"data.chat_template={template}") for o in EXACT]
    icl = write_task_files(tmp_path / "icl", [([a], [b]) for a, b in pairs])
    run_train(tiny_llama_dir, tmp_path / "metaicl", common + icl + ["meta.metaicl_demos=1", f"meta.metaicl_loss={loss}"],
              algorithm="metaicl")
    run_train(tiny_llama_dir, tmp_path / "sft", common + write_task_files(tmp_path / "joined", joined), algorithm="sft")
    if not chat:  # the written-out prompt tokenises to the same ids as the pieces joined token by token
        from metasft.data.formatting import Example
        from metasft.data.in_context import render_in_context
        from metasft.data.tokenize import encode_example

        a, b = pairs[0]
        rendered, _ = render_in_context([Example(**b)], Example(**a), tokenizer, max_length=256, chat_template="none")
        written = encode_example(Example(**joined[0][0][0]), tokenizer, 256, chat_template="none")
        assert rendered.input_ids == written.input_ids and rendered.target_mask == written.target_mask
    before = load_file(tiny_llama_dir / "model.safetensors")
    via_icl = load_file(tmp_path / "metaicl" / "step_1" / "model.safetensors")
    via_sft = load_file(tmp_path / "sft" / "step_1" / "model.safetensors")
    assert any(not torch.equal(via_icl[k], before[k]) for k in before)
    for k in before:
        torch.testing.assert_close(via_icl[k], via_sft[k], rtol=0, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_fomaml_update(tmp_path, tiny_llama_dir):
    overrides = write_tasks(tmp_path / "tasks", N_TASKS, N_SUPPORT, N_QUERY)
    run_train(tiny_llama_dir, tmp_path / "plain", EXACT + overrides)
    run_train(tiny_llama_dir, tmp_path / "ckpt", EXACT + overrides + ["model.enable_gradient_checkpointing=true"])
    a = load_file(tmp_path / "plain" / "step_1" / "model.safetensors")
    b = load_file(tmp_path / "ckpt" / "step_1" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_maml_with_gradient_checkpointing_is_refused(tmp_path, tiny_llama_dir, capsys):
    overrides = write_tasks(tmp_path / "tasks", N_TASKS, N_SUPPORT, N_QUERY)
    code = main(["train", f"model.partial_pretrain={tiny_llama_dir}", "meta.algorithm=maml",
                 "model.enable_gradient_checkpointing=true", *overrides])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.enable_gradient_checkpointing" in err[0]
