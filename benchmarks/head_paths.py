"""The output head's two fast paths, each against the path it replaced, timed side by side.

    python benchmarks/head_paths.py [--rounds 3]          # JSON on stdout

Keys (time of the old path over the new one, medians over rounds, alternating order):

- ``anil_dense_over_factored``: one ANIL meta-step (MAML, ``meta.inner_scope=head``) on a full-rank
  head adapter (``model.lora_full_head``), the inner loop keeping B dense against keeping it factored
  (``metasft/algorithms/factored_head.py``). Experiment 3's shapes: 4 tasks one at a time, K = 3
  inner SGD steps, support and query batches of 5 rows.
- ``anil_sequential_over_task_rows``: the same factored ANIL meta-step, the 4 tasks one at a time
  against all 4 together (``meta.task_batching=true``: their target rows in one forward, each
  through its own A and factored B; the base head and B_0 read once a pass for all tasks).
- ``fomaml_dense_over_task_rows`` and ``reptile_dense_over_task_rows``: one FOMAML meta-step (K = 3
  and a query batch) and one Reptile meta-step (K = 4), the inner scope the head adapter: the 4 tasks
  one at a time with φ held in the model, B dense, against their target rows together with B
  factored, first order (each step's terms constants; B's meta-gradient one dense Gᵀz or −Σ U M).
- ``loss_positions_over_gathered``: one loss forward and backward to the head adapter on 20 rows,
  the head run at every position where any row has a target (``logits_to_keep``) against only at
  the target tokens (``metasft.losses.logits_at_targets``): the multi-task SFT step's head.

The model is one decoder layer with SmolLM2-135M's head shape (hidden 576, vocabulary 49,152, tied
embeddings), its layer frozen and cached, as in experiment 3 where every layer is: what is timed is
the head. Rows are 40–90 tokens long (right-padded), with a 2-token answer at the end, as WordNet's are.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from metasft.algorithms import Episode
from metasft.config import ModelConfig
from metasft.data.collate import IGNORE_INDEX
from metasft.losses import lm_loss
from metasft.model import apply_lora, trainable_named_parameters

sys.path.insert(0, str(Path(__file__).parent))
from scopes import Stepper  # noqa: E402
from metasft.train import run_meta_step  # noqa: E402

HIDDEN, VOCAB = 576, 49152


def head_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, vocab_size=VOCAB, num_hidden_layers=1, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, tie_word_embeddings=True)
    model = apply_lora(LlamaForCausalLM(config), ModelConfig(lora_rank=8, lora_alpha=16, target_modules=["lm_head"],
                                                             lora_full_head=True))
    model.train()
    return model


def batch(gen: torch.Generator, rows: int) -> dict[str, torch.Tensor]:
    """Right-padded rows of 40–90 tokens, the last 2 of each a target."""
    lengths = torch.randint(40, 91, (rows,), generator=gen).tolist()
    width = max(lengths)
    ids = torch.zeros((rows, width), dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(10, VOCAB, (n,), generator=gen)
        labels[r, n - 2:n] = ids[r, n - 2:n]
        mask[r, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "position_ids": torch.arange(width).expand(rows, width).clone()}


def episodes(num_tasks: int = 4, k: int = 3, rows: int = 5) -> list[Episode]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for t in range(num_tasks):
        support = batch(gen, rows)  # a support set no larger than a batch: the same rows every step
        out.append(Episode(f"t{t}", [support] * k, batch(gen, rows)))
    return out


def head_ratios(paired_ratios, rounds: int) -> dict:
    model = head_model()
    factored = Stepper(copy.deepcopy(model), "maml", 3, inner_scope="head", prefix_cache=True)
    dense = Stepper(copy.deepcopy(model), "maml", 3, inner_scope="head", prefix_cache=True)
    assert factored.engine.head_b is not None
    dense.engine.head_b = None
    together = Stepper(copy.deepcopy(model), "maml", 3, inner_scope="head", prefix_cache=True)
    eps = episodes()
    assert together.engine.factored_tasks(len(eps))

    def step_together():
        run_meta_step(together.engine, together.algorithm, eps, len(eps), together.optimizer, clip_grad=1.0,
                      tasks_per_pass=len(eps))
    first_order = {}
    for name, k in (("fomaml", 3), ("reptile", 4)):
        dense_fo = Stepper(copy.deepcopy(model), name, k, prefix_cache=True)
        dense_fo.engine.head_b = None
        rows_fo = Stepper(copy.deepcopy(model), name, k, prefix_cache=True)
        assert rows_fo.engine.factors_head(len(eps), second_order=False)
        steps = episodes(k=k)

        def by_rows(stepper=rows_fo, steps=steps):
            run_meta_step(stepper.engine, stepper.algorithm, steps, len(steps), stepper.optimizer, clip_grad=1.0,
                          tasks_per_pass=len(steps))
        first_order[f"{name}_dense_over_task_rows"] = (lambda stepper=dense_fo, steps=steps: stepper(steps), by_rows)
    rows20 = batch(torch.Generator().manual_seed(2), 20)
    params = [p for _, p in trainable_named_parameters(model)]

    def loss_step(gather: bool):
        torch.autograd.grad(lm_loss(model, rows20, gather=gather), params)

    ratios, seconds = paired_ratios({
        "anil_dense_over_factored": (lambda: dense(eps), lambda: factored(eps)),
        "anil_sequential_over_task_rows": (lambda: factored(eps), step_together),
        **first_order,
        "loss_positions_over_gathered": (lambda: loss_step(False), lambda: loss_step(True)),
    }, rounds)
    return {**ratios, "seconds": seconds, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from run import paired_ratios

    print(json.dumps(head_ratios(paired_ratios, args.rounds), indent=2))


if __name__ == "__main__":
    main()
