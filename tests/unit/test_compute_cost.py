"""The engine does no matmul beyond each algorithm's compute floor — counted, not timed.

Timings on a shared machine are noisy (the benchmarks measure them as ratios); matmul counts are
exact. Every linear layer costs 1 matmul forward and 2 backward (input and weight gradients), so:

* FOMAML runs exactly K support + 1 query forward+backward passes per task, Reptile exactly K;
* exact second-order MAML adds one Hessian-vector product per inner step — the kept backward
  graph differentiated again (4 matmuls per linear) and the forward graph once more (2) — which
  is (9K + 3) / (3K + 3) times FOMAML's matmuls, the figure benchmarks/run.py compares against.
"""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from metasft.algorithms import Episode, InnerLoop, build_algorithm
from metasft.config import MetaConfig, ModelConfig
from metasft.data.collate import collate
from metasft.data.formatting import rows_to_examples
from metasft.data.tokenize import encode_examples
from metasft.losses import lm_loss
from metasft.model import load_model, trainable_named_parameters

from conftest import cipher_rows


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def episode(tokenizer, num_inner_steps: int) -> Episode:
    examples, _ = rows_to_examples(cipher_rows(0, 3 * (num_inner_steps + 1)), "task0")
    rows = encode_examples(examples, tokenizer, 64, chat_template="none")
    batches = [collate(rows[3 * i:3 * i + 3], tokenizer.pad_token_id) for i in range(num_inner_steps + 1)]
    return Episode(task="task0", support_batches=batches[:-1], query_batch=batches[-1])


def matmuls(fn) -> int:
    with CountOps() as counter:
        fn()
    return counter.counts["mm"]


@pytest.mark.parametrize("num_inner_steps", [1, 3])
def test_meta_steps_cost_exactly_their_passes(tiny_llama_dir, tokenizer, num_inner_steps):
    model = load_model(ModelConfig(partial_pretrain=str(tiny_llama_dir)))
    model.train()
    ep = episode(tokenizer, num_inner_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    per_pass = matmuls(lambda: torch.autograd.grad(lm_loss(model, ep.query_batch), params))
    linear_layers = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert per_pass == 3 * linear_layers

    def task_matmuls(algorithm_name: str) -> int:
        algorithm = build_algorithm(MetaConfig(algorithm=algorithm_name))
        engine = InnerLoop(model, trainable_named_parameters(model), 0.01, num_inner_steps)
        engine.snapshot()
        engine.zero_meta_grad()
        count = matmuls(lambda: algorithm.run_task(engine, ep, 1.0, want_pre=False))
        engine.restore()
        return count

    k = num_inner_steps
    counts = {name: task_matmuls(name) for name in ("fomaml", "reptile", "maml")}
    assert counts["fomaml"] == (k + 1) * per_pass
    assert counts["reptile"] == k * per_pass
    assert counts["maml"] == (k + 1) * per_pass + k * 2 * per_pass  # + one HVP (6 per linear) per step
    assert counts["maml"] / counts["fomaml"] == pytest.approx((9 * k + 3) / (3 * k + 3))
