"""The benchmark's configuration: methods, the one adaptation protocol, evaluation settings (typed schema)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from metasft.config import DataConfig, _build, _f, load_yaml
from metasft.errors import ConfigError

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
                                  "on the validation tasks (by select_lr_by); overrides lr.")
    select_lr_by: Literal["metric", "query_loss"] = _f(
        "metric", "How lr_grid is decided on the validation tasks: the best mean metric (ties to the lower query "
                  "loss), or the lowest mean query loss (no generation on validation tasks: faster, and steadier on "
                  "few rows than exact match).")
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
    base_adapters_from: Optional[str] = _f(
        None, "A LoRA method (a name in methods: trained by the bench, or a metasft checkpoint) whose adapter "
              "settings the base row takes, freshly initialised (B = 0, so still the base's function): the base "
              "then adapts the same parameters as the LoRA methods, as it must where adapt.inner_scope holds a "
              "head tied to the embeddings.")
    n_shots: list[int] = _f([10, 50, 100], "Support examples given to each adaptation (per class with shots: per_class).")
    shots: Literal["rows", "per_class"] = _f(
        "rows", "How n_shots counts: rows = that many support rows drawn at random; per_class = that many rows "
                "of every class, a class being the rows with the same response (N-way K-shot episodes).")
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
    prefix_cache_dir: Optional[str] = _f(
        None, "Where the frozen layers' states of each evaluated row are kept (the layers below every "
              "method's adapters, run once per row for adaptation and query losses); a trainer.prefix_cache_dir "
              "shares the trainings' rows. null = in memory, per method, on a CPU (not on an accelerator).")
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
    if cfg.prefix_cache_dir is not None and Path(cfg.prefix_cache_dir).expanduser().exists() \
            and not Path(cfg.prefix_cache_dir).expanduser().is_dir():
        raise ConfigError(f"prefix_cache_dir: {cfg.prefix_cache_dir} is a file, not a directory")
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
    if cfg.base_adapters_from is not None and cfg.base_adapters_from not in names:
        raise ConfigError(f"base_adapters_from: {cfg.base_adapters_from!r} is not a method in methods")
    return cfg
