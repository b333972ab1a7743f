"""Statistics over tasks × seeds, tables, plots and files."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from metasft.bench.methods import ResolvedMethod
from metasft.loggers import METRICS_FILE, read_metrics
from metasft.bench.schema import HIGHER_IS_BETTER, METRICS


_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom: the table up to 30, then the
    Cornish-Fisher expansion around the normal quantile (Abramowitz & Stegun 26.7.5), within 1e-5 there.
    (1.96, the normal quantile, is 2-3% too small at df 30-60: intervals of 20 tasks x 3 seeds.)"""
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t975(n - 1) * sd / math.sqrt(n)


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


def markdown_table(summary: list[dict], methods_info: dict[str, dict], chosen_on: list[str] | None = None,
                   shots_label: str = "n_shots", chosen_by: str = "metric") -> str:
    lines = [f"| method | adaptation | {shots_label} | shots used | adaptation lr | exact match | ROUGE-L | token accuracy "
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
        by = " by the lowest query loss" if chosen_by == "query_loss" else ""
        lines += ["", f"Adaptation learning rates were chosen per method and n_shots on {len(chosen_on)} validation "
                      f"tasks{by} (validation.csv), never on the held-out tasks above."]
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


def plot(summary: list[dict], metric: str, path: Path, shots_label: str = "n_shots (support examples)") -> None:
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
        ax.set_xlabel(shots_label)
        ax.set_ylabel(name.replace("_", " ") + " on held-out query sets")
        ax.grid(alpha=0.3)
    _finish_figure(fig, axes, "Few-shot adaptation on held-out tasks (mean and 95% interval over tasks × seeds)", path)


def _finish_figure(fig, axes, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    handles, _ = axes[0].get_legend_handles_labels()
    if len(handles) > 8:  # many lines: a legend beside the plots, not over them
        axes[-1].legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    elif handles:  # no labelled line (e.g. no run evaluated on validation tasks): no empty legend
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
        run_dir = Path(method.train_config.trainer.default_local_dir)
        if not (run_dir / METRICS_FILE).is_file():
            continue
        records = read_metrics(run_dir)
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
