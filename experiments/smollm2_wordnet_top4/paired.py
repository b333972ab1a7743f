"""The best meta-learner against the best baseline on one bench's held-out tasks, task by task.

    python experiments/smollm2_wordnet_top4/paired.py BENCH_DIR [BENCH_DIR ...] [--first N]

Reads each folder's ``results.csv`` (one row per method, adaptation, task, shots; gradient and
in-context benches of the same tasks may be separate folders) and prints, per shots count, a markdown
table of every method's exact match with its 95% interval over tasks, then the margin of the best
meta-learner (by mean) over the best baseline (the base and SFT, adapted or in context):

- **intervals apart**: the issue's criterion, each method's own interval (unpaired);
- **paired**: the 95% Student-t interval of the per-task difference. Every method is scored on the
  same tasks, so the tasks' shared difficulty cancels; it says whether the margin is the method's and
  not the draw of tasks, which the unpaired intervals overstate.

``--first N`` keeps the first N held-out tasks by name, e.g. a 40-task suite's first 10, which are the
default suite's (``suites build --held-out-tasks``).
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

from metasft.bench.report import mean_ci
from seeds import BASELINES  # this folder's seeds.py: which methods are baselines, one list for both scripts


def scores(folders: list[Path], first: int | None) -> dict[int, dict[str, dict[str, float]]]:
    """shots -> 'method (adaptation)' -> task -> exact match."""
    table: dict[int, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for folder in folders:
        with open(folder / "results.csv") as f:
            for row in csv.DictReader(f):
                table[int(row["n_shots"])][f"{row['method']} ({row['adaptation']})"][row["task"]] = float(row["exact_match"])
    if first is not None:
        for by_method in table.values():
            for name, by_task in by_method.items():
                by_method[name] = {t: by_task[t] for t in sorted(by_task)[:first]}
    return table


def report(table: dict[int, dict[str, dict[str, float]]]) -> str:
    lines = []
    for shots, by_method in sorted(table.items()):
        lines += [f"### {shots} shot(s) per class", "", "| method | tasks | exact match |", "|---|---|---|"]
        summary = {}
        for name, by_task in by_method.items():
            summary[name] = mean_ci(list(by_task.values()))
            lines.append(f"| {name} | {len(by_task)} | {summary[name][0]:.3f} ± {summary[name][1]:.3f} |")
        baselines = [n for n in summary if n.split(" ")[0] in BASELINES]
        learners = [n for n in summary if n not in baselines]
        lines.append("")
        if not baselines or not learners:
            continue
        best_base = max(baselines, key=lambda n: summary[n][0])
        best = max(learners, key=lambda n: summary[n][0])
        tasks = sorted(set(by_method[best]) & set(by_method[best_base]))
        diff = mean_ci([by_method[best][t] - by_method[best_base][t] for t in tasks])
        apart = summary[best][0] - summary[best][1] > summary[best_base][0] + summary[best_base][1]
        lines += [f"best meta-learner **{best}** {summary[best][0]:.3f} against best baseline **{best_base}** "
                  f"{summary[best_base][0]:.3f}: margin {summary[best][0] - summary[best_base][0]:+.3f}; "
                  f"intervals apart: {'yes' if apart else 'no'} ({summary[best][0] - summary[best][1]:.3f} against "
                  f"{summary[best_base][0] + summary[best_base][1]:.3f}); paired over {len(tasks)} tasks: "
                  f"{diff[0]:+.3f} ± {diff[1]:.3f}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--first", type=int, default=None, metavar="N")
    args = parser.parse_args()
    print(report(scores(args.folders, args.first)))


if __name__ == "__main__":
    main()
