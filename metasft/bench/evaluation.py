"""Adapting each method to each held-out task with the shared protocol, and scoring it."""

from __future__ import annotations

import math
import time
from pathlib import Path

from metasft.errors import ConfigError
from metasft.bench.schema import BenchConfig, HIGHER_IS_BETTER, METRICS


def evaluate_method(name: str, checkpoint: Path, cfg: BenchConfig, tasks, device, on_done=lambda: None,
                    validation_tasks=(), adaptations: list[str] | None = None
                    ) -> tuple[list[dict], dict[int, float], list[dict]]:
    """Adapt ``checkpoint`` to every (task, n_shots, seed) with the shared protocol and score it.

    With ``adapt.lr_grid`` the learning rate for each n_shots is first chosen on ``validation_tasks``
    (``adapt.select_lr_by``: best mean ``cfg.metric``, ties to the lower query loss; or the lowest mean
    query loss, scored without generation). Returns the held-out rows, the learning
    rate used per n_shots, and the validation rows behind the choice."""
    import torch

    from metasft.adapt import adapt_rows, load_learned_rates, select_shots, select_shots_per_class
    from metasft.algorithms import InnerLoop
    from metasft.checkpoint import load_pretrained
    from metasft.data.in_context import render_in_context
    from metasft.evaluate import evaluate_rows
    from metasft.model import trainable_named_parameters
    from metasft.scope import parse_scope

    model, tokenizer, _ = load_pretrained(checkpoint, key=f"method {name}:")
    model.to(device)
    model.train()
    # The layers below the method's adapters never change: each row's states there are computed once
    # (for every rate of the grid, and with a directory for every method) and only the layers above
    # run for adaptation and query losses. Generation still runs every layer. Without a directory the
    # states are kept in memory on a CPU only: an accelerator's memory is kept for the model.
    engine = InnerLoop(model, trainable_named_parameters(model), cfg.adapt.lr, cfg.adapt.steps,
                       inner_scope=parse_scope(cfg.adapt.inner_scope),
                       prefix_cache=cfg.prefix_cache_dir is not None or torch.device(device).type == "cpu",
                       prefix_cache_dir=cfg.prefix_cache_dir)
    # A checkpoint with learned inner rates adapts with them (SGD), the adaptation it was trained for;
    # there is then no learning rate to choose.
    learned = cfg.adapt.optimizer == "sgd" and load_learned_rates(engine, checkpoint)
    engine.snapshot()

    def shot_indices(task, n_shots: int, seed: int) -> list[int]:
        """The seeded draw every method and both adaptations use."""
        if cfg.shots == "per_class":
            return select_shots_per_class([class_label(e) for e in task.support_examples], n_shots, seed, task.name)
        if n_shots > len(task.support):
            raise ConfigError(f"n_shots: {n_shots} exceeds task {task.name!r}'s {len(task.support)} support rows")
        return select_shots(len(task.support), n_shots, seed, task.name)

    def score(task, n_shots: int, seed: int, lr: float, generation: bool = True) -> dict:
        query_rows = task.query[: cfg.eval.max_query_rows] if cfg.eval.max_query_rows else task.query
        torch.manual_seed(seed)
        shots = [task.support[i] for i in shot_indices(task, n_shots, seed)]
        started = time.perf_counter()
        adapt_rows(engine, shots, steps=cfg.adapt.steps, batch_size=min(cfg.adapt.batch_size, len(shots)),
                   lr=cfg.adapt.lr if lr is None else lr, seed=seed, task=task.name, pad_token_id=tokenizer.pad_token_id,
                   optimizer=cfg.adapt.optimizer)
        adapt_seconds = time.perf_counter() - started
        scores = evaluate_rows(model, tokenizer, query_rows, task.query_examples[: len(query_rows)],
                               batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                               with_generation=cfg.eval.generation and generation, device=device, engine=engine)
        engine.restore()
        on_done()
        return {"method": name, "adaptation": "gradient", "task": task.name, "n_shots": n_shots, "seed": seed,
                **{m: scores.get(m) for m in METRICS}, "adapt_lr": None if learned else lr, "shots_used": float(len(shots)),
                "shots_used_min": len(shots), "adapt_seconds": adapt_seconds}

    def score_in_context(task, n_shots: int, seed: int) -> dict:
        """The same seeded shots rendered before each query row (data.max_length permitting)."""
        count = min(len(task.query), cfg.eval.max_query_rows or len(task.query))
        shots = [task.support_examples[i] for i in shot_indices(task, n_shots, seed)]
        rendered = [render_in_context(shots, example, tokenizer, max_length=cfg.data.max_length,
                                      truncation=cfg.data.truncation, chat_template=cfg.data.chat_template)
                    for example in task.query_examples[:count]]
        used = [n for _, n in rendered]
        # Every row starts with the same demonstrations: they run once per task, not once per row.
        scores = evaluate_rows(model, tokenizer, [row for row, _ in rendered], task.query_examples[:count],
                               batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                               with_generation=cfg.eval.generation, device=device, share_prefix=True)
        on_done()
        return {"method": name, "adaptation": "in_context", "task": task.name, "n_shots": n_shots, "seed": seed,
                **{m: scores.get(m) for m in METRICS}, "adapt_lr": None, "shots_used": sum(used) / len(used),
                "shots_used_min": min(used), "adapt_seconds": 0.0}

    chosen = {n_shots: cfg.adapt.lr for n_shots in cfg.n_shots}
    validation_rows = []
    rows = []
    adaptations = adaptations or cfg.adaptations
    if "in_context" in adaptations:
        rows += [score_in_context(task, n_shots, seed) for task in tasks for n_shots in cfg.n_shots for seed in cfg.seeds]
    if "gradient" not in adaptations:
        return rows, {}, validation_rows
    if learned:
        chosen = {n_shots: None for n_shots in cfg.n_shots}
    elif cfg.adapt.lr_grid:
        for n_shots in cfg.n_shots:
            ranking = []
            by_loss = cfg.adapt.select_lr_by == "query_loss"
            for lr in cfg.adapt.lr_grid:
                trial = [score(task, n_shots, seed, lr, generation=not by_loss)
                         for task in validation_tasks for seed in cfg.seeds]
                validation_rows += trial
                ranking.append((math.nan if by_loss else _mean(trial, cfg.metric), _mean(trial, "query_loss"), lr))
            sign = 1 if HIGHER_IS_BETTER[cfg.metric] else -1
            # A metric that was not computed (generation off, or selection by loss) leaves the query loss to decide.
            chosen[n_shots] = max(ranking, key=lambda r: (0.0 if math.isnan(r[0]) else sign * r[0], -r[1]))[2]
    rows += [score(task, n_shots, seed, chosen[n_shots])
             for task in tasks for n_shots in cfg.n_shots for seed in cfg.seeds]
    return rows, chosen, validation_rows


def class_label(example) -> str:
    """An example's class for per-class shots: its response (the last turn of a conversation)."""
    return example.response if example.messages is None else example.messages[-1][1]


def _mean(rows: list[dict], metric: str) -> float:
    values = [r[metric] for r in rows if r[metric] is not None]
    return sum(values) / len(values) if values else math.nan
