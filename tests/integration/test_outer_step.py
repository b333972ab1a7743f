"""The outer step of `metasft train`, number for number: the multi-task SFT baseline's meta-gradient
(SPEC §3, normalised by the global target-token count, §2.3), AdamW with the configured betas, eps
and weight decay, global-norm clipping, the learning-rate schedule, and the metrics it logs.

Every reference is computed here from the update rules: float64 gradients of a hand-written loss
(``references.ref_loss``) on batches built by hand from the tokenizer (``ref_data.ref_batch``), and
PyTorch's own non-fused ``torch.optim.AdamW`` / ``clip_grad_norm_`` on those gradients. Tasks have
different numbers of rows *and* of target tokens per row, and every batch size is at least the data
it draws from, so every batch is a whole set and the sampler's draw cannot matter (SPEC §3).
"""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from metasft.cli import main
from metasft.config import Config
from metasft.train import learning_rate

from ref_data import num_targets, ref_batch, rel_err, write_uneven_tasks
from references import ref_adapt, ref_loss

# (support rows, query rows, symbols per row): ~3, ~6 and ~10 target tokens per row.
SPECS = [(2, 2, 2), (3, 2, 5), (4, 3, 9)]
INNER_LR, K = 0.2, 2

BASE = ["optim.name=sgd", "meta.outer_lr=1", "optim.clip_grad=null", "optim.weight_decay=0", "optim.momentum=0",
        "trainer.total_training_steps=1", "trainer.precision=fp32", f"meta.meta_batch_size={len(SPECS)}",
        "meta.inner_batch_size=64", "meta.query_batch_size=64", f"meta.inner_lr={INNER_LR}",
        f"meta.num_inner_steps={K}", "data.chat_template=none", "optim.lr_scheduler=constant",
        "optim.warmup_steps_ratio=0", "trainer.logger=[jsonl]", "trainer.device=cpu"]


def run_train(model_dir, run_dir, overrides, algorithm):
    code = main(["train", f"model.partial_pretrain={model_dir}", f"meta.algorithm={algorithm}",
                 f"trainer.default_local_dir={run_dir}", *overrides])
    assert code == 0


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def saved_weights(run_dir, step):
    return load_file(run_dir / f"step_{step}" / "model.safetensors")


@pytest.fixture(scope="module")
def base64(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32).double()
    model.train()
    return model


def at(base, state):
    """A float64 copy of ``base`` holding the weights ``state``."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state[name].double())
    return model


def fp32_state(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def grads_of(model, loss):
    names, params = zip(*model.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True)))


def ref_meta_gradient(model, algorithm, tasks, tokenizer):
    """g of SPEC §3 at ``model``'s weights, float64, for whole-set batches."""
    if algorithm == "sft":
        # One batch pooling every task's support and query rows: its token mean is the global one.
        pooled = [row for task in tasks for row in task["support"] + task["query"]]
        return grads_of(model, ref_loss(model, ref_batch(pooled, tokenizer)))
    assert algorithm == "fomaml"
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for task in tasks:
        adapted = ref_adapt(model, [ref_batch(task["support"], tokenizer)] * K, INNER_LR)
        for n, g in grads_of(adapted, ref_loss(adapted, ref_batch(task["query"], tokenizer))).items():
            total[n] += g / len(tasks)
    return total


def moved(before, after):
    return {n: after[n].double() - before[n].double() for n in before}


# ----------------------------------------------------------------------------- SFT baseline

def test_sft_step_is_minus_the_global_token_mean_gradient(tmp_path, tiny_llama_dir, tokenizer, base64):
    overrides, tasks = write_uneven_tasks(tmp_path / "tasks", SPECS)
    run_train(tiny_llama_dir, tmp_path / "run", BASE + overrides, "sft")
    theta = fp32_state(base64)
    delta = moved(theta, saved_weights(tmp_path / "run", 1))

    g = ref_meta_gradient(base64, "sft", tasks, tokenizer)
    assert rel_err({n: -d for n, d in delta.items()}, g) <= 2e-5

    # The tasks really differ in target tokens, so a mean of per-task token means is another vector
    # — one this update must not match.
    counts = [num_targets(ref_batch(t["support"] + t["query"], tokenizer)) for t in tasks]
    assert len(set(counts)) == len(counts) and max(counts) >= 3 * min(counts)
    per_task = [grads_of(base64, ref_loss(base64, ref_batch(t["support"] + t["query"], tokenizer))) for t in tasks]
    wrong = {n: sum(p[n] for p in per_task) / len(tasks) for n in g}
    assert rel_err(wrong, g) > 0.05
    assert rel_err({n: -d for n, d in delta.items()}, wrong) > 0.05

    record = read_metrics(tmp_path / "run")[0]
    pooled = [row for task in tasks for row in task["support"] + task["query"]]
    with torch.no_grad():
        assert record["loss"] == pytest.approx(float(ref_loss(base64, ref_batch(pooled, tokenizer))), rel=1e-5)
    assert record["grad_norm"] == pytest.approx(float(sum((v ** 2).sum() for v in g.values()) ** 0.5), rel=1e-5)


# ----------------------------------------------------------------------------- AdamW

ADAMW = {"lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-5, "weight_decay": 0.3}
ADAMW_OVERRIDES = ["optim.name=adamw", f"meta.outer_lr={ADAMW['lr']}",
                   f"optim.betas=[{ADAMW['betas'][0]}, {ADAMW['betas'][1]}]", f"optim.eps={ADAMW['eps']}",
                   f"optim.weight_decay={ADAMW['weight_decay']}"]


def ref_adamw_run(base, tasks, tokenizer, algorithm, steps, **hyper):
    """θ after ``steps`` meta-steps: fp32 weights stepped by a non-fused ``torch.optim.AdamW`` with
    the float64 reference meta-gradient at the current weights (rounded to fp32, as .grad is)."""
    state = fp32_state(base)
    params = {n: torch.nn.Parameter(t.clone()) for n, t in state.items()}
    optimizer = torch.optim.AdamW(params.values(), foreach=False, fused=False, **hyper)
    for _ in range(steps):
        g = ref_meta_gradient(at(base, {n: p.detach() for n, p in params.items()}), algorithm, tasks, tokenizer)
        for n, p in params.items():
            p.grad = g[n].float()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {n: p.detach() for n, p in params.items()}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["sft", "fomaml"])
def test_adamw_steps_equal_torch_adamw_on_the_reference_meta_gradients(tmp_path, tiny_llama_dir, tokenizer, base64,
                                                                        algorithm):
    steps = 3
    overrides, tasks = write_uneven_tasks(tmp_path / "tasks", SPECS)
    run_train(tiny_llama_dir, tmp_path / "run", BASE + overrides + ADAMW_OVERRIDES +
              [f"trainer.total_training_steps={steps}"], algorithm)
    theta = fp32_state(base64)
    trained = saved_weights(tmp_path / "run", steps)
    expected = ref_adamw_run(base64, tasks, tokenizer, algorithm, steps, **ADAMW)
    # fp32 rounding of the meta-gradients, amplified by Adam's g/(√v + eps) where |g| ≲ eps (many
    # entries here are 1e-9..1e-6): a few 1e-5 of an element's movement at worst (3.5e-5 measured on an
    # AVX-512 Xeon, over the 3e-5 that held elsewhere), 1e-5 overall.
    for n in expected:
        torch.testing.assert_close(trained[n], expected[n], rtol=1e-4, atol=5e-3 * ADAMW["lr"], msg=n)
    assert rel_err(moved(theta, trained), moved(theta, expected)) <= 3e-5

    # Each setting is honoured: AdamW with the defaults for any one of them lands elsewhere.
    for key, default in (("betas", (0.9, 0.95)), ("eps", 1e-8), ("weight_decay", 0.0)):
        other = ref_adamw_run(base64, tasks, tokenizer, algorithm, steps, **{**ADAMW, key: default})
        assert rel_err(moved(theta, trained), moved(theta, other)) > 1e-2, key


# ----------------------------------------------------------------------------- clipping

@pytest.mark.parametrize("ratio", [0.25, 4.0])
def test_clip_grad_scales_the_meta_gradient_like_clip_grad_norm(tmp_path, tiny_llama_dir, tokenizer, base64, ratio):
    overrides, tasks = write_uneven_tasks(tmp_path / "tasks", SPECS)
    g = ref_meta_gradient(base64, "fomaml", tasks, tokenizer)
    norm = float(sum((v ** 2).sum() for v in g.values()) ** 0.5)
    clip = ratio * norm
    run_train(tiny_llama_dir, tmp_path / "run", BASE + overrides + [f"optim.clip_grad={clip!r}"], "fomaml")
    delta = moved(fp32_state(base64), saved_weights(tmp_path / "run", 1))

    params = {n: torch.nn.Parameter(torch.zeros_like(v)) for n, v in g.items()}
    for n, p in params.items():
        p.grad = g[n].clone()
    returned = torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
    assert float(returned) == pytest.approx(norm, rel=1e-12)
    clipped = {n: p.grad for n, p in params.items()}
    assert rel_err({n: -d for n, d in delta.items()}, clipped) <= 2e-5
    if ratio < 1:
        assert rel_err(clipped, g) == pytest.approx(1 - ratio, rel=1e-4)  # it really was scaled
    else:
        assert all(torch.equal(clipped[n], g[n]) for n in g)  # below the threshold nothing changes
    # The logged norm is the meta-gradient's, before clipping.
    assert read_metrics(tmp_path / "run")[0]["grad_norm"] == pytest.approx(norm, rel=1e-5)


# ----------------------------------------------------------------------------- learning-rate schedule

def closed_form_lr(base, total, warmup_ratio, schedule, floor, step):
    """Linear warmup to ``base`` over the first ⌊ratio·total⌋ steps ((s+1)/w, so no step has lr 0),
    then constant, or a decay from ``base`` that would reach ``floor·base`` at step ``total``."""
    warmup = int(warmup_ratio * total)
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / (total - warmup)
    if schedule == "constant":
        return base
    if schedule == "cosine":
        return base * floor + base * (1 - floor) * (1 + math.cos(math.pi * progress)) / 2
    return base * floor + base * (1 - floor) * (1 - progress)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("total,warmup_ratio,floor",
                         [(10, 0.0, 0.0), (10, 0.3, 0.1), (7, 0.5, 0.25), (10, 0.95, 0.3), (1, 0.0, 0.5)])
def test_learning_rate_matches_the_closed_form(schedule, total, warmup_ratio, floor):
    base = 0.02
    cfg = Config.from_dict({"meta": {"outer_lr": base}, "trainer": {"total_training_steps": total},
                            "optim": {"lr_scheduler": schedule, "warmup_steps_ratio": warmup_ratio,
                                      "min_lr_ratio": floor}})
    got = [learning_rate(cfg, s) for s in range(total)]
    want = [closed_form_lr(base, total, warmup_ratio, schedule, floor, s) for s in range(total)]
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    warmup = int(warmup_ratio * total)
    assert all(0 < lr <= base * (1 + 1e-12) for lr in got)
    if warmup:
        assert got[warmup - 1] == pytest.approx(base) and got[0] == pytest.approx(base / warmup)
    if warmup < total:
        assert got[warmup] == pytest.approx(base)  # decay starts at the peak
    if schedule != "constant" and total - warmup > 1:
        decay = got[warmup:]
        assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing
        assert decay[-1] > base * floor  # the floor is where it would be at step `total`


def test_logged_lr_follows_the_schedule_and_metrics_are_finite(tmp_path, tiny_llama_dir):
    overrides, _ = write_uneven_tasks(tmp_path / "tasks", SPECS)
    total = 5
    run_train(tiny_llama_dir, tmp_path / "run", BASE + overrides + [
        "optim.name=adamw", "meta.outer_lr=0.003", "optim.lr_scheduler=cosine", "optim.warmup_steps_ratio=0.41",
        "optim.min_lr_ratio=0.1", f"trainer.total_training_steps={total}", "optim.clip_grad=1.0",
        "meta.num_inner_steps=1"], "fomaml")
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, total + 1))
    want = [closed_form_lr(0.003, total, 0.41, "cosine", 0.1, s) for s in range(total)]
    assert [r["lr"] for r in records] == pytest.approx(want, rel=1e-12)
    # ⌊0.41·5⌋ = 2 warmup steps, then cosine over 3: 1/2, 1, 1, 0.1 + 0.9·(1 + cos(π/3))/2, ... of outer_lr
    assert [r["lr"] / 0.003 for r in records[:4]] == pytest.approx([0.5, 1.0, 1.0, 0.775])
    for record in records:
        for key in ("lr", "grad_norm", "query_loss_pre", "query_loss_post", "support_loss", "tokens", "tokens_per_s",
                    "step_time_s", "nonfinite_skipped"):
            value = record.get(key)
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
            assert math.isfinite(value), (key, value)
        assert record["nonfinite_skipped"] == 0 and record["tokens"] > 0
        assert record["query_loss_pre"] > 0 and record["query_loss_post"] > 0 and record["grad_norm"] > 0


@pytest.mark.slow
def test_the_scheduled_lr_is_the_one_applied(tmp_path, tiny_llama_dir, tokenizer, base64):
    """Two SGD steps under a linear decay: θ₁ = θ₀ − lr₀·g(θ₀), θ₂ = θ₁ − lr₁·g(θ₁)."""
    overrides, tasks = write_uneven_tasks(tmp_path / "tasks", SPECS)
    run_train(tiny_llama_dir, tmp_path / "run", BASE + overrides + [
        "meta.outer_lr=0.5", "optim.lr_scheduler=linear", "optim.min_lr_ratio=0.2", "trainer.total_training_steps=2",
        "trainer.save_freq=1"], "sft")
    lrs = [0.5, 0.5 * (0.2 + 0.8 * 0.5)]
    assert [r["lr"] for r in read_metrics(tmp_path / "run")] == pytest.approx(lrs, rel=1e-12)
    state = fp32_state(base64)
    for step, lr in enumerate(lrs, start=1):
        g = ref_meta_gradient(at(base64, state), "sft", tasks, tokenizer)
        saved = saved_weights(tmp_path / "run", step)
        assert rel_err(moved(state, saved), {n: -lr * g[n] for n in g}) <= 5e-5, step
        state = {n: (state[n].double() - lr * g[n]).float() for n in state}
