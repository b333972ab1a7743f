"""Few-shot adaptation of θ to one task, shared by the trainer's held-out evaluation, ``metasft
adapt`` and the benchmark, so every number in metasft comes from one protocol.

    metasft adapt --checkpoint runs/fomaml/step_1000 --data data/maml/legal/support.parquet \\
        --n-shots 10 --output adapted/legal

By default it adapts the way MAML-style training optimises for: plain SGD at ``inner_lr`` for
``num_inner_steps`` steps on batches of ``inner_batch_size``, drawn by the training batch schedule.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from metasft.algorithms.inner_loop import Episode, InnerLoop
from metasft.data.collate import collate_for_rank
from metasft.data.tasks import BatchSchedule, Task, stable_seed
from metasft.data.tokenize import Encoded
from metasft.errors import ConfigError
from metasft.losses import target_loss_sum


def select_shots(num_rows: int, n_shots: int, seed: int, task: str) -> list[int]:
    """The ``n_shots`` support rows of a few-shot episode: a seeded choice, the same for every method."""
    order = np.random.default_rng([stable_seed(seed, task, "shots")]).permutation(num_rows)
    return sorted(order[:n_shots].tolist())


def select_shots_per_class(labels: list[str], n_shots: int, seed: int, task: str) -> list[int]:
    """``n_shots`` rows of every class (rows sharing a label): the N-way K-shot episode. A seeded
    choice per class, the same for every method. Raises ConfigError naming the task and the class
    when a class has fewer rows."""
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    chosen = []
    for label in sorted(by_class):
        rows = by_class[label]
        if n_shots > len(rows):
            raise ConfigError(f"n_shots: {n_shots} per class exceeds task {task!r}'s {len(rows)} support rows "
                              f"of class {label!r}")
        order = np.random.default_rng([stable_seed(seed, task, "shots", label)]).permutation(len(rows))
        chosen += [rows[i] for i in order[:n_shots]]
    return sorted(chosen)


def adapt_rows(engine: InnerLoop, rows: list[Encoded], *, steps: int, batch_size: int, lr: float, seed: int,
               task: str, pad_token_id: int, optimizer: str = "sgd", row_shard: tuple[int, int] = (0, 1)) -> None:
    """Fine-tune the engine's parameters in place on ``rows``: ``steps`` steps of ``batch_size``
    rows (the whole set when it is smaller), plain SGD at ``lr`` or AdamW. Under FSDP every rank
    passes its ``row_shard`` and takes its share of each batch."""
    schedule = BatchSchedule(len(rows), batch_size, seed, task, "adapt")
    batches = []
    for _ in range(steps):
        chunk = [rows[i] for i in schedule.next_indices()]
        batches.append(collate_for_rank(chunk, pad_token_id, *row_shard, device=engine.device))
    # Layers below the inner scope run once per distinct batch, not once per step.
    episode = engine.prepare_episode(Episode(task, batches))
    # SGD takes the engine's learned rates when it holds any (a checkpoint's), else lr.
    engine.adapt(engine.stack([episode]), rule=engine.update_rule(lr, optimizer))


def load_learned_rates(engine: InnerLoop, checkpoint) -> bool:
    """Give ``engine`` the checkpoint's learned inner rates (``meta.learn_inner_lr``), if it has any:
    the adaptation it was meta-trained for. Returns whether it had them."""
    from metasft.checkpoint import INNER_LRS_FILE, read_inner_lrs

    rates = read_inner_lrs(checkpoint)
    if rates is None:
        return False
    engine.load_rates(rates, source=f"{checkpoint}/{INNER_LRS_FILE}")
    return True


def steps_for_epochs(num_rows: int, batch_size: int, epochs: int) -> int:
    return epochs * max(1, math.ceil(num_rows / batch_size)) if batch_size < num_rows else epochs


@torch.no_grad()
def dataset_loss(engine: InnerLoop, rows, batch_size: int, pad_token_id: int,
                 row_shard: tuple[int, int] = (0, 1)) -> tuple[float, int]:
    """(summed token loss of this rank's share of ``rows``, target count of all ``rows``) at the
    model's current weights; summing the first over ranks and dividing gives the token mean. The
    layers below the engine's inner scope run once per row (its prefix cache), as in adaptation."""
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = collate_for_rank(chunk, pad_token_id, *row_shard, device=engine.device)
        with engine.prefixed(batch) as batch:
            s, _ = target_loss_sum(engine.model, batch)
        total += float(s)
        count += sum(r.num_targets for r in chunk)
    return total, count


def adapt_and_score(engine: InnerLoop, task: Task, *, num_steps: int, batch_size: int, eval_batch_size: int,
                    seed: int, pad_token_id: int, row_shard: tuple[int, int] = (0, 1), exact_match_rows: int = 0,
                    tokenizer=None) -> dict[str, float]:
    """Summed query loss and target count of ``task`` before and after ``num_steps`` inner SGD steps
    from θ (this rank's share under FSDP), and with ``exact_match_rows`` the adapted model's exact
    match on that many query rows (greedy generation; needs ``tokenizer``); θ is put back."""
    engine.snapshot()
    try:
        pre, count = dataset_loss(engine, task.query, eval_batch_size, pad_token_id, row_shard)
        adapt_rows(engine, task.support, steps=num_steps, batch_size=batch_size, lr=engine.inner_lr, seed=seed,
                   task=task.name, pad_token_id=pad_token_id, row_shard=row_shard)
        post, _ = dataset_loss(engine, task.query, eval_batch_size, pad_token_id, row_shard)
        scores = {"query_loss_pre_sum": pre, "query_loss_post_sum": post, "num_targets": count}
        if exact_match_rows:
            from metasft.evaluate import evaluate_rows

            n = min(exact_match_rows, len(task.query))
            # The query loss is already scored above: generate only.
            scores["exact_match"] = evaluate_rows(engine.model, tokenizer, task.query[:n], task.query_examples[:n],
                                                  batch_size=eval_batch_size, device=engine.device,
                                                  with_loss=False)["exact_match"]
    finally:
        engine.restore()
    return scores


def adapt_command(args) -> Path:
    """``metasft adapt``: load, adapt on a seeded choice of ``--n-shots`` rows, save atomically."""
    import json
    import shutil

    from metasft.checkpoint import load_pretrained
    from metasft.config import DataConfig
    from metasft.data.io import temporary_dir
    from metasft.data.tasks import encode_file
    from metasft.distributed import DistEnv
    from metasft.errors import MetasftError
    from metasft.model import quiet_peft, trainable_named_parameters
    from metasft.scope import parse_scope
    from metasft.distributed import resolve_device

    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        raise MetasftError(f"--output {output}: already exists and is not empty; choose a new directory")
    for flag in ("n_shots", "steps", "epochs", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise MetasftError(f"--{flag.replace('_', '-')}: {value} must be >= 1")
    if args.lr is not None and not args.lr > 0:
        raise MetasftError(f"--lr: {args.lr} must be > 0")
    model, tokenizer, saved = load_pretrained(args.checkpoint)
    meta = saved.meta if saved is not None else None
    scope = parse_scope(args.inner_scope or (meta.inner_scope if meta else "all"), key="--inner-scope")
    lr = args.lr if args.lr is not None else (meta.inner_lr if meta else None)
    batch_size = args.batch_size or (meta.inner_batch_size if meta else 8)
    if lr is None or (args.steps is None and args.epochs is None and meta is None):
        raise MetasftError(f"--checkpoint {args.checkpoint}: has no meta-training settings; give --lr and --steps or --epochs")
    data_cfg = saved.data if saved is not None else DataConfig()
    examples, rows = encode_file(args.data, data_cfg, tokenizer)
    if args.n_shots > len(examples):
        raise MetasftError(f"--n-shots: {args.n_shots} exceeds the {len(examples)} rows of {args.data}")
    shots = [rows[i] for i in select_shots(len(rows), args.n_shots, args.seed, "adapt")]
    batch_size = min(batch_size, len(shots))
    if args.steps is not None:
        steps = args.steps
    elif args.epochs is not None:
        steps = steps_for_epochs(len(shots), batch_size, args.epochs)
    else:
        steps = meta.num_inner_steps
    device = resolve_device(args.device, DistEnv())
    model.to(device).train()
    torch.manual_seed(args.seed)
    # Adapt exactly the scope the checkpoint was meta-trained to adapt, and nothing else.
    engine = InnerLoop(model, trainable_named_parameters(model), lr, steps, inner_scope=scope)
    learned = args.lr is None and load_learned_rates(engine, args.checkpoint)
    if learned and args.optimizer != "sgd":
        raise MetasftError(f"--optimizer {args.optimizer}: {args.checkpoint} has learned inner rates, which are SGD "
                           "step sizes; give --lr to adapt with another optimizer")
    adapt_rows(engine, shots, steps=steps, batch_size=batch_size, lr=lr, seed=args.seed, task="adapt",
               pad_token_id=tokenizer.pad_token_id, optimizer=args.optimizer)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(output.parent, f".{output.name}.tmp-")
    try:
        with quiet_peft():
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {"checkpoint": str(args.checkpoint), "data": str(args.data), "n_shots": args.n_shots, "steps": steps,
                "batch_size": batch_size, "lr": "learned" if learned else lr, "optimizer": args.optimizer,
                "inner_scope": str(scope),
                "seed": args.seed}
        (tmp / "adapt_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if output.exists():
            output.rmdir()
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    how = "the checkpoint's learned inner rates" if learned else f"lr {lr:g}"
    print(f"metasft: adapted {args.checkpoint} on {args.n_shots} rows ({steps} {args.optimizer} steps, {how}) -> {output}")
    return output
