"""``metasft train``: the meta-training loop, top to bottom.

    metasft train --config-name fomaml model.partial_pretrain=/models/qwen meta.tasks_dir=data/maml
    torchrun --nproc_per_node=2 -m metasft train --config-name fomaml ...   # task-parallel

Each meta-step: sample ``meta_batch_size`` tasks, let the algorithm add every task's contribution
to the meta-gradient (adapting on support, scoring on query), all-reduce it across ranks, clip,
and take one outer-optimizer step. Logging, held-out evaluation and checkpoints hang off the loop.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from metasft import distributed, faults
from metasft.distributed import resolve_device
from metasft.adapt import adapt_and_score
from metasft.algorithms import InnerLoop, build_algorithm
from metasft.checkpoint import (latest_checkpoint, load_model_weights, load_optimizer_state, read_inner_lrs,
                                read_model_weights, read_trainer_state, recover_run_dir, save_checkpoint)
from metasft.config import Config
from metasft.data.episodes import EpisodeSampler
from metasft.data.tasks import load_tasks
from metasft.errors import ConfigError, MetasftError
from metasft.loggers import MetricLogger
from metasft.model import count_parameters, is_peft_model, load_model, load_tokenizer, trainable_named_parameters
from metasft.scope import parse_scope


def build_optimizer(cfg: Config, params: list[torch.nn.Parameter],
                    rates: list[torch.nn.Parameter] = ()) -> torch.optim.Optimizer:
    """The outer optimizer of θ, with learned inner rates (``rates``) as a second group at
    ``meta.inner_lr_lr`` (``lr_scale`` keeps that ratio under the schedule) and no weight decay."""
    o = cfg.optim
    # The fused kernels (CPU and CUDA) update every parameter in one pass: AdamW's step is ~6×
    # faster than foreach on CPU. FSDP2's sharded DTensor parameters keep the foreach path.
    kernel = {"foreach": True} if distributed.has_dtensors(params) else {"fused": True}
    groups = [{"params": list(params), "lr_scale": 1.0}]
    if rates:
        groups.append({"params": list(rates), "lr_scale": cfg.meta.inner_lr_lr / cfg.meta.outer_lr,
                       "lr": cfg.meta.inner_lr_lr, "weight_decay": 0.0})
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.meta.outer_lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               **kernel)
    return torch.optim.AdamW(groups, lr=cfg.meta.outer_lr, betas=tuple(o.betas), eps=o.eps,
                             weight_decay=o.weight_decay, **kernel)


def learning_rate(cfg: Config, step: int) -> float:
    """Outer learning rate for 0-based meta-step ``step``: linear warmup, then constant/cosine/linear.
    A pure function of the step, so resuming needs no scheduler state."""
    base, total = cfg.meta.outer_lr, cfg.trainer.total_training_steps
    warmup = int(cfg.optim.warmup_steps_ratio * total)
    if step < warmup:
        return base * (step + 1) / warmup
    if cfg.optim.lr_scheduler == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    floor = cfg.optim.min_lr_ratio
    if cfg.optim.lr_scheduler == "cosine":
        return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    return base * (1 - (1 - floor) * progress)


# `auto` batches tasks only for models up to this many parameters. Measured on a 2-core CPU: batched
# full-weight FOMAML was 1.4–1.8× faster on 0.14M- and 1.1M-parameter models, and 0.74× (slower) on
# SmolLM2-135M, where every task's copy of the weights streams through memory at each inner step.
# META-LoRA on SmolLM2 (4 tasks × 10 rows × 70 tokens, K = 2) ran 0.98–1.13× as fast batched, but its
# peak RSS grew with the tasks in a pass — 3.3, 6.3 and 11.4 GB at 1, 2 and 4 — because a batched
# pass holds every task's activations at once (2.7 GB a task there). Nothing is measured in between
# or on a GPU, so the limit is a conservative guess between the two sizes (docs/benchmarks.md).
AUTO_BATCHING_MAX_MODEL_PARAMS = 10_000_000


def resolve_tasks_per_pass(cfg: Config, num_model_params: int | None = None,
                           tasks_by_rows: bool = False) -> tuple[int, str]:
    """How many tasks adapt together in one pass (1 = the sequential engine), and why.

    ``meta.task_batching: auto`` batches where it is supported (see
    :func:`~metasft.config.task_batching_conflict`) and was measured faster at no large cost in
    memory: models of up to ``AUTO_BATCHING_MAX_MODEL_PARAMS`` parameters, full weights or LoRA, and
    any model whose tasks run by rows (``tasks_by_rows``: MAML, FOMAML or Reptile with the head
    adapter as the inner scope over cached layers, :meth:`~metasft.algorithms.InnerLoop.factors_head`;
    2.9x faster a step on SmolLM2's head, benchmarks/head_paths.py, and only the target rows'
    activations). A
    lone task always runs sequentially, so a meta-batch of one gets no slower. ``true`` batches
    regardless (a conflict was already refused by config validation)."""
    from metasft.config import task_batching_conflict

    if cfg.meta.task_batching is False:
        return 1, "meta.task_batching=false"
    conflict = task_batching_conflict(cfg)
    if conflict:
        return 1, conflict
    if (cfg.meta.task_batching == "auto" and num_model_params is not None and not tasks_by_rows
            and num_model_params > AUTO_BATCHING_MAX_MODEL_PARAMS):
        return 1, (f"auto: batching tasks on a {num_model_params:,}-parameter model was measured slower or no faster "
                   "than sequential on a 135M model, with peak memory growing by every task's activations; "
                   "set meta.task_batching=true to batch anyway")
    per_pass = cfg.meta.tasks_per_pass or cfg.meta.meta_batch_size
    return per_pass, "" if per_pass > 1 else "one task per pass"


def accumulate_meta_gradient(engine: InnerLoop, algorithm, episodes, weight: float, want_pre: bool,
                             tasks_per_pass: int = 1) -> list:
    """This rank's meta-gradient into ``engine.meta_grad`` (zeroed first): every episode's contribution
    × ``weight``, ``tasks_per_pass`` tasks per batched pass (a lone task runs sequentially). θ is
    snapshotted before and restored after; returns each task's metrics."""
    engine.snapshot()
    engine.zero_meta_grad()
    task_metrics = []
    for start in range(0, len(episodes), tasks_per_pass):
        # The frozen layers' hidden states, once per distinct batch (and per row for the run, with
        # model.train_top_layers); with the graph to the meta-parameters below the split where needed.
        chunk = [engine.prepare_episode(ep, support_graph=algorithm.second_order, query_graph=algorithm.query_gradient)
                 for ep in episodes[start:start + tasks_per_pass]]
        engine.restore()  # the pass before may have left adapted weights in the model
        task_metrics += algorithm.run(engine, engine.stack(chunk), weight, want_pre=want_pre)
    engine.restore()
    return task_metrics


def run_meta_step(engine: InnerLoop, algorithm, episodes, num_tasks: int, optimizer: torch.optim.Optimizer,
                  clip_grad: float | None, want_pre: bool = False, sharded: bool = False, world_size: int = 1,
                  tasks_per_pass: int = 1, poison: bool = False) -> dict:
    """One meta-step on this rank's episodes: every task adds its contribution to the meta-gradient,
    which is all-reduced (task-parallel), checked to be finite, clipped, written to ``.grad`` and
    applied by the outer optimizer. Tasks go through the algorithm ``tasks_per_pass`` at a time
    (1: one after another). θ is restored before the step; returns the step's metrics and
    ``applied`` (False when a non-finite loss or gradient made it skip)."""
    task_metrics = accumulate_meta_gradient(engine, algorithm, episodes, algorithm.task_weight(num_tasks), want_pre,
                                            tasks_per_pass)
    if poison:  # a transient numerical fault, injected by tests (faults.poisoned)
        engine.meta_grad[0].view(-1)[0] = float("nan")
    if not sharded:  # under FSDP the gradients arrived already reduced, sharded like θ
        distributed.all_reduce_sum_(engine.meta_grad + engine.rates_meta_grad)
    sums = [sum(m.tokens for m in task_metrics), float(not all(m.finite for m in task_metrics)),
            sum(m.extra.get("loss_part", 0.0) for m in task_metrics)]
    for attr in ("query_loss_pre", "query_loss_post", "support_loss_first"):
        values = [getattr(m, attr) for m in task_metrics if getattr(m, attr) is not None]
        sums += [sum(values), len(values)]
    sums = distributed.all_reduce_scalars(sums, engine.device)
    if sharded:
        # Every rank saw every task: per-task values are partial sums over ranks, counts are not.
        sums[4::2] = [count / world_size for count in sums[4::2]]
    grad_norm = engine.meta_grad_norm(sharded=sharded)
    rates_finite = all(bool(torch.isfinite(g).all()) for g in engine.rates_meta_grad)
    applied = sums[1] == 0 and math.isfinite(grad_norm) and rates_finite
    if applied:
        if clip_grad is not None:  # θ's meta-gradient; the rates' group is not clipped (AdamW scales it)
            engine.clip_meta_grad(clip_grad, grad_norm)
        engine.write_meta_grad()
        engine.before_param_write()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        engine.project_rates()
    metrics = {"applied": applied, "grad_norm": grad_norm if math.isfinite(grad_norm) else None, "tokens": int(sums[0])}
    if engine.rates:
        values = torch.cat([r.detach().flatten() for r in engine.rates])
        metrics.update(inner_lr_mean=float(values.mean()), inner_lr_min=float(values.min()),
                       inner_lr_max=float(values.max()))
    for i, name in enumerate(("query_loss_pre", "query_loss_post", "support_loss")):
        total, count = sums[3 + 2 * i], sums[4 + 2 * i]
        metrics[name] = total / count if count else None
    if not algorithm.episodic:
        metrics["loss"] = sums[2]
    return metrics


class Trainer:
    """Holds the pieces of one run; ``fit()`` is the loop."""

    def __init__(self, cfg: Config, env: distributed.DistEnv):
        self.cfg, self.env = cfg, env
        self.device = resolve_device(cfg.trainer.device, env)
        self.run_dir = Path(cfg.trainer.default_local_dir)
        try:  # fail before minutes of loading, not at the first checkpoint
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"trainer.default_local_dir: cannot create {self.run_dir} ({exc.strerror})") from exc
        torch.manual_seed(cfg.trainer.seed)
        self.algorithm = build_algorithm(cfg.meta)
        if self.algorithm.second_order and cfg.model.attn_implementation not in (None, "sdpa", "eager"):
            # Fused kernels (flash-attn & co.) have no double backward; sdpa under the math kernel
            # does. Switch quietly: correctness of the meta-gradient is not the user's problem.
            cfg.model.attn_implementation = "sdpa"
        self.tokenizer = load_tokenizer(cfg.model)
        self.model = load_model(cfg.model).to(self.device)
        self.model.train()
        if cfg.model.train_top_layers is not None:
            from metasft.scope import restrict_trainable

            restrict_trainable(self.model, cfg.model.train_top_layers)
        self.lora = is_peft_model(self.model)
        # FSDP shards over ranks; at world size 1 there is nothing to shard and the plain path is
        # the same computation.
        self.fsdp = cfg.model.use_fsdp and env.world_size > 1
        if self.fsdp:
            from metasft.fsdp import shard_model

            shard_model(self.model, bf16=cfg.trainer.precision == "bf16")
        tasks = load_tasks(cfg.meta, cfg.data, self.tokenizer)
        self.train_tasks = [t for t in tasks if not t.held_out]
        if cfg.meta.algorithm == "metaicl":
            from metasft.data.in_context import metaicl_tasks

            self.train_tasks = metaicl_tasks(
                self.train_tasks, self.tokenizer, demos=cfg.meta.metaicl_demos,
                loss_on_demos=cfg.meta.metaicl_loss == "all", seed=cfg.trainer.seed, max_length=cfg.data.max_length,
                truncation=cfg.data.truncation, chat_template=cfg.data.chat_template)
        self.held_out_tasks = [t for t in tasks if t.held_out]
        # Periodic evaluation looks at validation tasks when there are any, so that watching a run
        # (or drawing its curve) never touches the tasks that final scores are measured on.
        validation = [t for t in tasks if t.validation]
        self.eval_tasks, self.eval_prefix = (validation, "val") if validation else (self.held_out_tasks, "heldout")
        if cfg.trainer.test_exact_match_rows and cfg.model.use_fsdp and env.world_size > 1:
            raise ConfigError("trainer.test_exact_match_rows: generation during training is not supported under "
                              "FSDP; set it to 0 or model.use_fsdp=false")
        self.pad_id = self.tokenizer.pad_token_id
        # Task-parallel: each rank takes whole tasks. FSDP: every rank takes a share of every batch.
        self.row_shard = (env.rank, env.world_size) if self.fsdp else (0, 1)
        self.sampler = EpisodeSampler(
            self.train_tasks, episodic=self.algorithm.episodic, meta_batch_size=cfg.meta.meta_batch_size,
            inner_batch_size=cfg.meta.inner_batch_size, query_batch_size=cfg.meta.query_batch_size,
            num_inner_steps=cfg.meta.num_inner_steps, seed=cfg.trainer.seed, pad_token_id=self.pad_id,
            device=self.device, row_shard=self.row_shard)
        self.named_params = trainable_named_parameters(self.model)
        self.engine = InnerLoop(self.model, self.named_params, cfg.meta.inner_lr, cfg.meta.num_inner_steps,
                                autocast_dtype=(torch.bfloat16 if cfg.trainer.precision == "bf16" and not self.fsdp
                                                else None),  # under FSDP its mixed-precision policy casts
                                grad_via_backward=self.fsdp, learn_inner_lr=cfg.meta.learn_inner_lr,
                                inner_scope=parse_scope(cfg.meta.inner_scope), prefix_cache=cfg.trainer.prefix_cache,
                                prefix_cache_dir=self._prefix_cache_dir())
        if self.fsdp:
            from metasft.fsdp import reshard_all

            self.engine.before_param_write = lambda: reshard_all(self.model)
        self.optimizer = build_optimizer(cfg, [p for _, p in self.named_params], self.engine.rates)
        self.tasks_per_pass, self.batching_off_reason = resolve_tasks_per_pass(
            cfg, num_model_params=count_parameters(self.model)[0],
            tasks_by_rows=self.engine.factors_head(2, self.algorithm.second_order, self.engine.update_rule(
                optimizer=getattr(self.algorithm, "inner_optimizer", "sgd"))))
        self.step = 0
        self._signal = 0
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        self.train_seconds = 0.0  # wall time spent in meta-steps, summed over resumes (for curves)
        self._resume()

    def _prefix_cache_dir(self) -> str | None:
        """Where the frozen prefix's rows live: ``trainer.prefix_cache_dir``, else memory when every
        row's states are estimated to fit in half the available memory, else beside the run."""
        t = self.cfg.trainer
        if not t.prefix_cache or self.cfg.model.train_top_layers is None:
            return None
        if t.prefix_cache_dir:
            return t.prefix_cache_dir
        rows = [r for task in self.train_tasks + self.eval_tasks for r in task.support + task.query]
        needed = sum(len(r) for r in rows) * self.model.config.hidden_size * 4  # fp32 states
        available = _available_memory()
        if available is None or needed <= available / 2:
            return None
        where = self.run_dir / "prefix_cache"
        if self.env.is_main:
            print(f"metasft: the frozen prefix of {len(rows):,} rows needs about {needed / 2**30:.1f} GiB, more than half "
                  f"of the {available / 2**30:.1f} GiB available: caching it on disk in {where}", flush=True)
        return str(where)

    # ------------------------------------------------------------------ resume / save
    def _resume(self) -> None:
        mode = self.cfg.trainer.resume_mode
        if mode == "disable":
            return
        if self.env.is_main:  # what a crash while saving left behind
            recover_run_dir(self.run_dir)
        distributed.barrier()
        checkpoint = latest_checkpoint(self.run_dir) if mode == "auto" else Path(mode)
        if checkpoint is None:
            return
        if not checkpoint.is_dir():
            raise ConfigError(f"trainer.resume_mode: checkpoint {checkpoint} not found")
        state = read_trainer_state(checkpoint)
        if bool(state.get("fsdp", False)) != self.fsdp:
            raise ConfigError(f"trainer.resume_mode: {checkpoint} was written with model.use_fsdp="
                              f"{str(bool(state.get('fsdp'))).lower()} on {state.get('world_size', 1)} ranks; resume it the same way")
        if self.fsdp:
            from metasft.fsdp import load_full_model_state, load_full_optimizer_state

            load_full_model_state(self.model, read_model_weights(checkpoint, lora=self.lora))
            load_full_optimizer_state(self.model, self.optimizer, load_optimizer_state(checkpoint, None))
        else:
            load_model_weights(self.model, checkpoint, lora=self.lora)
            if self.engine.rates:
                self.engine.load_rates(read_inner_lrs(checkpoint, required=True))
            load_optimizer_state(checkpoint, self.optimizer)
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        if self.env.is_main:
            print(f"metasft: resumed from {checkpoint} at meta-step {self.step}", flush=True)

    def save(self) -> Path | None:
        model_state = optimizer_state = None
        if self.fsdp:  # gather full tensors (a collective on every rank); rank 0 writes them
            from metasft.fsdp import full_model_state, full_optimizer_state

            model_state = full_model_state(self.model)
            optimizer_state = full_optimizer_state(self.model, self.optimizer)
        path = None
        if self.env.is_main:
            state = {"sampler": self.sampler.state_dict(), "nonfinite_total": self.nonfinite_total,
                     "nonfinite_streak": self.nonfinite_streak, "train_seconds": self.train_seconds,
                     "algorithm": self.algorithm.name, "lora": self.lora, "fsdp": self.fsdp,
                     "inner_scope": self.cfg.meta.inner_scope, "train_top_layers": self.cfg.model.train_top_layers,
                     "world_size": self.env.world_size}
            path = save_checkpoint(self.run_dir, self.step, self.model, self.tokenizer, self.cfg.to_yaml(),
                                   self.optimizer, state, keep=self.cfg.trainer.keep, model_state=model_state,
                                   optimizer_state=optimizer_state,
                                   inner_lrs=self.engine.rates_by_name() if self.engine.rates else None)
        distributed.barrier()
        return path

    # ------------------------------------------------------------------ one meta-step
    def meta_step(self, want_logs: bool) -> dict:
        cfg = self.cfg
        lr = learning_rate(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        started = time.perf_counter()
        mine = (lambda ids: ids) if self.fsdp else (lambda ids: distributed.shard(ids, self.env))
        episodes, num_tasks = self.sampler.episodes(self.step, mine=mine)
        result = run_meta_step(self.engine, self.algorithm, episodes, num_tasks, self.optimizer, cfg.optim.clip_grad,
                               want_pre=want_logs, sharded=self.fsdp, world_size=self.env.world_size,
                               tasks_per_pass=self.tasks_per_pass, poison=faults.poisoned(self.step))
        if result.pop("applied"):
            self.nonfinite_streak = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_streak += 1
        self.step += 1
        elapsed = time.perf_counter() - started
        self.train_seconds += elapsed
        if self.engine.prefix_cache is not None:
            result["prefix_cache_mb"] = self.engine.prefix_cache.bytes / 2**20
        return {"lr": lr, **result, "tokens_per_s": result["tokens"] / elapsed, "step_time_s": elapsed,
                "train_seconds": self.train_seconds, "nonfinite_skipped": self.nonfinite_total}

    def evaluate_held_out(self) -> dict:
        """Adapt to each evaluation task (validation tasks if any, else held-out) as `metasft adapt`
        would and average its query losses (and exact match, with trainer.test_exact_match_rows)."""
        cfg = self.cfg
        mine = self.eval_tasks if self.fsdp else distributed.shard(self.eval_tasks, self.env)
        per_task = []  # [pre_sum, post_sum, count, exact match] of each task this rank (partly, under FSDP) scored
        for task in mine:
            scores = adapt_and_score(self.engine, task, num_steps=cfg.meta.num_inner_steps,
                                     batch_size=cfg.meta.inner_batch_size, eval_batch_size=cfg.meta.query_batch_size,
                                     seed=cfg.trainer.seed, pad_token_id=self.pad_id, row_shard=self.row_shard,
                                     exact_match_rows=cfg.trainer.test_exact_match_rows, tokenizer=self.tokenizer)
            per_task.append([scores["query_loss_pre_sum"], scores["query_loss_post_sum"], scores["num_targets"],
                             scores.get("exact_match", 0.0)])
        if self.fsdp:  # sum each task's partial losses over ranks, then average the task means
            flat = distributed.all_reduce_scalars([x for t in per_task for x in t[:2]], self.device)
            means = [(flat[2 * i] / max(t[2], 1), flat[2 * i + 1] / max(t[2], 1)) for i, t in enumerate(per_task)]
            sums = [sum(m[0] for m in means), sum(m[1] for m in means), len(means), 0.0]
        else:
            sums = [sum(t[0] / max(t[2], 1) for t in per_task), sum(t[1] / max(t[2], 1) for t in per_task),
                    len(per_task), sum(t[3] for t in per_task)]
            sums = distributed.all_reduce_scalars(sums, self.device)
        if not sums[2]:
            return {}
        p = self.eval_prefix
        metrics = {f"{p}/query_loss_pre": sums[0] / sums[2], f"{p}/query_loss_post": sums[1] / sums[2]}
        if cfg.trainer.test_exact_match_rows:
            metrics[f"{p}/exact_match"] = sums[3] / sums[2]
        return metrics

    # ------------------------------------------------------------------ the loop
    def _budget_spent(self, started: float, budget: float) -> bool:
        # Every rank must stop at the same step: any rank over budget stops them all.
        over = float(time.monotonic() - started >= budget)
        return distributed.all_reduce_scalars([over], self.device)[0] > 0

    def _stop_requested(self) -> int:
        """The signal (SIGINT/SIGTERM) any rank has received, agreed on by every rank, or 0."""
        return int(distributed.all_reduce_scalars([float(self._signal)], self.device)[0]) if self.env.distributed \
            else self._signal

    def fit(self) -> Path | None:
        cfg, t = self.cfg, self.cfg.trainer
        total = t.total_training_steps
        logger = MetricLogger(t.logger, self.run_dir, t.project_name, t.experiment_name, cfg.to_dict(),
                              resume_step=self.step, enabled=self.env.is_main)
        display = _ConsoleDisplay(total, self.step, enabled=self.env.is_main and "console" in t.logger)
        last_saved = None
        started = time.monotonic()
        with _StopOnSignal(self):
            try:
                while self.step < total:
                    if t.time_budget_s is not None and self._budget_spent(started, t.time_budget_s):
                        if last_saved is None or last_saved.name != f"step_{self.step}":
                            last_saved = self.save()
                        break
                    want_logs = (self.step + 1) % t.log_freq == 0 or self.step + 1 == total
                    metrics = self.meta_step(want_logs)
                    faults.point("meta_step.end", self.step)
                    if self.nonfinite_streak >= t.max_nonfinite_steps:
                        raise MetasftError(
                            f"training stopped at meta-step {self.step}: non-finite loss or gradient for "
                            f"{self.nonfinite_streak} consecutive meta-steps (lower meta.inner_lr/meta.outer_lr, or "
                            f"use trainer.precision=fp32); last checkpoint: {latest_checkpoint(self.run_dir) or 'none'}")
                    if held_out_due := (self.eval_tasks and t.test_freq > 0
                                        and (self.step % t.test_freq == 0 or self.step == total)):
                        metrics.update(self.evaluate_held_out())
                    if want_logs or held_out_due:
                        logger.log(self.step, metrics)
                    display.update(self.step, metrics)
                    if self.step == total or (t.save_freq > 0 and self.step % t.save_freq == 0):
                        last_saved = self.save()
                    if signum := self._stop_requested():
                        # Between meta-steps θ is consistent: saving here loses nothing.
                        if last_saved is None or last_saved.name != f"step_{self.step}":
                            last_saved = self.save()
                        raise TrainingInterrupted(signum, self.step, last_saved)
            finally:
                display.close()
                logger.close()
        return last_saved or latest_checkpoint(self.run_dir)


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; the run stopped after a meta-step and saved a checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        import signal

        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after meta-step {step}; saved {checkpoint}; "
                         "run the same command again to resume (trainer.resume_mode=auto)")


class _StopOnSignal:
    """While training, SIGINT/SIGTERM ask the loop to stop at the end of the current meta-step
    (a second signal stops at once, the checkpoints on disk being complete either way)."""

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer
        self.previous: dict[int, object] = {}

    def __enter__(self):
        import signal
        import threading

        self.trainer._signal = 0
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.trainer._signal:
            raise KeyboardInterrupt
        self.trainer._signal = signum

    def __exit__(self, *exc):
        import signal

        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False


class _ConsoleDisplay:
    """A rich progress bar (meta-step, query loss before → after adaptation, tokens/s, ETA) on a
    terminal; plain lines when output is redirected."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled = enabled
        self.progress = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.every = max(1, total // 20)
        if self.console.is_terminal:
            self.progress = Progress(TextColumn("meta-step"), MofNCompleteColumn(), BarColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console)
            self.task = self.progress.add_task("train", total=total, completed=start, info="")
            self.progress.start()
        self.total = total

    @staticmethod
    def _info(metrics: dict) -> str:
        parts = []
        if metrics.get("query_loss_post") is not None:
            pre = metrics.get("query_loss_pre")
            parts.append(f"query {pre:.3f} → {metrics['query_loss_post']:.3f}" if pre is not None
                         else f"query {metrics['query_loss_post']:.3f}")
        if metrics.get("loss") is not None:
            parts.append(f"loss {metrics['loss']:.3f}")
        for prefix, label in (("heldout", "held-out"), ("val", "validation")):
            if metrics.get(f"{prefix}/query_loss_post") is not None:
                parts.append(f"{label} {metrics[f'{prefix}/query_loss_pre']:.3f} → {metrics[f'{prefix}/query_loss_post']:.3f}")
            if metrics.get(f"{prefix}/exact_match") is not None:
                parts.append(f"exact match {metrics[f'{prefix}/exact_match']:.2f}")
        parts.append(f"{metrics['tokens_per_s']:.0f} tok/s")
        return " | ".join(parts)

    def update(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=self._info(metrics))
        elif step % self.every == 0 or step == self.total:
            self.console.print(f"meta-step {step}/{self.total} | {self._info(metrics)}", markup=False, highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def train(cfg: Config) -> Path | None:
    """Run meta-training for ``cfg``; returns the last checkpoint directory."""
    device_type = "cuda" if cfg.trainer.device.startswith("cuda") or (
        cfg.trainer.device == "auto" and torch.cuda.is_available()) else "cpu"
    env = distributed.init(device_type)
    try:
        return _train(cfg, env)
    finally:
        # The trainer, its model and (under FSDP) the DeviceMeshes its DTensors hold are released
        # by now, so destroying the group joins gloo's threads here instead of at interpreter exit.
        distributed.shutdown()


def _train(cfg: Config, env: distributed.DistEnv) -> Path | None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display is the one to read
    if cfg.model.partial_pretrain is None:
        raise ConfigError("model.partial_pretrain: not set; give a local model directory or a hub id")
    if env.is_main:
        from rich.console import Console

        console = Console()  # stdout: the resolved config is output, errors go to stderr
        console.print("[bold]metasft train[/bold] resolved config:")
        console.print(cfg.to_yaml(), markup=False, highlight=False)
    trainer = Trainer(cfg, env)
    if env.is_main:
        total, trainable = count_parameters(trainer.model)
        print(f"metasft: {cfg.meta.algorithm} on {len(trainer.train_tasks)} tasks "
              f"({len(trainer.held_out_tasks)} held out); parameters {total:,} total, {trainable:,} meta-learned"
              f"{' (LoRA)' if trainer.lora else ''}; world size {env.world_size}", flush=True)
        engine = trainer.engine
        if len(engine.inner_params) < len(engine.params):
            inner = sum(p.numel() for p in engine.inner_params)
            print(f"metasft: inner scope {cfg.meta.inner_scope}: {inner:,} parameters adapted in the inner loop", flush=True)
        if engine.window is not None:
            cache = engine.prefix_cache
            cached = "" if cache is None else (f"; layers below {cache.cut} cached per row for the run"
                                               + (f" on disk in {cache.directory}" if cache.directory else " in memory"))
            print(f"metasft: layers below {engine.split_at} of {engine.window.parts.num_layers} run once per batch{cached}",
                  flush=True)
        if trainer.tasks_per_pass > 1:
            print(f"metasft: task batching on: up to {trainer.tasks_per_pass} tasks per batched pass", flush=True)
        elif trainer.algorithm.episodic:
            print(f"metasft: task batching off ({trainer.batching_off_reason})", flush=True)
    last = trainer.fit()
    # Every rank has finished its last collective before any rank tears its connections down.
    distributed.barrier()
    return last
