"""``metasft bench``: does meta-learning pay off? Methods × held-out tasks × n_shots × seeds.

    metasft bench --config bench.yaml

Every method — a train config to run, or an existing checkpoint; the un-meta-trained base model
and multi-task SFT are always included — is adapted to each held-out task with **one protocol**
(the same seeded shots, optimizer, learning rate, steps and batch size for all) and evaluated on
the task's query set. Outputs in ``output_dir``: ``results.csv`` (one row per method, task,
n_shots, seed), ``results.json``, ``results.md`` (mean and 95% interval over tasks × seeds) and
``adaptation.png``, with wall time and peak memory per method. A method with a ``grid`` is a
hyperparameter sweep: its variants are ranked in ``sweep.md`` and the best written to
``best_config.yaml``.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from metasft.config import DataConfig, _build, _f, load_config, load_yaml
from metasft.errors import ConfigError, MetasftError

METRICS = ("query_loss", "token_accuracy", "exact_match", "rouge_l")
ADAPTATIONS = ("gradient", "in_context")
HIGHER_IS_BETTER = {"query_loss": False, "token_accuracy": True, "exact_match": True, "rouge_l": True}


@dataclass
class MethodSpec:
    name: str = _f("", "Method name (a column in the tables).")
    config: Optional[str] = _f(None, "A train config (YAML path) to run.")
    config_name: Optional[str] = _f(None, "A shipped train config to run (fomaml, maml, reptile, meta_lora, sft).")
    checkpoint: Optional[str] = _f(None, "An existing checkpoint to evaluate instead of training.")
    overrides: list[str] = _f([], "Dotted overrides for this method's train config.")
    grid: list[str] = _f([], "Sweep: 'key=[v1, v2]' entries; every combination becomes a variant.")
    adaptations: Optional[list[str]] = _f(None, "This method's adaptations (gradient, in_context); null = the bench's.")


@dataclass
class AdaptProtocol:
    optimizer: Literal["sgd", "adamw"] = _f("sgd", "Adaptation optimizer, shared by all methods.")
    lr: float = _f(0.1, "Adaptation learning rate, shared by all methods (when lr_grid is empty).")
    lr_grid: list[float] = _f([], "Choose each method's adaptation learning rate per n_shots from these values "
                                  "on the validation tasks (best mean metric); overrides lr.")
    steps: int = _f(5, "Adaptation steps.")
    batch_size: int = _f(10, "Examples per adaptation step (all shots when fewer).")
    inner_scope: str = _f("all", "What every method adapts: all, head (ANIL's) or top_layers:N.")


@dataclass
class EvalSettings:
    batch_size: int = _f(32, "Rows per evaluation / generation batch.")
    max_new_tokens: Optional[int] = _f(None, "Generation length (null: longest reference + 4 tokens).")
    max_query_rows: Optional[int] = _f(None, "Evaluate on at most this many query rows per task.")
    generation: bool = _f(True, "Generate for exact match and ROUGE-L (off: loss and token accuracy only).")


@dataclass
class BenchConfig:
    base_model: str = _f("", "The un-meta-trained model every method starts from (directory or hub id).")
    tasks_dir: str = _f("", "A prepared directory (`metasft prepare` or the synthetic suite).")
    held_out_tasks: list[str] = _f([], "Tasks to evaluate on (default: the manifest's held-out test tasks).")
    validation_tasks: list[str] = _f([], "Tasks on which adapt.lr_grid is decided (default: the manifest's "
                                         "validation tasks); never scored in the results.")
    methods: list[MethodSpec] = _f([], "Methods to compare; base and sft are added when missing.")
    n_shots: list[int] = _f([10, 50, 100], "Support examples given to each adaptation.")
    adaptations: list[str] = _f(["gradient"], "How each method uses the n_shots examples: gradient (fine-tune "
                                              "with the adapt protocol) and/or in_context (the same examples "
                                              "rendered before each query row, no gradient step).")
    seeds: list[int] = _f([0], "Seeds: which shots are drawn and the adaptation batch order.")
    adapt: AdaptProtocol = field(default_factory=AdaptProtocol)
    eval: EvalSettings = field(default_factory=EvalSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train_overrides: list[str] = _f([], "Overrides applied to every trained method (e.g. trainer.total_training_steps=200).")
    train_parallel: int = _f(1, "Methods trained at the same time, each in its own process (2 suits a 2-core CPU with tiny models).")
    train_threads: Optional[int] = _f(None, "Threads per training process (OMP_NUM_THREADS; null = the available cores divided by train_parallel).")
    metric: Literal["exact_match", "rouge_l", "token_accuracy", "query_loss"] = _f("exact_match", "Metric of the plot and the sweep ranking.")
    select_checkpoint: Literal["last", "best_validation"] = _f(
        "last", "Which checkpoint of a trained method is evaluated: its last, or best_validation = the one "
                "whose periodic evaluation on the validation tasks scored best (val/exact_match when logged, "
                "ties and otherwise the lower val/query_loss_post). Needs validation tasks and "
                "trainer.test_freq > 0; a checkpoint is then saved at every evaluation.")
    output_dir: str = _f("bench", "Where results, runs and plots go.")
    device: str = _f("auto", "Device for adaptation and evaluation.")


def load_bench_config(path: str | os.PathLike, overrides: list[str] = ()) -> BenchConfig:
    from metasft.config import apply_override

    data = load_yaml(path)
    for override in overrides:
        apply_override(data, override)
    cfg = _build(BenchConfig, data, prefix="")
    if not cfg.base_model:
        raise ConfigError("base_model: required (the model every method starts from)")
    if not cfg.tasks_dir:
        raise ConfigError("tasks_dir: required (a prepared task directory)")
    for key, value in [("adaptations", cfg.adaptations)] + [
            (f"methods[{i}].adaptations", m.adaptations) for i, m in enumerate(cfg.methods) if m.adaptations is not None]:
        if not value or len(set(value)) != len(value) or not set(value) <= set(ADAPTATIONS):
            raise ConfigError(f"{key}: {value} must list some of {', '.join(ADAPTATIONS)}, each once")
    for key in ("n_shots", "seeds"):
        if not getattr(cfg, key):
            raise ConfigError(f"{key}: give at least one value")
    if any(n < 1 for n in cfg.n_shots):
        raise ConfigError(f"n_shots: {cfg.n_shots} must all be >= 1")
    if cfg.train_parallel < 1 or (cfg.train_threads is not None and cfg.train_threads < 1):
        raise ConfigError("train_parallel and train_threads must be >= 1")
    if cfg.adapt.lr <= 0 or cfg.adapt.steps < 1 or cfg.adapt.batch_size < 1:
        raise ConfigError("adapt: lr must be > 0, steps and batch_size >= 1")
    from metasft.scope import parse_scope

    parse_scope(cfg.adapt.inner_scope, key="adapt.inner_scope")
    if any(not lr > 0 for lr in cfg.adapt.lr_grid):
        raise ConfigError(f"adapt.lr_grid: {cfg.adapt.lr_grid} must all be > 0")
    if overlap := set(cfg.validation_tasks) & set(cfg.held_out_tasks):
        raise ConfigError(f"validation_tasks: task {sorted(overlap)[0]!r} is also in held_out_tasks; "
                          "choices must not be made on the tasks that are scored")
    names = set()
    for i, method in enumerate(cfg.methods):
        sources = [s for s in (method.config, method.config_name, method.checkpoint) if s]
        if not method.name or len(sources) != 1:
            raise ConfigError(f"methods[{i}]: give a name and exactly one of config, config_name, checkpoint")
        if method.name in names or method.name == "base":
            raise ConfigError(f"methods[{i}].name: {method.name!r} is used twice (or is the reserved 'base')")
        names.add(method.name)
        if method.grid and method.checkpoint:
            raise ConfigError(f"methods[{i}].grid: a checkpoint cannot be swept")
    return cfg


# ----------------------------------------------------------------------------- methods

@dataclass
class ResolvedMethod:
    name: str
    checkpoint: Optional[Path] = None  # evaluate this
    train_config: Any = None           # or train this Config first
    sweep_of: Optional[str] = None     # the method a grid variant comes from
    settings: dict = field(default_factory=dict)
    adaptations: Optional[list[str]] = None  # None: the bench's


def _expand_grid(grid: list[str]) -> list[list[tuple[str, Any]]]:
    axes = []
    for entry in grid:
        if "=" not in entry:
            raise ConfigError(f"grid: {entry!r} must be key=[v1, v2, ...]")
        key, raw = entry.split("=", 1)
        values = yaml.safe_load(raw)
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid: {key} must list at least one value, got {raw!r}")
        axes.append([(key.strip(), v) for v in values])
    return [list(combo) for combo in itertools.product(*axes)]


def resolve_methods(cfg: BenchConfig, out: Path, num_train_tasks: int) -> list[ResolvedMethod]:
    """Turn the config's methods into runs; add the base model and multi-task SFT when missing."""
    common = [f"model.partial_pretrain={cfg.base_model}", f"meta.tasks_dir={cfg.tasks_dir}", "meta.tasks=[]",
              "trainer.logger=[jsonl]", "trainer.test_freq=-1"]
    common += [f"data.{k}={json.dumps(v)}" for k, v in vars(cfg.data).items()]
    resolved = [ResolvedMethod("base", checkpoint=Path(cfg.base_model))]
    methods = list(cfg.methods)
    for method in methods:  # fail before anything is trained
        if method.checkpoint and not Path(method.checkpoint).exists():
            raise ConfigError(f"method {method.name}: {method.checkpoint}: no such checkpoint directory")
    has_sft = False
    for method in methods:
        if method.checkpoint:
            resolved.append(ResolvedMethod(method.name, checkpoint=Path(method.checkpoint),
                                           adaptations=method.adaptations))
            continue
        variants = _expand_grid(method.grid) if method.grid else [[]]
        for variant in variants:
            suffix = ",".join(f"{k.split('.')[-1]}={v}" for k, v in variant)
            name = f"{method.name}[{suffix}]" if suffix else method.name
            overrides = common + cfg.train_overrides + method.overrides + [f"{k}={json.dumps(v)}" for k, v in variant]
            overrides.append(f"trainer.default_local_dir={out / 'runs' / _safe(name)}")
            train_cfg = load_config(path=method.config, name=method.config_name, overrides=overrides)
            _check_trainable(name, train_cfg, num_train_tasks)
            _keep_evaluated_checkpoints(cfg, name, train_cfg)
            has_sft |= train_cfg.meta.algorithm == "sft"
            resolved.append(ResolvedMethod(name, train_config=train_cfg, sweep_of=method.name if method.grid else None,
                                           settings=dict(variant), adaptations=method.adaptations))
    if not has_sft and not any(m.name == "sft" for m in cfg.methods):
        overrides = common + cfg.train_overrides + [f"trainer.default_local_dir={out / 'runs' / 'sft'}"]
        sft_cfg = load_config(name="sft", overrides=overrides)
        _check_trainable("sft", sft_cfg, num_train_tasks)
        _keep_evaluated_checkpoints(cfg, "sft", sft_cfg)
        resolved.insert(1, ResolvedMethod("sft", train_config=sft_cfg))
    return resolved


def _check_trainable(name: str, train_cfg, num_train_tasks: int) -> None:
    if train_cfg.meta.meta_batch_size > num_train_tasks:
        raise ConfigError(f"method {name}: meta.meta_batch_size={train_cfg.meta.meta_batch_size} is larger than the "
                          f"{num_train_tasks} meta-training tasks (set it in train_overrides)")


def _keep_evaluated_checkpoints(cfg: BenchConfig, name: str, train_cfg) -> None:
    """For select_checkpoint=best_validation: save a checkpoint at every periodic evaluation."""
    if cfg.select_checkpoint != "best_validation":
        return
    trainer = train_cfg.trainer
    if trainer.test_freq <= 0:
        raise ConfigError(f"select_checkpoint: best_validation needs periodic evaluation, but method {name} has "
                          "trainer.test_freq=-1 (set it in train_overrides)")
    trainer.save_freq, trainer.keep = trainer.test_freq, None


def best_validation_step(run_dir: Path, metric: str) -> tuple[int, str]:
    """The meta-step whose validation evaluation scored best in ``run_dir/metrics.jsonl``, and the key
    it was chosen by: ``val/exact_match`` (higher, ties to the lower query loss) when ``metric`` is
    exact match and the run logged it, else ``val/query_loss_post`` (lower). Held-out tasks are
    never looked at: a run that evaluated held-out tasks (no validation tasks) is refused."""
    path = run_dir / "metrics.jsonl"
    records = {}
    if path.is_file():  # the last record of a step wins (a resumed run logs its steps again)
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                if "val/query_loss_post" in record:
                    records[record["step"]] = record
    if not records:
        raise MetasftError(f"select_checkpoint: {path} has no evaluation on validation tasks")
    by_em = metric == "exact_match" and all("val/exact_match" in r for r in records.values())
    key = "val/exact_match" if by_em else "val/query_loss_post"
    rank = (lambda r: (r["val/exact_match"], -r["val/query_loss_post"])) if by_em else (lambda r: -r["val/query_loss_post"])
    best = max(sorted(records), key=lambda step: rank(records[step]))  # an exact tie keeps the earliest
    return best, key


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=," else "_" for c in name)


def train_methods(methods: list[ResolvedMethod], out: Path, parallel: int, threads: int | None,
                  console) -> dict[str, tuple[Path, float, float]]:
    """Train each method in a fresh process (its own peak memory, its own crash), ``parallel`` at a
    time; returns name -> (checkpoint, wall seconds, peak RSS MiB)."""
    from metasft.checkpoint import latest_checkpoint

    from metasft.threads import threads_per_process

    # ``parallel`` trainings share this process's cores: each gets its share, not all of them.
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": str(threads if threads is not None else threads_per_process(parallel))}
    pending = list(methods)
    running: dict[int, tuple[ResolvedMethod, subprocess.Popen, float, Path, Any]] = {}
    results: dict[str, tuple[Path, float, float]] = {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                method = pending.pop(0)
                run_dir = Path(method.train_config.trainer.default_local_dir)
                run_dir.mkdir(parents=True, exist_ok=True)
                config_path = run_dir / "train_config.yaml"
                config_path.write_text(method.train_config.to_yaml(), encoding="utf-8")
                log_path = out / "runs" / f"{_safe(method.name)}.log"
                log = open(log_path, "w", encoding="utf-8")
                console.print(f"training {method.name} ({method.train_config.meta.algorithm}, "
                              f"lora_rank={method.train_config.model.lora_rank}), log: {log_path}",
                              markup=False, highlight=False)
                proc = subprocess.Popen([sys.executable, "-m", "metasft", "train", "--config", str(config_path)],
                                        stdout=log, stderr=subprocess.STDOUT, env=env)
                running[proc.pid] = (method, proc, time.perf_counter(), log_path, log)
            # wait4 reaps one child and gives *its* resource usage (peak RSS of that process only).
            pid, status, usage = os.wait4(-1, 0)
            if pid not in running:
                continue
            method, proc, started, log_path, log = running.pop(pid)
            log.close()
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                tail = [line for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()][-1:]
                raise MetasftError(f"method {method.name}: training failed (exit {proc.returncode}): "
                                   f"{tail[0] if tail else ''} (log: {log_path})")
            checkpoint = latest_checkpoint(method.train_config.trainer.default_local_dir)
            if checkpoint is None:
                raise MetasftError(f"method {method.name}: training wrote no checkpoint (log: {log_path})")
            results[method.name] = (checkpoint, time.perf_counter() - started, usage.ru_maxrss / 1024)
    finally:
        for _, proc, _, _, log in running.values():
            proc.kill()
            proc.wait()
            log.close()
    return results


# ----------------------------------------------------------------------------- evaluation

def evaluate_method(name: str, checkpoint: Path, cfg: BenchConfig, tasks, device, on_done=lambda: None,
                    validation_tasks=(), adaptations: list[str] | None = None
                    ) -> tuple[list[dict], dict[int, float], list[dict]]:
    """Adapt ``checkpoint`` to every (task, n_shots, seed) with the shared protocol and score it.

    With ``adapt.lr_grid`` the learning rate for each n_shots is first chosen on ``validation_tasks``
    (best mean ``cfg.metric``, ties to the lower query loss). Returns the held-out rows, the learning
    rate used per n_shots, and the validation rows behind the choice."""
    import torch

    from metasft.adapt import adapt_rows, load_learned_rates, select_shots
    from metasft.algorithms import InnerLoop
    from metasft.checkpoint import load_pretrained
    from metasft.data.in_context import render_in_context
    from metasft.evaluate import evaluate_rows
    from metasft.model import trainable_named_parameters
    from metasft.scope import parse_scope

    model, tokenizer, _ = load_pretrained(checkpoint, key=f"method {name}:")
    model.to(device)
    model.train()
    engine = InnerLoop(model, trainable_named_parameters(model), cfg.adapt.lr, cfg.adapt.steps,
                       inner_scope=parse_scope(cfg.adapt.inner_scope))
    # A checkpoint with learned inner rates adapts with them (SGD), the adaptation it was trained for;
    # there is then no learning rate to choose.
    learned = cfg.adapt.optimizer == "sgd" and load_learned_rates(engine, checkpoint)
    engine.snapshot()

    def shot_indices(task, n_shots: int, seed: int) -> list[int]:
        """The seeded draw every method and both adaptations use."""
        if n_shots > len(task.support):
            raise ConfigError(f"n_shots: {n_shots} exceeds task {task.name!r}'s {len(task.support)} support rows")
        return select_shots(len(task.support), n_shots, seed, task.name)

    def score(task, n_shots: int, seed: int, lr: float) -> dict:
        query_rows = task.query[: cfg.eval.max_query_rows] if cfg.eval.max_query_rows else task.query
        torch.manual_seed(seed)
        shots = [task.support[i] for i in shot_indices(task, n_shots, seed)]
        started = time.perf_counter()
        adapt_rows(engine, shots, steps=cfg.adapt.steps, batch_size=min(cfg.adapt.batch_size, n_shots),
                   lr=cfg.adapt.lr if lr is None else lr, seed=seed, task=task.name, pad_token_id=tokenizer.pad_token_id,
                   optimizer=cfg.adapt.optimizer)
        adapt_seconds = time.perf_counter() - started
        scores = evaluate_rows(model, tokenizer, query_rows, task.query_examples[: len(query_rows)],
                               batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                               with_generation=cfg.eval.generation, device=device)
        engine.restore()
        on_done()
        return {"method": name, "adaptation": "gradient", "task": task.name, "n_shots": n_shots, "seed": seed,
                **{m: scores.get(m) for m in METRICS}, "adapt_lr": None if learned else lr, "shots_used": float(n_shots),
                "shots_used_min": n_shots, "adapt_seconds": adapt_seconds}

    def score_in_context(task, n_shots: int, seed: int) -> dict:
        """The same seeded shots rendered before each query row (data.max_length permitting)."""
        count = min(len(task.query), cfg.eval.max_query_rows or len(task.query))
        shots = [task.support_examples[i] for i in shot_indices(task, n_shots, seed)]
        rendered = [render_in_context(shots, example, tokenizer, max_length=cfg.data.max_length,
                                      truncation=cfg.data.truncation, chat_template=cfg.data.chat_template)
                    for example in task.query_examples[:count]]
        used = [n for _, n in rendered]
        scores = evaluate_rows(model, tokenizer, [row for row, _ in rendered], task.query_examples[:count],
                               batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                               with_generation=cfg.eval.generation, device=device)
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
            for lr in cfg.adapt.lr_grid:
                trial = [score(task, n_shots, seed, lr) for task in validation_tasks for seed in cfg.seeds]
                validation_rows += trial
                ranking.append((_mean(trial, cfg.metric), _mean(trial, "query_loss"), lr))
            sign = 1 if HIGHER_IS_BETTER[cfg.metric] else -1
            # A metric that was not computed (generation off) leaves the query loss to decide.
            chosen[n_shots] = max(ranking, key=lambda r: (0.0 if math.isnan(r[0]) else sign * r[0], -r[1]))[2]
    rows += [score(task, n_shots, seed, chosen[n_shots])
             for task in tasks for n_shots in cfg.n_shots for seed in cfg.seeds]
    return rows, chosen, validation_rows


def _mean(rows: list[dict], metric: str) -> float:
    values = [r[metric] for r in rows if r[metric] is not None]
    return sum(values) / len(values) if values else math.nan


# ----------------------------------------------------------------------------- aggregation

_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = _T975[n - 2] if n - 2 < len(_T975) else 1.96
    return mean, t * sd / math.sqrt(n)


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row.get("adaptation", "gradient"), row["n_shots"]), []).append(row)
    summary = []
    for (method, adaptation, n_shots), group in groups.items():
        entry = {"method": method, "adaptation": adaptation, "n_shots": n_shots, "n": len(group),
                 "shots_used": sum(r.get("shots_used", n_shots) for r in group) / len(group)}
        for metric in METRICS:
            values = [r[metric] for r in group if r[metric] is not None]
            if values:
                entry[metric], entry[f"{metric}_ci95"] = mean_ci(values)
        summary.append(entry)
    return summary


def markdown_table(summary: list[dict], methods_info: dict[str, dict], chosen_on: list[str] | None = None) -> str:
    lines = ["| method | adaptation | n_shots | shots used | adaptation lr | exact match | ROUGE-L | token accuracy "
             "| query loss |", "|---|---|---|---|---|---|---|---|---|"]
    for entry in summary:
        cells = []
        for metric in ("exact_match", "rouge_l", "token_accuracy", "query_loss"):
            cells.append(f"{entry[metric]:.3f} ± {entry[metric + '_ci95']:.3f}" if metric in entry else "–")
        in_context = entry["adaptation"] == "in_context"
        info = methods_info.get(entry["method"], {})
        lr = None if in_context else info.get("adapt_lr", {}).get(str(entry["n_shots"]))
        shown = "learned" if info.get("learned_inner_lrs") and not in_context else "–" if lr is None else f"{lr:g}"
        lines.append(f"| {entry['method']} | {entry['adaptation']} | {entry['n_shots']} | {entry['shots_used']:.1f} | "
                     f"{shown} | " + " | ".join(cells) + " |")
    if chosen_on:
        lines += ["", f"Adaptation learning rates were chosen per method and n_shots on {len(chosen_on)} validation "
                      "tasks (validation.csv), never on the held-out tasks above."]
    selected = any("selected_step" in info for info in methods_info.values())
    lines += ["", "| method | meta-training steps | " + ("evaluated checkpoint | " if selected else "")
              + "training wall time (s) | training peak RSS (MiB) | evaluation wall time (s) |",
              "|---|---|---|---|---|" + ("---|" if selected else "")]
    for name, info in methods_info.items():
        chosen = [f"step {info['selected_step']}" if "selected_step" in info else "–"] if selected else []
        lines.append(" | ".join([f"| {name}", str(info.get("steps", "–")), *chosen, _fmt(info.get("train_seconds")),
                                 _fmt(info.get("train_peak_mib")), _fmt(info.get("eval_seconds"))]) + " |")
    if selected:
        keys = sorted({info["selected_by"] for info in methods_info.values() if "selected_by" in info})
        lines += ["", f"Each trained method is evaluated at the checkpoint whose periodic evaluation on the "
                      f"validation tasks scored best ({', '.join(keys)}), never chosen on held-out tasks."]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def plot(summary: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, name in zip(axes, (metric, "query_loss")):
        methods = list(dict.fromkeys(e["method"] for e in summary))
        colours = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
        for method, adaptation in dict.fromkeys((e["method"], e["adaptation"]) for e in summary):
            points = sorted((e["n_shots"], e[name], e[name + "_ci95"]) for e in summary
                            if e["method"] == method and e["adaptation"] == adaptation and name in e)
            if not points:
                continue
            xs, ys, cis = zip(*points)
            in_context = adaptation == "in_context"
            colour = colours(methods.index(method) % colours.N)  # one colour per method; dashed: in context
            ax.plot(xs, ys, marker="s" if in_context else "o", linestyle="--" if in_context else "-", color=colour,
                    label=f"{method} (in context)" if in_context else method)
            ax.fill_between(xs, [y - c for y, c in zip(ys, cis)], [y + c for y, c in zip(ys, cis)], alpha=0.15,
                            color=colour)
        ax.set_xscale("log")
        ax.set_xticks(sorted({e["n_shots"] for e in summary}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("n_shots (support examples)")
        ax.set_ylabel(name.replace("_", " ") + " on held-out query sets")
        ax.grid(alpha=0.3)
    _finish_figure(fig, axes, "Few-shot adaptation on held-out tasks (mean and 95% interval over tasks × seeds)", path)


def _finish_figure(fig, axes, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    handles, _ = axes[0].get_legend_handles_labels()
    if len(handles) > 8:  # many lines: a legend beside the plots, not over them
        axes[-1].legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    else:
        axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_curves(methods: list[ResolvedMethod], metric: str) -> dict[str, list[dict]]:
    """Each trained method's periodic evaluation from its run's metrics.jsonl: [{step, seconds,
    value}] of ``metric`` on the validation tasks (held-out tasks when the data has none)."""
    logged = {"query_loss": "query_loss_post"}.get(metric, metric)
    curves = {}
    for method in methods:
        if method.train_config is None:
            continue
        path = Path(method.train_config.trainer.default_local_dir) / "metrics.jsonl"
        if not path.is_file():
            continue
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for key in (f"val/{logged}", f"heldout/{logged}"):
            points = [{"step": r["step"], "seconds": r.get("train_seconds"), "value": r[key]} for r in records if key in r]
            if points:
                curves[method.name] = points
                break
    return curves


def plot_training_curves(curves: dict[str, list[dict]], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, x, label in zip(axes, ("step", "seconds"), ("meta-steps (SFT: optimizer steps)", "training wall time (s)")):
        for name, points in curves.items():
            xs = [p[x] for p in points if p[x] is not None]
            if xs:
                ax.plot(xs, [p["value"] for p in points if p[x] is not None], marker=".", label=name)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric.replace('_', ' ')} after adaptation")
        ax.grid(alpha=0.3)
    _finish_figure(fig, axes, "Training curves: validation tasks, adapted as during meta-training", path)


def plot_inner_lrs(files: dict[str, str], path: Path) -> None:
    """The learned inner rates of each method that has them: α against layer, a line per kind of
    tensor (and per inner step where the rates are per step)."""
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from safetensors.torch import load_file

    fig, axes = plt.subplots(1, len(files), figsize=(6.5 * len(files), 4.4), squeeze=False)
    for ax, (method, file) in zip(axes[0], files.items()):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # a dozen kinds of tensor: tab10 would repeat
        rates = load_file(file)
        layers = [int(m.group(1)) for n in rates if (m := re.search(r"layers\.(\d+)\.", n))]
        top = max(layers, default=0) + 1
        lines: dict[str, list[tuple[int, list[float]]]] = {}
        for name, value in rates.items():
            match = re.search(r"layers\.(\d+)\.(.*)", name)
            layer = int(match.group(1)) if match else (-1 if "embed" in name else top)
            kind = re.sub(r"\.(default\.)?weight$|\.default$", "", match.group(2) if match else name.split(".")[-2])
            lines.setdefault(kind, []).append((layer, value.flatten().tolist()))
        for kind, points in sorted(lines.items()):
            points.sort()
            steps = len(points[0][1])
            for step in range(steps):
                label = kind if steps == 1 else f"{kind} (step {step + 1})"
                ax.plot([p[0] for p in points], [p[1][step] for p in points], marker="o", markersize=3,
                        linestyle="-" if step == 0 else ":", label=label)
        ax.set_title(method)
        ax.set_xlabel(f"layer (-1: embeddings, {top}: head and final norm)")
        ax.set_ylabel("learned inner learning rate α")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle("Learned inner learning rates (meta.learn_inner_lr)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_csv(rows: list[dict], path: Path) -> None:
    # Wall times live in results.json: the CSV holds only what a seed determines, so two runs of
    # the same command give the same file.
    columns = ["method", "adaptation", "task", "n_shots", "seed", *METRICS, "adapt_lr", "shots_used", "shots_used_min"]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) and k != "adapt_lr" else v) for k, v in row.items()})
    os.replace(tmp, path)


def rank_sweep(summary: list[dict], methods: list[ResolvedMethod], metric: str) -> list[tuple[str, float, ResolvedMethod]]:
    ranked = []
    for method in methods:
        if method.sweep_of is None:
            continue
        values = [e[metric] for e in summary if e["method"] == method.name and metric in e]
        if values:
            ranked.append((method.name, sum(values) / len(values), method))
    ranked.sort(key=lambda item: item[1], reverse=HIGHER_IS_BETTER[metric])
    return ranked


# ----------------------------------------------------------------------------- the command

def run_bench(cfg: BenchConfig, console=None) -> dict:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from metasft.data.tasks import load_task, read_manifest_specs
    from metasft.model import load_tokenizer
    from metasft.config import ModelConfig
    from metasft.distributed import resolve_device
    from metasft.distributed import DistEnv

    console = console or Console()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device, DistEnv())
    specs = read_manifest_specs(cfg.tasks_dir)
    wanted = cfg.held_out_tasks or [s.name for s in specs if s.held_out and not s.validation]
    if not wanted:
        raise ConfigError("held_out_tasks: the manifest marks no held-out tasks; list some")
    validation = cfg.validation_tasks or [s.name for s in specs if s.validation and s.name not in wanted]
    if cfg.select_checkpoint == "best_validation" and not any(s.validation for s in specs):
        raise ConfigError("select_checkpoint: best_validation needs tasks prepared with split: validation "
                          "(training runs evaluate those); held-out tasks are never used to choose")
    if cfg.adapt.lr_grid and not validation:
        raise ConfigError("adapt.lr_grid: needs validation tasks (list validation_tasks, or prepare tasks with "
                          "split: validation); held-out tasks are never used to choose")
    by_name = {s.name: s for s in specs}
    for key, names in (("held_out_tasks", wanted), ("validation_tasks", validation)):
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ConfigError(f"{key}: task {missing[0]!r} is not in {cfg.tasks_dir}")
        if trained_on := [n for n in names if not by_name[n].held_out]:
            raise ConfigError(f"{key}: task {trained_on[0]!r} is a meta-training task in {cfg.tasks_dir}")
    methods = resolve_methods(cfg, out, num_train_tasks=sum(not s.held_out for s in specs))
    tokenizer = load_tokenizer(ModelConfig(partial_pretrain=cfg.base_model))
    tasks = [load_task(by_name[n], cfg.data, tokenizer) for n in wanted]
    validation_tasks = [load_task(by_name[n], cfg.data, tokenizer) for n in validation] if cfg.adapt.lr_grid else []
    validation_rows: list[dict] = []
    rows: list[dict] = []
    info: dict[str, dict] = {m.name: {} for m in methods}
    (out / "runs").mkdir(parents=True, exist_ok=True)
    trained = train_methods([m for m in methods if m.train_config is not None], out, cfg.train_parallel,
                            cfg.train_threads, console)
    for index, method in enumerate(methods, 1):
        entry = info[method.name]
        checkpoint = method.checkpoint
        if method.name in trained:
            checkpoint, entry["train_seconds"], entry["train_peak_mib"] = trained[method.name]
            entry["steps"] = int(checkpoint.name.split("_")[-1])
            if cfg.select_checkpoint == "best_validation":
                step, key = best_validation_step(checkpoint.parent, cfg.metric)
                checkpoint = checkpoint.parent / f"step_{step}"
                if not checkpoint.is_dir():
                    raise MetasftError(f"method {method.name}: {checkpoint} was not saved")
                entry["selected_step"], entry["selected_by"] = step, key
        entry["checkpoint"] = str(checkpoint)
        started = time.perf_counter()
        torch.manual_seed(0)
        with Progress(TextColumn(f"[{index}/{len(methods)}] adapting + evaluating {method.name}"), BarColumn(),
                      MofNCompleteColumn(), TimeRemainingColumn(), console=console, transient=True) as progress:
            adaptations = method.adaptations or cfg.adaptations
            trials = (len(tasks) if "in_context" in adaptations else 0) + (
                len(tasks) + len(validation_tasks) * len(cfg.adapt.lr_grid) if "gradient" in adaptations else 0)
            bar = progress.add_task("eval", total=trials * len(cfg.n_shots) * len(cfg.seeds))
            method_rows, chosen, method_validation = evaluate_method(
                method.name, checkpoint, cfg, tasks, device, lambda: progress.advance(bar), validation_tasks,
                adaptations)
        rows += method_rows
        validation_rows += method_validation
        entry["adapt_lr"] = {str(n): lr for n, lr in chosen.items()}
        if cfg.adapt.optimizer == "sgd" and (checkpoint / "inner_lrs.safetensors").is_file():
            entry["learned_inner_lrs"] = str(checkpoint / "inner_lrs.safetensors")
        entry["eval_seconds"] = time.perf_counter() - started
        console.print(f"[{index}/{len(methods)}] evaluated {method.name} on {len(tasks)} held-out tasks "
                      f"× n_shots {cfg.n_shots} × seeds {cfg.seeds} ({entry['eval_seconds']:.0f} s)",
                      markup=False, highlight=False)
    summary = summarise(rows)
    write_csv(rows, out / "results.csv")
    if validation_rows:
        write_csv(validation_rows, out / "validation.csv")
    table = markdown_table(summary, info, chosen_on=validation if cfg.adapt.lr_grid else None)
    curves = training_curves(methods, cfg.metric)
    result = {"summary": summary, "methods": info, "rows": rows, "training_curves": curves,
              "machine": _machine(), "config": dataclasses.asdict(cfg)}
    ranked = rank_sweep(summary, methods, cfg.metric)
    if ranked:
        best = ranked[0][2]
        sweep_md = [f"| rank | variant | mean {cfg.metric} |", "|---|---|---|"]
        sweep_md += [f"| {i} | {name} | {value:.4f} |" for i, (name, value, _) in enumerate(ranked, 1)]
        (out / "sweep.md").write_text("\n".join(sweep_md) + "\n", encoding="utf-8")
        (out / "best_config.yaml").write_text(best.train_config.to_yaml(), encoding="utf-8")
        result["sweep"] = [{"variant": n, cfg.metric: v, "settings": m.settings} for n, v, m in ranked]
        table += "\n## Sweep ranking\n\n" + "\n".join(sweep_md) + "\n"
    (out / "results.md").write_text(f"# metasft bench\n\n{table}", encoding="utf-8")
    with open(out / "results.json.tmp", "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    os.replace(out / "results.json.tmp", out / "results.json")
    plot(summary, cfg.metric, out / "adaptation.png")
    written = ["results.csv", "results.json", "results.md", "adaptation.png"]
    if curves:
        plot_training_curves(curves, cfg.metric, out / "training_curves.png")
        written.append("training_curves.png")
    learned_files = {name: e["learned_inner_lrs"] for name, e in info.items() if "learned_inner_lrs" in e}
    if learned_files:
        plot_inner_lrs(learned_files, out / "inner_lrs.png")
        written.append("inner_lrs.png")
    console.print(table, markup=False, highlight=False)
    console.print(f"wrote {out}/{', '.join(written)}", markup=False, highlight=False)
    return result


def _machine() -> dict:
    import platform

    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor() or None,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "self_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
