"""Outer-loop options the docs promise, each against what it must do: SGD momentum and L2 weight
decay (torch.optim.SGD on the float64 reference gradients), ``trainer.time_budget_s`` (budgeted
in a way that cannot depend on the machine's speed), and the learned inner rates' own rules (their
own optimizer group: no weight decay, never clipped, the same schedule)."""

import pytest
import torch

from metasft.config import load_config
from metasft.distributed import DistEnv
from metasft.train import Trainer

from ref_data import rel_err, write_uneven_tasks
from test_outer_step import BASE, SPECS, at, base64, fp32_state, moved, ref_meta_gradient, run_train, saved_weights  # noqa: F401 (fixture)


def test_sgd_momentum_and_weight_decay_equal_torch_sgd(tmp_path, tiny_llama_dir, tokenizer, base64):
    momentum, decay, lr = 0.9, 0.05, 0.5
    overrides, tasks = write_uneven_tasks(tmp_path / "tasks", SPECS)
    run_train(tiny_llama_dir, tmp_path / "run", BASE + overrides + [
        f"meta.outer_lr={lr}", f"optim.momentum={momentum}", f"optim.weight_decay={decay}",
        "trainer.total_training_steps=2", "trainer.save_freq=1"], "sft")
    state = fp32_state(base64)
    params = {n: torch.nn.Parameter(t.double().clone()) for n, t in state.items()}
    optimizer = torch.optim.SGD(params.values(), lr=lr, momentum=momentum, weight_decay=decay, foreach=False)
    for step in (1, 2):
        g = ref_meta_gradient(at(base64, {n: p.detach() for n, p in params.items()}), "sft", tasks, tokenizer)
        for n, p in params.items():
            p.grad = g[n]
        optimizer.step()
        expected = {n: p.detach() for n, p in params.items()}
        assert rel_err(moved(state, saved_weights(tmp_path / "run", step)), moved(state, expected)) <= 1e-4, step
    # Without momentum the second step lands elsewhere: the option is honoured.
    run_train(tiny_llama_dir, tmp_path / "plain", BASE + overrides + [
        f"meta.outer_lr={lr}", f"optim.weight_decay={decay}", "trainer.total_training_steps=2"], "sft")
    assert rel_err(moved(state, saved_weights(tmp_path / "plain", 2)), moved(state, expected)) > 0.05


@pytest.mark.parametrize("budget,steps", [(1e-9, 0), (1e9, 3)])
def test_time_budget_stops_and_saves_at_a_meta_step_boundary(tmp_path, tiny_llama_dir, budget, steps):
    """A budget no meta-step fits in (1 ns) stops before the first and saves step 0; one no run can
    exhaust (31 years) runs every step. Neither depends on how fast this machine is."""
    overrides, _ = write_uneven_tasks(tmp_path / "tasks", SPECS)
    run_train(tiny_llama_dir, tmp_path / "run", BASE + overrides + [
        f"trainer.time_budget_s={budget}", "trainer.total_training_steps=3"], "fomaml")
    assert sorted(p.name for p in (tmp_path / "run").glob("step_*")) == [f"step_{steps}"]


def test_learned_rates_have_no_weight_decay_no_clipping_and_the_schedule(tmp_path, tiny_llama_dir):
    """One SGD meta-step with heavy L2 decay, a clip far below the gradient's norm and a warmup that
    halves the first step's lr: θ feels all three, the rates move by exactly −(lr·½)·∇α."""
    overrides, _ = write_uneven_tasks(tmp_path / "tasks", SPECS)
    rate_lr = 0.02

    def trainer(extra):
        cfg = load_config(overrides=[f"model.partial_pretrain={tiny_llama_dir}", "meta.algorithm=fomaml", *BASE,
                                     *overrides, "meta.learn_inner_lr=per_tensor", f"meta.inner_lr_lr={rate_lr}",
                                     "trainer.total_training_steps=4", "optim.warmup_steps_ratio=0.5", *extra,
                                     f"trainer.default_local_dir={tmp_path / str(len(extra))}"])
        return Trainer(cfg, DistEnv())

    moved_rates, moved_theta = {}, {}
    for name, extra in (("plain", []), ("decayed_clipped", ["optim.weight_decay=0.5", "optim.clip_grad=1e-6"])):
        t = trainer(extra)
        rates = [r.detach().clone() for r in t.engine.rates]
        theta = [p.detach().clone() for p in t.engine.params]
        t.meta_step(want_logs=False)
        grads = [g.clone() for g in t.engine.rates_meta_grad]
        assert any(float(g.abs().max()) > 0 for g in grads)
        # Warmup over 2 of 4 steps: the first step runs at half the rates' learning rate.
        for before, after, g in zip(rates, t.engine.rates, grads):
            torch.testing.assert_close(after.detach(), (before - 0.5 * rate_lr * g).clamp(min=0), rtol=1e-6, atol=1e-9)
        moved_rates[name] = [a.detach() - b for a, b in zip(t.engine.rates, rates)]
        moved_theta[name] = [a.detach() - b for a, b in zip(t.engine.params, theta)]
    assert all(torch.equal(a, b) for a, b in zip(moved_rates["plain"], moved_rates["decayed_clipped"]))
    norm = lambda ts: float(sum((x.double() ** 2).sum() for x in ts) ** 0.5)  # noqa: E731
    assert norm(moved_theta["decayed_clipped"]) != pytest.approx(norm(moved_theta["plain"]), rel=1e-2)
