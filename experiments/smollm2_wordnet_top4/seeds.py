"""Experiment 3 over seeds and budgets: one table and one plot from several `metasft bench` outputs.

    python experiments/smollm2_wordnet_top4/seeds.py OUT SEED:STEPS=BENCH_DIR[,BENCH_DIR...] ...

Each argument names a suite-and-training seed, the meta-steps its checkpoints had, and the bench
output folders that scored them (gradient and in-context runs may be separate folders; their
``results.json`` summaries are merged). ``BENCH_DIR#METHOD`` keeps only that method's rows
(``BENCH_DIR#METHOD/ADAPTATION`` only its rows of that adaptation, gradient or in_context): the
base's are the same at every budget, so a budget whose bench did not run the base in context can
take those rows from another budget's folder. Writes ``OUT/seeds.csv`` (one row per seed, budget, method, adaptation, shots),
``OUT/seeds.md`` (the same, with each row's 95% interval and, at each seed, budget and shots, the
best meta-learning method's margin over the best baseline) and ``OUT/seeds.png`` (held-out exact
match at 1 shot per class against meta-steps, one panel per seed) and ``OUT/shots.png`` (against
shots per class, at each seed's largest budget scored at several). A method named ``NAME_STEPS``
(a bench of several checkpoints of one run, e.g. ``fomaml_250``) counts as ``NAME``.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path


def load(spec: str) -> list[dict]:
    head, _, dirs = spec.partition("=")
    seed, _, steps = head.partition(":")
    rows = []
    for item in dirs.split(","):
        folder, _, only = item.partition("#")
        method, _, adaptation = only.partition("/")
        result = json.loads((Path(folder) / "results.json").read_text())
        for entry in result["summary"]:
            if (method and entry["method"] != method) or (adaptation and entry["adaptation"] != adaptation):
                continue
            rows.append({"seed": int(seed), "steps": int(steps), "method": re.sub(r"_\d+$", "", entry["method"]),
                         "adaptation": entry["adaptation"], "shots_per_class": entry["n_shots"],
                         "tasks": entry["n"], "exact_match": entry["exact_match"],
                         "exact_match_ci95": entry["exact_match_ci95"], "query_loss": entry["query_loss"],
                         "query_loss_ci95": entry["query_loss_ci95"],
                         "rate_chosen_by": "–" if entry["adaptation"] != "gradient" else rate_rule(result, Path(folder)),
                         "source": folder})
    return rows


def rate_rule(result: dict, folder: Path) -> str:
    """How the bench chose the adaptation rate: the rule and the number of validation tasks."""
    rule = "query loss" if result["config"]["adapt"].get("select_lr_by") == "query_loss" else "exact match"
    trials = folder / "validation.csv"
    if not trials.is_file():
        return "–"
    with open(trials) as f:
        tasks = {row["task"] for row in csv.DictReader(f)}
    return f"{rule}, {len(tasks)} validation tasks"


BASELINES = ("base", "sft")  # every other method is a meta-learner


def margins(rows: list[dict]) -> list[dict]:
    """The best meta-learner's exact match minus the best baseline's (base or SFT, adapted or in
    context), per seed, budget and shots, and whether their 95% intervals are apart."""
    out = []
    for seed, steps, shots in sorted({(r["seed"], r["steps"], r["shots_per_class"]) for r in rows}):
        group = [r for r in rows if (r["seed"], r["steps"], r["shots_per_class"]) == (seed, steps, shots)]
        learners = [r for r in group if r["method"] not in BASELINES]
        others = [r for r in group if r["method"] in BASELINES]
        if not learners or not others:
            continue
        best = max(others, key=lambda r: r["exact_match"])
        m = max(learners, key=lambda r: r["exact_match"])
        low = m["exact_match"] - m["exact_match_ci95"]
        apart = low > best["exact_match"] + best["exact_match_ci95"]
        apart_all = all(low > r["exact_match"] + r["exact_match_ci95"] for r in others)
        out.append({"seed": seed, "steps": steps, "shots": shots, "learner": m["method"], "score": m["exact_match"],
                    "best_baseline": f"{best['method']} ({best['adaptation']})", "baseline": best["exact_match"],
                    "margin": m["exact_match"] - best["exact_match"], "intervals_apart": apart,
                    "apart_from_all": apart_all, "in_context_scored": any(r["adaptation"] == "in_context" for r in others)})
    return out


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for spec in argv[1:] for r in load(spec)]
    rows.sort(key=lambda r: (r["seed"], r["steps"], r["shots_per_class"], r["method"], r["adaptation"]))
    fields = [k for k in rows[0] if k != "source"]
    with open(out / "seeds.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| seed | meta-steps | method | adaptation | shots per class | exact match | query loss | rate chosen by |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['steps']} | {r['method']} | {r['adaptation']} | {r['shots_per_class']} | "
                     f"{r['exact_match']:.3f} ± {r['exact_match_ci95']:.3f} | {r['query_loss']:.2f} | {r['rate_chosen_by']} |")
    lines += ["", "The best meta-learner against the best baseline (exact match; intervals: 95%, over the 10 held-out "
              "tasks; a row without in-context baselines did not score them at that many shots):", "",
              "| seed | meta-steps | shots per class | best meta-learner | its score | best baseline | its score | margin | "
              "intervals apart | apart from every baseline |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in margins(rows):
        baseline = m["best_baseline"] + ("" if m["in_context_scored"] else ", no in-context row")
        lines.append(f"| {m['seed']} | {m['steps']} | {m['shots']} | {m['learner']} | {m['score']:.3f} | {baseline} | "
                     f"{m['baseline']:.3f} | {m['margin']:+.3f} | {'yes' if m['intervals_apart'] else 'no'} | "
                     f"{'yes' if m['apart_from_all'] else 'no'} |")
    (out / "seeds.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "seeds.png")
    plot_shots(rows, out / "shots.png")
    print("\n".join(lines))


def colours(rows: list[dict]) -> dict:
    """One colour per (method, adaptation), the same in every figure."""
    keys = sorted({(r["method"], r["adaptation"]) for r in rows})
    return {key: f"C{i % 10}" for i, key in enumerate(keys)}


def draw_lines(ax, rows: list[dict], x_key: str, colour: dict, min_points: int = 1) -> None:
    """Exact match against ``x_key``, a line with 95% intervals per method and adaptation that has at
    least ``min_points`` points, and chance (0.2) dotted."""
    for method, adaptation in sorted({(r["method"], r["adaptation"]) for r in rows}):
        points = sorted((r[x_key], r["exact_match"], r["exact_match_ci95"]) for r in rows
                        if (r["method"], r["adaptation"]) == (method, adaptation))
        if len(points) < min_points:
            continue
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                    capsize=3, color=colour[(method, adaptation)], label=f"{method} ({adaptation})")
    ax.axhline(0.2, color="grey", lw=0.8, ls=":")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({r["seed"] for r in rows})
    fig, axes = plt.subplots(1, len(seeds), figsize=(4.5 * len(seeds), 3.6), sharey=True, squeeze=False)
    for ax, seed in zip(axes[0], seeds):
        mine = [r for r in rows if r["seed"] == seed and r["shots_per_class"] == 1]
        draw_lines(ax, mine, "steps", colours(rows))
        ax.set_title(f"suite and training seed {seed}")
        ax.set_xlabel("meta-steps (4 tasks x 20 rows)")
    axes[0][0].set_ylabel("held-out exact match, 1 shot per class")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_shots(rows: list[dict], path: Path) -> None:
    """Held-out exact match against shots per class, one panel per seed at its largest budget with
    more than one shot count; a line per method and adaptation scored at more than one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for seed in sorted({r["seed"] for r in rows}):
        budgets = [b for b in sorted({r["steps"] for r in rows if r["seed"] == seed}, reverse=True)
                   if len({r["shots_per_class"] for r in rows if (r["seed"], r["steps"]) == (seed, b)}) > 1]
        if budgets:
            panels.append((seed, budgets[0]))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), sharey=True, squeeze=False)
    for ax, (seed, steps) in zip(axes[0], panels):
        mine = [r for r in rows if (r["seed"], r["steps"]) == (seed, steps)]
        draw_lines(ax, mine, "shots_per_class", colours(rows), min_points=2)
        ax.set_xticks(sorted({r["shots_per_class"] for r in mine}))
        ax.set_title(f"seed {seed}, {steps} meta-steps")
        ax.set_xlabel("shots per class (5-way)")
    axes[0][0].set_ylabel("held-out exact match")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1:])
