"""Run `metasft demo` for several seeds and summarise them: does every method beat SFT on every seed?

    python benchmarks/demo_seeds.py --seeds 1 2 3 4 --out /tmp/demo-seeds      # ~7 min per seed, 2 cores
    python benchmarks/demo_seeds.py --summarise /tmp/demo-seeds/seed_1 /tmp/fresh/metasft-demo

Prints one JSON object (per seed: each method's exact match and query loss at each n_shots with
95% intervals, its meta-steps and training wall time, the demo's wall time, and each meta method's
margin over SFT at the fewest shots), then the markdown tables docs/demo.md shows. Demos already
run can be summarised without re-running them (``--summarise DIR ...``).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

META_METHODS = ("fomaml", "reptile", "maml", "meta_lora")


def run_seed(seed: int, out: Path) -> float:
    started = time.perf_counter()
    with open(f"{out}.log", "w", encoding="utf-8") as log:
        code = subprocess.call([sys.executable, "-m", "metasft", "demo", "--seed", str(seed), "--out", str(out)],
                               stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"seed {seed}: metasft demo exited {code} (log: {out}.log)")
    return time.perf_counter() - started


def summarise(out: Path, wall_seconds: float | None = None) -> dict:
    result = json.loads((out / "results.json").read_text(encoding="utf-8"))
    cells = {}
    for entry in result["summary"]:
        name = entry["method"] if entry.get("adaptation", "gradient") == "gradient" else f"{entry['method']} (in context)"
        cells.setdefault(name, {})[entry["n_shots"]] = {
            "exact_match": entry["exact_match"], "exact_match_ci95": entry["exact_match_ci95"],
            "query_loss": entry["query_loss"], "query_loss_ci95": entry["query_loss_ci95"]}
    fewest = min(result["config"]["n_shots"])
    sft = cells["sft"][fewest]["exact_match"]
    return {
        "out": str(out), "seed": result["config"]["seeds"][0], "wall_seconds": wall_seconds,
        "methods": {name: {"cells": cells.get(name, {}), "steps": info.get("steps"),
                           "train_seconds": info.get("train_seconds"), "adapt_lr": info.get("adapt_lr")}
                    for name, info in result["methods"].items()},
        "margin_over_sft": {m: cells[m][fewest]["exact_match"] - sft for m in META_METHODS if m in cells},
        "n_shots": sorted(result["config"]["n_shots"]),
    }


def markdown(summary: dict) -> str:
    shots = summary["n_shots"]
    lines = ["| method | meta-steps | training (s) | " + " | ".join(f"exact match, {n} shots" for n in shots)
             + f" | query loss, {shots[0]} shots | lr ({', '.join(map(str, shots))}) |",
             "|---|---|---|" + "---|" * (len(shots) + 2)]
    for name, info in summary["methods"].items():
        ems = [f"{info['cells'][n]['exact_match']:.3f} ± {info['cells'][n]['exact_match_ci95']:.3f}" for n in shots]
        loss = info["cells"][shots[0]]
        lrs = ", ".join(f"{info['adapt_lr'][str(n)]:g}" for n in shots) if info.get("adapt_lr") else "–"
        lines.append(f"| {name} | {info['steps'] or '–'} | "
                     f"{'–' if info['train_seconds'] is None else round(info['train_seconds'])} | " + " | ".join(ems)
                     + f" | {loss['query_loss']:.3f} ± {loss['query_loss_ci95']:.3f} | {lrs} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[])
    parser.add_argument("--out", default="demo-seeds")
    parser.add_argument("--summarise", nargs="*", default=[], metavar="DIR")
    args = parser.parse_args()
    summaries = [summarise(Path(d)) for d in args.summarise]
    for seed in args.seeds:
        out = Path(args.out) / f"seed_{seed}"
        out.parent.mkdir(parents=True, exist_ok=True)
        summaries.append(summarise(out, run_seed(seed, out)))
    print(json.dumps(summaries, indent=2))
    for summary in summaries:
        wall = f", demo wall time {summary['wall_seconds']:.0f} s" if summary["wall_seconds"] else ""
        print(f"\n### seed {summary['seed']}{wall}\n\n{markdown(summary)}")
    print("\n| seed | " + " | ".join(META_METHODS) + " |\n|---|" + "---|" * len(META_METHODS))
    for summary in summaries:
        print(f"| {summary['seed']} | " + " | ".join(f"{summary['margin_over_sft'].get(m, float('nan')):+.3f}"
                                               for m in META_METHODS) + " |")


if __name__ == "__main__":
    main()
