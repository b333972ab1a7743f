"""Resolving the methods (configs, grids, checkpoints) and training them in a pool of subprocesses."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from metasft.config import load_config
from metasft.errors import ConfigError, MetasftError
from metasft.bench.schema import BenchConfig


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
        if (Path(cfg.base_model).expanduser() / "adapter_config.json").is_file():
            # The added sft trains full weights (its config's lora_rank = 0), which an adapter folder
            # loads frozen: refuse now rather than after the other methods have trained.
            raise ConfigError(f"methods: no sft is listed, and base_model {cfg.base_model} is a LoRA adapter folder "
                              "that the added sft (full weights) cannot train; list an sft method (a checkpoint, or "
                              "config_name: sft with the adapters' model.* settings in overrides)")
        overrides = common + cfg.train_overrides + [f"trainer.default_local_dir={out / 'runs' / 'sft'}"]
        sft_cfg = load_config(name="sft", overrides=overrides)
        _check_trainable("sft", sft_cfg, num_train_tasks)
        _keep_evaluated_checkpoints(cfg, "sft", sft_cfg)
        resolved.insert(1, ResolvedMethod("sft", train_config=sft_cfg))
    return resolved


def adapter_settings_of(name: str, methods: list[ResolvedMethod]):
    """The model config (adapter settings) of the method ``base_adapters_from`` names: a trained
    method's own, or the one a checkpoint saved beside its weights."""
    from metasft.checkpoint import CONFIG_FILE
    from metasft.config import Config, load_yaml

    method = next(m for m in methods if name in (m.name, m.sweep_of))
    if method.train_config is not None:
        return method.train_config.model
    saved = method.checkpoint / CONFIG_FILE
    if not saved.is_file():
        raise ConfigError(f"base_adapters_from: {method.checkpoint} has no {CONFIG_FILE}, so its adapter settings "
                          "are unknown (name a metasft checkpoint or a method the bench trains)")
    return Config.from_dict(load_yaml(saved)).model


def base_with_fresh_adapters(base_model: str, like, out: Path) -> Path:
    """The base model with LoRA adapters configured as ``like`` (a model config) and not trained:
    lora_B starts at zero, so it computes the base's function and adapts the same parameters as a
    LoRA method. Written once to ``out``."""
    from metasft.config import ModelConfig
    from metasft.model import load_model, load_tokenizer, quiet_peft

    if like.lora_rank <= 0:
        raise ConfigError("base_adapters_from: that method trains full weights (model.lora_rank = 0), not adapters")
    if not (out / "adapter_config.json").is_file():
        local = Path(base_model).expanduser()
        # The adapter records its base's path: absolute, so that it loads from any directory.
        cfg = ModelConfig(partial_pretrain=str(local.resolve()) if local.exists() else base_model,
                          lora_rank=like.lora_rank, lora_alpha=like.lora_alpha, lora_dropout=like.lora_dropout,
                          target_modules=like.target_modules, lora_full_head=like.lora_full_head)
        with quiet_peft():
            load_model(cfg).save_pretrained(out)
        load_tokenizer(cfg).save_pretrained(out)
    return out


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
    from metasft.loggers import METRICS_FILE, read_metrics

    path = run_dir / METRICS_FILE
    records = {}
    if path.is_file():  # the last record of a step wins (a resumed run logs its steps again)
        for record in read_metrics(run_dir):
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
