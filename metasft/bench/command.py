"""The ``metasft bench`` command: train, evaluate, aggregate, write."""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from pathlib import Path

from metasft.bench.evaluation import evaluate_method
from metasft.bench.methods import (adapter_settings_of, base_with_fresh_adapters, best_validation_step, resolve_methods,
                                   train_methods)
from metasft.bench.report import (markdown_table, plot, plot_inner_lrs, plot_training_curves, rank_sweep, summarise,
                                  training_curves, write_csv)
from metasft.bench.schema import BenchConfig
from metasft.checkpoint import INNER_LRS_FILE
from metasft.data.io import write_json_atomic
from metasft.errors import ConfigError, MetasftError


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
    if cfg.base_adapters_from is not None:
        like = adapter_settings_of(cfg.base_adapters_from, methods)
        methods[0].checkpoint = base_with_fresh_adapters(cfg.base_model, like, out / "base_adapters")
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
        if cfg.adapt.optimizer == "sgd" and (checkpoint / INNER_LRS_FILE).is_file():
            entry["learned_inner_lrs"] = str(checkpoint / INNER_LRS_FILE)
        entry["eval_seconds"] = time.perf_counter() - started
        console.print(f"[{index}/{len(methods)}] evaluated {method.name} on {len(tasks)} held-out tasks "
                      f"× n_shots {cfg.n_shots} × seeds {cfg.seeds} ({entry['eval_seconds']:.0f} s)",
                      markup=False, highlight=False)
    summary = summarise(rows)
    write_csv(rows, out / "results.csv")
    if validation_rows:
        write_csv(validation_rows, out / "validation.csv")
    per_class = cfg.shots == "per_class"
    table = markdown_table(summary, info, chosen_on=validation if cfg.adapt.lr_grid else None,
                           shots_label="shots per class" if per_class else "n_shots", chosen_by=cfg.adapt.select_lr_by)
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
    write_json_atomic(result, out / "results.json")
    plot(summary, cfg.metric, out / "adaptation.png",
         shots_label="shots per class" if per_class else "n_shots (support examples)")
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
