"""Learned inner rates through the commands (issue 16): one SGD(lr=1) `metasft train` step moves θ
and every α by exactly minus their float64 meta-gradients (MAML, per_tensor; α projected to ≥ 0); `metasft adapt` adapts
with the saved rates unless --lr is given; `metasft bench` uses them and plots them."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from metasft.cli import main

from conftest import write_tasks
from references import ref_loss
from test_train_cli import EXACT, INNER_LR, K, N_TASKS, N_SUPPORT, N_QUERY, whole_set_batches


def test_one_sgd_step_moves_theta_and_rates_by_minus_their_meta_gradients(tmp_path, tiny_llama_dir, tokenizer):
    from torch.func import functional_call
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tasks = write_tasks(tmp_path / "tasks", N_TASKS, N_SUPPORT, N_QUERY)
    assert main(["train", f"model.partial_pretrain={tiny_llama_dir}", "meta.algorithm=maml", *EXACT, *tasks,
                 "meta.learn_inner_lr=per_tensor", "meta.inner_lr_lr=1", "meta.task_batching=false",
                 f"trainer.default_local_dir={tmp_path / 'run'}"]) == 0
    # Reference: float64, every inner step on the whole support set, α = inner_lr per tensor as leaves.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).double()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    theta = [p for p in model.parameters() if p.requires_grad]
    alphas = [torch.tensor(INNER_LR, dtype=torch.float64, requires_grad=True) for _ in names]
    call = lambda w, b: ref_loss(lambda **kw: functional_call(model, dict(zip(names, w)), args=(), kwargs=kw), b)  # noqa: E731
    total = 0.0
    with sdpa_kernel(SDPBackend.MATH):
        for t in range(N_TASKS):
            support, query = whole_set_batches(tmp_path / "tasks" / f"task{t}", tokenizer)
            fast = list(theta)
            for _ in range(K):
                grads = torch.autograd.grad(call(fast, support), fast, create_graph=True)
                fast = [w - a * g for w, a, g in zip(fast, alphas, grads)]
            total = total + call(fast, query) / N_TASKS
        grads = torch.autograd.grad(total, theta + alphas)
    theta_grads, alpha_grads = grads[:len(theta)], grads[len(theta):]
    step = tmp_path / "run" / "step_1"
    after = dict(AutoModelForCausalLM.from_pretrained(step).named_parameters())
    num = sum(float(((after[n].double() - p.double()) + g).detach().pow(2).sum()) for n, p, g in zip(names, theta, theta_grads))
    den = sum(float(g.pow(2).sum()) for g in theta_grads)
    assert (num / den) ** 0.5 <= 1e-4
    rates = load_file(step / "inner_lrs.safetensors")
    assert list(rates) == sorted(names) or set(rates) == set(names)
    got = torch.stack([rates[n].double() for n in names])
    stepped = INNER_LR - torch.stack([g.detach() for g in alpha_grads])
    # Projected SGD: α − ∂L/∂α, and 0 where that is negative (both happen at lr 1 here).
    assert bool((stepped < 0).any()) and bool((stepped > 0).any())
    expected = stepped.clamp(min=0)
    assert float((got - expected).norm() / (stepped - INNER_LR).norm()) <= 1e-4
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["inner_lr_mean"] == pytest.approx(float(torch.stack([rates[n] for n in names]).mean()), rel=1e-6)


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("learned")
    tasks = write_tasks(root / "tasks", 3, 8, 4, held_out=1)
    assert main(["train", f"model.partial_pretrain={tiny_llama_dir}", "meta.algorithm=fomaml", "meta.meta_batch_size=2",
                 "meta.inner_batch_size=8", "meta.num_inner_steps=2", "meta.inner_lr=0.1", "meta.outer_lr=0.003",
                 "meta.learn_inner_lr=per_tensor_per_step", "meta.inner_lr_lr=0.05", "trainer.total_training_steps=3",
                 "data.chat_template=none", "trainer.logger=[jsonl]", f"trainer.default_local_dir={root / 'run'}",
                 *tasks]) == 0
    return root


def test_adapt_uses_the_learned_rates_unless_lr_is_given(tmp_path, learned_run):
    step = learned_run / "run" / "step_3"
    data = learned_run / "tasks" / "task2" / "support.parquet"
    rates = load_file(step / "inner_lrs.safetensors")
    assert any(float((v - 0.1).abs().max()) > 1e-4 for v in rates.values())  # they were learnt
    assert main(["adapt", "--checkpoint", str(step), "--data", str(data), "--n-shots", "8",
                 "--output", str(tmp_path / "learned")]) == 0
    assert json.loads((tmp_path / "learned" / "adapt_info.json").read_text())["lr"] == "learned"
    # Reference: 2 SGD steps on the whole 8-row set, each tensor at its own step's α.
    from metasft.data.collate import collate
    from metasft.data.formatting import rows_to_examples
    from metasft.data.io import read_rows
    from metasft.data.tokenize import encode_examples
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(step)
    examples, _ = rows_to_examples(read_rows(data), "s")
    batch = collate(encode_examples(examples, tok, 1024, chat_template="none"), tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(step)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for k in range(2):
        model.zero_grad(set_to_none=True)
        ref_loss(model, batch).backward()
        with torch.no_grad():
            for n, p in params.items():
                p -= rates[n][k] * p.grad
    adapted = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "learned").named_parameters())
    for n, p in params.items():
        torch.testing.assert_close(adapted[n], p.detach(), rtol=1e-4, atol=1e-6)
    # --lr: one fixed rate instead, a different model.
    assert main(["adapt", "--checkpoint", str(step), "--data", str(data), "--n-shots", "8", "--lr", "0.1",
                 "--output", str(tmp_path / "fixed")]) == 0
    fixed = load_file(tmp_path / "fixed" / "model.safetensors")
    assert json.loads((tmp_path / "fixed" / "adapt_info.json").read_text())["lr"] == 0.1
    assert any(not torch.equal(fixed[k], load_file(tmp_path / "learned" / "model.safetensors")[k]) for k in fixed)


def run_bench_on_learned_run(tmp_path, tiny_llama_dir, learned_run, optimizer, lr_grid):
    """bench the learned-rate checkpoint and the base with ``optimizer`` at ``lr_grid``; returns the output dir."""
    from test_bench_cli import make_prepared_suite

    data = make_prepared_suite(tmp_path, n_validation=1)
    config = {"base_model": str(tiny_llama_dir), "tasks_dir": str(data), "n_shots": [4], "seeds": [0],
              "adapt": {"optimizer": optimizer, "lr_grid": lr_grid, "steps": 2, "batch_size": 4},
              "data": {"chat_template": "none", "max_length": 64},
              "methods": [{"name": "learned", "checkpoint": str(learned_run / "run" / "step_3")},
                          {"name": "sft", "checkpoint": str(tiny_llama_dir)}],
              "output_dir": str(tmp_path / "bench")}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    assert main(["bench", "--config", str(tmp_path / "bench.yaml")]) == 0
    return tmp_path / "bench"


def test_bench_adapts_with_the_learned_rates_and_plots_them(tmp_path, tiny_llama_dir, learned_run):
    out = run_bench_on_learned_run(tmp_path, tiny_llama_dir, learned_run, "sgd", [0.05, 0.2])
    result = json.loads((out / "results.json").read_text())
    assert result["methods"]["learned"]["adapt_lr"] == {"4": None}  # no grid for it: its own rates
    assert result["methods"]["base"]["adapt_lr"]["4"] in (0.05, 0.2)
    assert "| learned | gradient | 4 | 4.0 | learned |" in (out / "results.md").read_text()
    assert (out / "inner_lrs.png").stat().st_size > 10_000


def test_bench_with_adamw_adapts_every_method_at_a_chosen_lr_and_ignores_learned_rates(tmp_path, tiny_llama_dir,
                                                                                       learned_run):
    """``adapt.optimizer: adamw``: learned rates are SGD step sizes, so with AdamW every method, the
    learned-rate checkpoint included, adapts at the lr chosen on validation tasks, and none is plotted."""
    out = run_bench_on_learned_run(tmp_path, tiny_llama_dir, learned_run, "adamw", [0.001, 0.01])
    result = json.loads((out / "results.json").read_text())
    assert result["methods"]["learned"]["adapt_lr"]["4"] in (0.001, 0.01)
    assert "learned_inner_lrs" not in result["methods"]["learned"]
    assert not (out / "inner_lrs.png").exists()
