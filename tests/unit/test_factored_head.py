"""MAML's inner loop with the head's LoRA B kept factored (B_0 + U M, metasft.algorithms.factored_head)
equals the dense inner loop: the adapted B, the query loss at φ, and the meta-gradient of every
meta-parameter and learned rate, in float64.

The dense path is the engine's general one (checked against independent references in
test_learned_inner_lr.py and tests/integration/test_inner_scope.py); here the same engine is run
twice, once with the factored path switched off."""

import pytest
import torch

from metasft.algorithms import InnerLoop
from metasft.algorithms.updates import Adam
from metasft.config import ModelConfig
from metasft.model import load_model, trainable_named_parameters
from metasft.scope import Scope

from test_algorithms import K, make_episodes, perturb_lora_b, rel_err


@pytest.fixture(scope="module")
def episodes(tokenizer):
    return make_episodes(tokenizer, n_tasks=2, n_support=4, n_query=3, support_batch=2)


def head_lora_model(model_dir, full_head, targets=("q_proj", "v_proj", "lm_head")):
    cfg = ModelConfig(partial_pretrain=str(model_dir), lora_rank=4, lora_alpha=8, lora_full_head=full_head,
                      target_modules=list(targets))
    model = load_model(cfg).double()
    perturb_lora_b(model)  # every term of the step, and A's gradient, is then exercised
    return model


def meta_gradients(model, episodes, mode, factored):
    named = trainable_named_parameters(model)
    engine = InnerLoop(model, named, 0.3, K, learn_inner_lr=mode, inner_scope=Scope("head"))
    assert engine.head_b is not None  # the head's lora_B is in the inner scope
    if not factored:
        engine.head_b = None
    b_name = next(n for n in engine.inner_names if "lm_head.lora_B" in n)
    params = engine.params + engine.rates
    totals, losses, adapted_b = [torch.zeros_like(p) for p in params], [], []
    for episode in episodes:
        tasks = engine.stack([engine.prepare_episode(episode, support_graph=True)])
        adapted = engine.adapt(tasks, second_order=True)
        assert (adapted.head_b is not None) == factored
        assert (b_name in adapted.weights) != factored
        adapted_b.append((adapted.head_b.dense() if factored else adapted.weights[b_name]).detach())
        loss = engine.losses(tasks.query, adapted).sum()
        losses.append(float(loss.detach()))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        totals = [t + (0 if g is None else g) for t, g in zip(totals, grads)]
    # The head's own lora_B module is back in place after every call.
    assert type(model.get_output_embeddings().lora_B["default"]) is torch.nn.Linear
    return totals, losses, adapted_b


@pytest.mark.parametrize("mode", ["none", "per_tensor_per_step"])
@pytest.mark.parametrize("full_head", [False, True], ids=["rank4", "full_head"])
def test_factored_head_inner_loop_equals_the_dense_one(tiny_llama_dir, episodes, full_head, mode):
    model = head_lora_model(tiny_llama_dir, full_head)
    dense = meta_gradients(model, episodes, mode, factored=False)
    factored = meta_gradients(model, episodes, mode, factored=True)
    assert rel_err(factored[2], dense[2]) < 1e-12          # the adapted B
    assert factored[1] == pytest.approx(dense[1], rel=1e-12, abs=0)   # query losses at φ
    assert rel_err(factored[0], dense[0]) < 1e-10          # meta-gradients of θ (and α)
    assert all(float(g.abs().sum()) > 0 for g in dense[0])  # every meta-parameter (and rate) is reached


def test_rules_without_a_scalar_rate_and_adaptation_in_the_model_keep_the_dense_b(tiny_llama_dir, episodes):
    model = head_lora_model(tiny_llama_dir, full_head=False)
    engine = InnerLoop(model, trainable_named_parameters(model), 0.3, K, inner_scope=Scope("head"))
    tasks = engine.stack([engine.prepare_episode(episodes[0], support_graph=True)])
    assert engine.adapt(tasks, second_order=True, rule=Adam(0.01)).head_b is None
    assert engine.adapt(tasks, second_order=False).head_b is None  # φ left in the model (adapt, bench)
    assert engine.adapt(tasks, factor_head=True).head_b is not None  # FOMAML, Reptile
    learned = InnerLoop(model, trainable_named_parameters(model), 0.3, K, learn_inner_lr="per_tensor",
                        inner_scope=Scope("head"))
    assert learned.adapt(tasks, factor_head=True).head_b is None  # a first-order α-gradient needs each dense step
    # Several tasks together: only when the inner scope is exactly the head's A and B over states that
    # reach the head (a prefix split: here none, every meta-parameter being in the head and nothing
    # cached); otherwise the vmapped dense path.
    head_only = head_lora_model(tiny_llama_dir, full_head=False, targets=["lm_head"])
    engine = InnerLoop(head_only, trainable_named_parameters(head_only), 0.3, K, inner_scope=Scope("head"))
    assert engine.factored_tasks(1) and not engine.factored_tasks(2)
    assert engine.adapt(engine.stack([engine.prepare_episode(ep) for ep in episodes]), second_order=True).head_b is None


@pytest.mark.parametrize("targets", [["lm_head"], ["q_proj", "v_proj", "lm_head"]], ids=["head_only", "with_body"])
def test_tasks_run_together_with_b_factored_equal_the_dense_sequential_loop(tiny_llama_dir, episodes, targets):
    """T tasks whose inner scope is the head's adapter run their target rows in one forward, each
    through its own A and factored B; the losses and meta-gradients equal one task at a time, dense."""
    model = head_lora_model(tiny_llama_dir, full_head=True, targets=targets)
    dense_grads, dense_losses, dense_b = meta_gradients(model, episodes, "per_tensor_per_step", factored=False)
    named = trainable_named_parameters(model)
    engine = InnerLoop(model, named, 0.3, K, learn_inner_lr="per_tensor_per_step", inner_scope=Scope("head"),
                       prefix_cache=True)
    assert engine.factored_tasks(len(episodes))
    tasks = engine.stack([engine.prepare_episode(ep, support_graph=True) for ep in episodes])
    adapted = engine.adapt(tasks, second_order=True)
    assert adapted.head_b is not None and len(adapted.head_b.left) == len(episodes)
    assert rel_err([adapted.head_b.dense(t).detach() for t in range(len(episodes))], dense_b) < 1e-12
    losses = engine.losses(tasks.query, adapted)
    assert losses.detach().tolist() == pytest.approx(dense_losses, rel=1e-12, abs=0)
    grads = torch.autograd.grad(losses.sum(), engine.params + engine.rates)
    assert rel_err(grads, dense_grads) < 1e-8  # the learned rates are float32: their sums round there


@pytest.mark.parametrize("algorithm", ["fomaml", "reptile"])
@pytest.mark.parametrize("together", [False, True], ids=["one_by_one", "by_rows"])
def test_first_order_methods_with_b_factored_equal_the_dense_in_place_loop(tiny_llama_dir, episodes, algorithm,
                                                                           together):
    """FOMAML and Reptile keep the head's B factored too, first order (each step's terms constants):
    B's meta-gradient is then one dense Gᵀz at the query pass, or −Σ U M, summed over the tasks. It
    equals the dense loop that holds φ in the model, one task at a time or the tasks' rows together,
    and θ is never written to."""
    from metasft.algorithms import FOMAML, Reptile

    model = head_lora_model(tiny_llama_dir, full_head=True, targets=["lm_head"])
    method = FOMAML() if algorithm == "fomaml" else Reptile()
    b = model.get_output_embeddings().lora_B["default"].weight

    def meta_gradient(factored: bool, together: bool) -> list[torch.Tensor]:
        engine = InnerLoop(model, trainable_named_parameters(model), 0.3, K, prefix_cache=True)
        if not factored:
            engine.head_b = None
        prepared = [engine.prepare_episode(ep, support_graph=False) for ep in episodes]
        groups = [prepared] if together else [[ep] for ep in prepared]
        assert all(engine.factors_head(len(g), second_order=False) == factored for g in groups)
        engine.snapshot()
        engine.zero_meta_grad()
        before = b.detach().clone()
        for group in groups:
            engine.restore()
            method.run(engine, engine.stack(group), weight=0.5, want_pre=False)
            if factored:
                assert torch.equal(b, before)  # φ was never written to the model
        engine.restore()
        return [g.clone() for g in engine.meta_grad]

    dense = meta_gradient(factored=False, together=False)
    assert rel_err(meta_gradient(factored=True, together=together), dense) < 1e-10
    assert all(float(g.abs().sum()) > 0 for g in dense)  # A's and B's meta-gradients are both reached
