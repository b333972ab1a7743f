"""Meta-gradients of every algorithm against independent references (float64, tiny HF Llama).

References are written here from the update rules, not with the engine: models are deep-copied
and adapted with explicit SGD loops on ``.grad``, the loss is a hand-written log-softmax, MAML's
reference differentiates an explicitly unrolled inner loop, and a central finite difference of
the adapted query loss checks MAML's second-order terms (which FOMAML must *not* match).
"""

import copy

import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from metasft.algorithms import Episode, InnerLoop, build_algorithm
from metasft.config import MetaConfig, ModelConfig
from metasft.data.collate import collate
from metasft.data.formatting import rows_to_examples
from metasft.data.tokenize import encode_examples
from metasft.model import load_model, trainable_named_parameters

from conftest import cipher_rows
from references import ref_adapt as _ref_adapt
from references import ref_loss

INNER_LR = 0.3
K = 2


def ref_adapt(model, support_batches, lr=INNER_LR):
    return _ref_adapt(model, support_batches, lr)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def make_episodes(tokenizer, n_tasks=3, n_support=6, n_query=4, support_batch=3):
    episodes = []
    for t in range(n_tasks):
        examples, _ = rows_to_examples(cipher_rows(t, n_support + n_query), f"task{t}")
        enc = encode_examples(examples, tokenizer, 64, chat_template="none")
        support, query = enc[:n_support], enc[n_support:]
        batches = [collate(support[i * support_batch:(i + 1) * support_batch], tokenizer.pad_token_id)
                   for i in range(K)]
        episodes.append(Episode(task=f"task{t}", support_batches=batches,
                                query_batch=collate(query, tokenizer.pad_token_id)))
    return episodes


def load_double(model_dir, lora=False):
    cfg = ModelConfig(partial_pretrain=str(model_dir), lora_rank=4 if lora else 0, lora_alpha=8)
    model = load_model(cfg).double()
    model.train()
    if lora:
        perturb_lora_b(model)
    return model


def perturb_lora_b(model) -> None:
    """peft initialises lora_B to zero, which makes every lora_A gradient zero: perturb it so a test
    exercises both factors."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def engine_grad(model, algorithm_name, episodes, lr=INNER_LR, **meta):
    algorithm = build_algorithm(MetaConfig(algorithm=algorithm_name, **meta))
    named = trainable_named_parameters(model)
    engine = InnerLoop(model, named, lr, K)
    engine.snapshot()
    engine.zero_meta_grad()
    before = [p.detach().clone() for _, p in named]
    for episode in episodes:
        algorithm.run_task(engine, episode, algorithm.task_weight(len(episodes)), want_pre=True)
    engine.restore()
    assert all(torch.equal(b, p) for b, (_, p) in zip(before, named)), "θ must be restored after a meta-step"
    return [g.clone() for g in engine.meta_grad]


def rel_err(got, want):
    num = torch.sqrt(sum(((g - w) ** 2).sum() for g, w in zip(got, want)))
    den = torch.sqrt(sum((w ** 2).sum() for w in want))
    return float(num / den)


def ref_fomaml(model, episodes):
    total = [torch.zeros_like(p) for p in trainable(model)]
    for ep in episodes:
        adapted = ref_adapt(model, ep.support_batches)
        adapted.zero_grad(set_to_none=True)
        ref_loss(adapted, ep.query_batch).backward()
        total = [t + p.grad / len(episodes) for t, p in zip(total, trainable(adapted))]
    return total


def ref_reptile(model, episodes):
    total = [torch.zeros_like(p) for p in trainable(model)]
    for ep in episodes:
        adapted = ref_adapt(model, ep.support_batches)
        total = [t + (p0.detach() - p.detach()) / len(episodes)
                 for t, p0, p in zip(total, trainable(model), trainable(adapted))]
    return total


def ref_maml_unrolled(model, episodes):
    """∇θ of the query loss after explicitly unrolled SGD steps, graph kept through every step."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    theta = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in theta]
    math_sdpa = sdpa_kernel(SDPBackend.MATH)  # the CPU flash kernel has no double backward
    math_sdpa.__enter__()
    call = lambda w, b: ref_loss(lambda **kw: functional_call(model, dict(zip(names, w)), args=(), kwargs=kw), b)  # noqa: E731
    for ep in episodes:
        fast = list(theta)
        for batch in ep.support_batches:
            grads = torch.autograd.grad(call(fast, batch), fast, create_graph=True)
            fast = [w - INNER_LR * g for w, g in zip(fast, grads)]
        grads = torch.autograd.grad(call(fast, ep.query_batch), theta)
        total = [t + g / len(episodes) for t, g in zip(total, grads)]
    math_sdpa.__exit__(None, None, None)
    return total


def adapted_query_loss(model, episodes, direction, eps):
    """mean_i L_query(φ_i(θ + eps·direction)), evaluated with the reference SGD loop."""
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for p, d in zip(trainable(shifted), direction):
            p += eps * d
    return sum(float(ref_loss(ref_adapt(shifted, ep.support_batches), ep.query_batch).detach()) for ep in episodes) / len(episodes)


@pytest.fixture(scope="module")
def episodes(tokenizer):
    return make_episodes(tokenizer)


SCOPES = [("tiny_llama_dir", False), ("tiny_llama_tied_dir", False), ("tiny_llama_dir", True)]
# fomaml: the query gradient at the adapted weights; reptile: θ − φ; maml: autograd through the
# explicitly unrolled inner loop. FOMAML is also checked on Qwen2.
REFERENCES = [("fomaml", ref_fomaml, SCOPES + [("tiny_qwen2_dir", False)]), ("reptile", ref_reptile, SCOPES),
              ("maml", ref_maml_unrolled, SCOPES)]


@pytest.mark.parametrize("algorithm,reference,fixture,lora",
                         [(a, r, f, lo) for a, r, scopes in REFERENCES for f, lo in scopes],
                         ids=[f"{a}-{f}-{'lora' if lo else 'full'}" for a, _, scopes in REFERENCES for f, lo in scopes])
def test_meta_gradient_equals_independent_reference(request, episodes, algorithm, reference, fixture, lora):
    model = load_double(request.getfixturevalue(fixture), lora)
    got = engine_grad(model, algorithm, episodes)
    assert rel_err(got, reference(model, episodes)) < 1e-6


def test_maml_matches_finite_differences_and_fomaml_does_not(tiny_llama_dir, episodes):
    model = load_double(tiny_llama_dir)
    maml = engine_grad(model, "maml", episodes)
    fomaml = engine_grad(model, "fomaml", episodes)
    gen = torch.Generator().manual_seed(1)
    for direction in (maml, [torch.randn(g.shape, generator=gen, dtype=g.dtype) for g in maml]):
        norm = torch.sqrt(sum((d ** 2).sum() for d in direction))
        direction = [d / norm for d in direction]
        eps = 1e-3
        fd = (adapted_query_loss(model, episodes, direction, eps)
              - adapted_query_loss(model, episodes, direction, -eps)) / (2 * eps)
        maml_dd = float(sum((g * d).sum() for g, d in zip(maml, direction)))
        fomaml_dd = float(sum((g * d).sum() for g, d in zip(fomaml, direction)))
        assert maml_dd == pytest.approx(fd, rel=2e-3, abs=1e-5)
        assert abs(fomaml_dd - fd) > 20 * abs(maml_dd - fd)  # the second-order terms are really there


def test_sft_equals_gradient_of_the_union_batch(tiny_llama_tied_dir, tokenizer):
    model = load_double(tiny_llama_tied_dir)
    rows = []
    episodes = []
    for t in range(3):
        examples, _ = rows_to_examples(cipher_rows(t, 3 + t), f"task{t}")
        enc = encode_examples(examples, tokenizer, 64, chat_template="none")
        rows += enc
        episodes.append(enc)
    total = sum(r.num_targets for r in rows)
    eps = [Episode(task=f"t{i}", support_batches=[collate(e, tokenizer.pad_token_id)], num_targets=total)
           for i, e in enumerate(episodes)]
    got = engine_grad(model, "sft", eps)
    model.zero_grad(set_to_none=True)
    ref_loss(model, collate(rows, tokenizer.pad_token_id)).backward()
    assert rel_err(got, [p.grad for p in trainable(model)]) < 1e-6


def test_zero_inner_steps_fomaml_equals_maml_equals_query_gradient(tiny_llama_dir, tokenizer, episodes):
    model = load_double(tiny_llama_dir)
    no_inner = [Episode(task=e.task, support_batches=[], query_batch=e.query_batch) for e in episodes]
    fomaml = engine_grad(model, "fomaml", no_inner)
    maml = engine_grad(model, "maml", no_inner)
    model.zero_grad(set_to_none=True)
    (sum(ref_loss(model, e.query_batch) for e in episodes) / len(episodes)).backward()
    ref = [p.grad for p in trainable(model)]
    assert rel_err(fomaml, ref) < 1e-6
    assert rel_err(maml, ref) < 1e-6


def test_lora_scope_meta_learns_only_adapters(tiny_llama_dir, episodes):
    model = load_double(tiny_llama_dir, lora=True)
    named = trainable_named_parameters(model)
    assert named and all("lora_" in name for name, _ in named)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    grads = engine_grad(model, "maml", episodes)
    assert all(g.abs().sum() > 0 for g in grads)
    assert all(torch.equal(base[n], p) for n, p in model.named_parameters() if n in base)


def test_reptile_with_inner_adam_moves_along_adam_steps(tiny_llama_dir, episodes):
    model = load_double(tiny_llama_dir)
    got = engine_grad(model, "reptile", episodes[:1], inner_optimizer="adam")
    adapted = copy.deepcopy(model)
    opt = torch.optim.Adam(trainable(adapted), lr=INNER_LR)
    for batch in episodes[0].support_batches:
        opt.zero_grad()
        ref_loss(adapted, batch).backward()
        opt.step()
    ref = [p0.detach() - p.detach() for p0, p in zip(trainable(model), trainable(adapted))]
    assert rel_err(got, ref) < 1e-8


def test_fused_attention_really_lacks_double_backward(tiny_llama_dir, episodes):
    """Why the engine forces the math kernel: without it, second order fails on the default path."""
    model = load_double(tiny_llama_dir)
    named = trainable_named_parameters(model)
    engine = InnerLoop(model, named, INNER_LR, K, force_math_attention=False)
    with pytest.raises(RuntimeError, match="derivative for .* is not implemented"):
        adapted = engine.adapt(engine.stack(episodes[:1]), second_order=True)
        engine.grad(engine.losses(episodes[0].query_batch, adapted).sum())
