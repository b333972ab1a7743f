"""Task-batched adaptation (``meta.task_batching``) against the sequential engine and the float64
references: the same meta-gradient for every (algorithm, scope), with tasks whose support and query
batches differ in rows *and* lengths, so padding across tasks is exercised (SPEC §2.3)."""

import pytest
import torch

from metasft.algorithms import Episode, InnerLoop, build_algorithm
from metasft.algorithms.inner_loop import stack_batches
from metasft.config import MetaConfig
from metasft.data.collate import IGNORE_INDEX, collate, num_target_tokens
from metasft.data.formatting import rows_to_examples
from metasft.data.tokenize import encode_examples
from metasft.model import trainable_named_parameters
from metasft.train import accumulate_meta_gradient

from conftest import cipher_rows
from test_algorithms import K, INNER_LR, load_double, ref_fomaml, ref_maml_unrolled, ref_reptile, rel_err

# (support rows per inner step, query rows, digits per row) of each task: rows and lengths differ.
SHAPES = [(2, 2, 2), (3, 4, 7), (1, 3, 4), (3, 1, 10)]


def uneven_episodes(tokenizer):
    episodes = []
    for t, (n_support, n_query, symbols) in enumerate(SHAPES):
        rows = cipher_rows(t, K * n_support + n_query, length=symbols)
        examples, _ = rows_to_examples(rows, f"task{t}")
        enc = encode_examples(examples, tokenizer, 64, chat_template="none")
        support = [collate(enc[k * n_support:(k + 1) * n_support], tokenizer.pad_token_id) for k in range(K)]
        episodes.append(Episode(task=f"task{t}", support_batches=support,
                                query_batch=collate(enc[K * n_support:], tokenizer.pad_token_id)))
    return episodes


@pytest.fixture(scope="module")
def episodes(tokenizer):
    eps = uneven_episodes(tokenizer)
    lengths = {ep.support_batches[0]["input_ids"].shape for ep in eps}
    assert len(lengths) == len(eps), "the test needs tasks of different batch shapes"
    return eps


def meta_grad(model, algorithm_name, episodes, tasks_per_pass, **meta):
    """The engine's meta-gradient, tasks run ``tasks_per_pass`` at a time (1: sequentially)."""
    algorithm = build_algorithm(MetaConfig(algorithm=algorithm_name, **meta))
    named = trainable_named_parameters(model)
    engine = InnerLoop(model, named, INNER_LR, K)
    before = [p.detach().clone() for _, p in named]
    metrics = accumulate_meta_gradient(engine, algorithm, episodes, algorithm.task_weight(len(episodes)),
                                       want_pre=True, tasks_per_pass=tasks_per_pass)
    assert all(torch.equal(b, p) for b, (_, p) in zip(before, named))
    return [g.clone() for g in engine.meta_grad], metrics


SCOPES = [("tiny_llama_dir", False), ("tiny_llama_tied_dir", False), ("tiny_llama_dir", True)]
REFERENCES = {"fomaml": ref_fomaml, "maml": ref_maml_unrolled, "reptile": ref_reptile}
CASES = [(a, f, lo) for a in REFERENCES for f, lo in SCOPES]


@pytest.mark.parametrize("algorithm,fixture,lora", CASES,
                         ids=[f"{a}-{f}-{'lora' if lo else 'full'}" for a, f, lo in CASES])
def test_batched_meta_gradient_equals_reference_and_sequential(request, episodes, algorithm, fixture, lora):
    model_dir = request.getfixturevalue(fixture)
    model = load_double(model_dir, lora)
    batched, batched_metrics = meta_grad(model, algorithm, episodes, tasks_per_pass=len(episodes))
    assert rel_err(batched, REFERENCES[algorithm](model, episodes)) < 1e-6  # as the sequential engine's test
    # fp32, the precision training runs in: batched against the sequential engine, ≤ 1e-5.
    model = model.float()
    batched, batched_metrics = meta_grad(model, algorithm, episodes, tasks_per_pass=len(episodes))
    sequential, sequential_metrics = meta_grad(model, algorithm, episodes, tasks_per_pass=1)
    assert rel_err(batched, sequential) <= 1e-5
    for b, s in zip(batched_metrics, sequential_metrics):
        assert (b.task, b.tokens, b.finite) == (s.task, s.tokens, s.finite)
        for name in ("support_loss_first", "query_loss_pre", "query_loss_post"):
            assert getattr(b, name) == pytest.approx(getattr(s, name), rel=1e-5), name


def test_chunks_of_tasks_per_pass_add_up_to_the_whole_batch(tiny_llama_dir, episodes):
    model = load_double(tiny_llama_dir)
    whole, _ = meta_grad(model, "fomaml", episodes, tasks_per_pass=4)
    chunked, _ = meta_grad(model, "fomaml", episodes, tasks_per_pass=3)  # a pass of 3, then one task alone
    assert rel_err(chunked, whole) < 1e-10


def test_batched_reptile_with_inner_adam_equals_sequential(tiny_llama_dir, episodes):
    model = load_double(tiny_llama_dir)
    batched, _ = meta_grad(model, "reptile", episodes, tasks_per_pass=4, inner_optimizer="adam")
    sequential, _ = meta_grad(model, "reptile", episodes, tasks_per_pass=1, inner_optimizer="adam")
    assert rel_err(batched, sequential) < 1e-9


def test_stacking_pads_without_changing_any_task_s_targets(episodes):
    batches = [ep.support_batches[0] for ep in episodes]
    stacked = stack_batches(batches)
    rows = max(b["input_ids"].shape[0] for b in batches)
    length = max(b["input_ids"].shape[1] for b in batches)
    assert stacked["input_ids"].shape == stacked["labels"].shape == (len(batches), rows, length)
    for t, b in enumerate(batches):
        r, n = b["labels"].shape
        assert torch.equal(stacked["labels"][t, :r, :n], b["labels"])
        assert num_target_tokens({"labels": stacked["labels"][t]}) == num_target_tokens(b)
        assert (stacked["labels"][t, r:] == IGNORE_INDEX).all() and (stacked["labels"][t, :, n:] == IGNORE_INDEX).all()


def test_bf16_autocast_batched_pass_matches_the_sequential_one(tiny_llama_dir, episodes):
    """Under vmap, autocast does not reach scaled_dot_product_attention; the engine casts its inputs
    itself. Without that cast this raises (mixed fp32/bf16 query and value)."""
    model = load_double(tiny_llama_dir).float()
    grads = {}
    for per_pass in (1, 4):
        algorithm = build_algorithm(MetaConfig(algorithm="fomaml"))
        engine = InnerLoop(model, trainable_named_parameters(model), INNER_LR, K, autocast_dtype=torch.bfloat16)
        accumulate_meta_gradient(engine, algorithm, episodes, 0.25, want_pre=False, tasks_per_pass=per_pass)
        grads[per_pass] = [g.clone() for g in engine.meta_grad]
    assert rel_err(grads[4], grads[1]) < 0.05  # bf16 rounding, not a different computation


def test_a_lone_task_runs_the_sequential_engine(tiny_llama_dir, episodes, monkeypatch):
    """A meta-batch of one task gets nothing from batching, so it must not pay for vmap."""
    model = load_double(tiny_llama_dir)
    algorithm = build_algorithm(MetaConfig(algorithm="fomaml"))
    import metasft.algorithms.inner_loop as inner_loop

    monkeypatch.setattr(inner_loop, "vmap", lambda *a, **k: pytest.fail("vmapped a single task"))
    engine = InnerLoop(model, trainable_named_parameters(model), INNER_LR, K)
    accumulate_meta_gradient(engine, algorithm, episodes[:1], 1.0, want_pre=False, tasks_per_pass=4)
