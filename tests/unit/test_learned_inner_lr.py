"""Learned inner learning rates (Meta-SGD / MAML++, issue 16): the α-gradients and θ-gradients of
the engine against independent float64 references, finite differences, and each other.

- MAML: an explicitly unrolled inner loop with α as autograd leaves (``ref_maml_rates``), and
  central finite differences of the adapted query loss in α.
- FOMAML: the first-order α-gradient −Σ_k ⟨∇_φ L_query(φ_K), g_k⟩ recomputed with deep copies and
  ``.grad`` (``ref_fomaml_rates``); with K = 1 it is the exact derivative, so it must equal MAML's
  and the finite difference too.
- The task-batched engine gives the same, per tensor and per tensor and step, full weights and LoRA."""

import copy

import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from metasft.algorithms import InnerLoop, build_algorithm
from metasft.config import MetaConfig
from metasft.model import trainable_named_parameters
from metasft.train import accumulate_meta_gradient

from references import ref_loss
from test_algorithms import load_double, make_episodes, rel_err

MODES = ("per_tensor", "per_tensor_per_step")


def initial_rates(named, mode, k, seed=0):
    """Distinct α per tensor (and step) around 0.2, so a mix-up of tensors or steps shows."""
    gen = torch.Generator().manual_seed(seed)
    shape = (k,) if mode == "per_tensor_per_step" else ()
    return {n: 0.1 + 0.2 * torch.rand(shape, generator=gen, dtype=torch.float64) for n, _ in named}


def _rate(alpha, step):
    return alpha if alpha.dim() == 0 else alpha[step]


def ref_maml_rates(model, episodes, rates):
    """(∇θ, ∇α) of mean_i L_query(φ_i) with φ unrolled through K steps φ ← φ − α ⊙ ∇L (graph kept)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    theta = [p for p in model.parameters() if p.requires_grad]
    alphas = [rates[n].clone().requires_grad_() for n in names]
    call = lambda w, b: ref_loss(lambda **kw: functional_call(model, dict(zip(names, w)), args=(), kwargs=kw), b)  # noqa: E731
    total = 0.0
    with sdpa_kernel(SDPBackend.MATH):
        for ep in episodes:
            fast = list(theta)
            for step, batch in enumerate(ep.support_batches):
                grads = torch.autograd.grad(call(fast, batch), fast, create_graph=True)
                fast = [w - _rate(a, step) * g for w, a, g in zip(fast, alphas, grads)]
            total = total + call(fast, ep.query_batch) / len(episodes)
        grads = torch.autograd.grad(total, theta + alphas)
    return list(grads[:len(theta)]), list(grads[len(theta):])


def adapted_loss(model, episodes, rates):
    """mean_i L_query(φ_i) with plain per-tensor SGD on deep copies (for finite differences)."""
    value = 0.0
    for ep in episodes:
        adapted = copy.deepcopy(model)
        named = [(n, p) for n, p in adapted.named_parameters() if p.requires_grad]
        for step, batch in enumerate(ep.support_batches):
            adapted.zero_grad(set_to_none=True)
            ref_loss(adapted, batch).backward()
            with torch.no_grad():
                for n, p in named:
                    p -= _rate(rates[n], step) * p.grad
        value += float(ref_loss(adapted, ep.query_batch).detach()) / len(episodes)
    return value


def ref_fomaml_rates(model, episodes, rates):
    """(query gradient at φ_K, −Σ_k ⟨query gradient, g_k⟩ per tensor or per step), task mean."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    theta_grads = {n: 0.0 for n in names}
    alpha_grads = {n: torch.zeros_like(rates[n]) for n in names}
    for ep in episodes:
        adapted = copy.deepcopy(model)
        params = dict((n, p) for n, p in adapted.named_parameters() if p.requires_grad)
        inner = []
        for step, batch in enumerate(ep.support_batches):
            adapted.zero_grad(set_to_none=True)
            ref_loss(adapted, batch).backward()
            inner.append({n: p.grad.clone() for n, p in params.items()})
            with torch.no_grad():
                for n, p in params.items():
                    p -= _rate(rates[n], step) * p.grad
        adapted.zero_grad(set_to_none=True)
        ref_loss(adapted, ep.query_batch).backward()
        for n, p in params.items():
            theta_grads[n] = theta_grads[n] + p.grad / len(episodes)
            dots = torch.stack([-(p.grad * g[n]).sum() for g in inner])
            alpha_grads[n] += (dots if rates[n].dim() else dots.sum()) / len(episodes)
    return [theta_grads[n] for n in names], [alpha_grads[n] for n in names]


def engine_grads(model, algorithm, episodes, rates, mode, tasks_per_pass=1):
    named = trainable_named_parameters(model)
    k = len(episodes[0].support_batches)
    engine = InnerLoop(model, named, 0.2, k, learn_inner_lr=mode)
    engine.load_rates(rates)
    algo = build_algorithm(MetaConfig(algorithm=algorithm))
    before = [p.detach().clone() for _, p in named]
    accumulate_meta_gradient(engine, algo, episodes, algo.task_weight(len(episodes)), want_pre=False,
                             tasks_per_pass=tasks_per_pass)
    assert all(torch.equal(b, p) for b, (_, p) in zip(before, named))  # θ put back
    return [g.clone() for g in engine.meta_grad], [g.clone() for g in engine.rates_meta_grad]


@pytest.fixture(scope="module")
def episodes(tokenizer):
    return make_episodes(tokenizer, n_tasks=2, n_support=4, n_query=3, support_batch=2)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("algorithm", ["maml", "fomaml"])
def test_theta_and_rate_gradients_equal_the_references_sequential_and_batched(tiny_llama_dir, episodes, algorithm,
                                                                             mode, lora):
    model = load_double(tiny_llama_dir, lora)
    named = trainable_named_parameters(model)
    rates = initial_rates(named, mode, len(episodes[0].support_batches))
    reference = (ref_maml_rates if algorithm == "maml" else ref_fomaml_rates)(model, episodes, rates)
    for tasks_per_pass in (1, len(episodes)):
        theta, alpha = engine_grads(model, algorithm, episodes, rates, mode, tasks_per_pass)
        assert rel_err(theta, reference[0]) < 1e-6, tasks_per_pass
        assert rel_err(alpha, reference[1]) < 1e-6, tasks_per_pass
        assert sum(float(a.abs().sum()) for a in alpha) > 0


@pytest.mark.parametrize("mode", MODES)
def test_maml_rate_gradient_matches_finite_differences(tiny_llama_dir, episodes, mode):
    model = load_double(tiny_llama_dir)
    named = trainable_named_parameters(model)
    rates = initial_rates(named, mode, 2)
    _, alpha = engine_grads(model, "maml", episodes, rates, mode)
    # Llama's rotary tables stay float32 in a float64 model, so losses carry ~1e-7 relative noise;
    # a step of 1e-3 keeps the central difference's own error (O(eps²)) and that noise near 1e-5
    # for the largest α-gradients: the embedding's and the output head's (0.008 to 0.12 here).
    eps = 1e-3
    for index in (0, len(named) - 1):
        name = named[index][0]
        for step in ((0, 1) if mode == "per_tensor_per_step" else (None,)):
            plus, minus = dict(rates), dict(rates)
            bump = torch.zeros_like(rates[name])
            if step is None:
                bump = bump + eps
            else:
                bump[step] = eps
            plus[name], minus[name] = rates[name] + bump, rates[name] - bump
            numeric = (adapted_loss(model, episodes, plus) - adapted_loss(model, episodes, minus)) / (2 * eps)
            got = float(alpha[index] if step is None else alpha[index][step])
            assert abs(got) > 1e-3 and got == pytest.approx(numeric, rel=1e-3), (name, step)


def test_with_one_inner_step_the_first_order_rate_gradient_is_exact(tiny_llama_dir, tokenizer):
    """K = 1: φ = θ − α g(θ) and g does not depend on α, so FOMAML's α-gradient is the true one."""
    from metasft.algorithms import Episode

    one_step = [Episode(ep.task, ep.support_batches[:1], ep.query_batch)
                for ep in make_episodes(tokenizer, n_tasks=2, n_support=4, n_query=3, support_batch=2)]
    model = load_double(tiny_llama_dir)
    rates = initial_rates(trainable_named_parameters(model), "per_tensor", 1)
    _, first_order = engine_grads(model, "fomaml", one_step, rates, "per_tensor")
    _, exact = engine_grads(model, "maml", one_step, rates, "per_tensor")
    assert rel_err(first_order, exact) < 1e-9
