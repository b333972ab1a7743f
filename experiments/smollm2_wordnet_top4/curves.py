"""Accuracy against meta-steps: each run's periodic evaluation on the validation tasks, as a CSV
and a plot (the runs log it every trainer.test_freq steps: 5 validation tasks, each adapted as in
meta-training, exact match on 25 query rows).

    python experiments/smollm2_wordnet_top4/curves.py OUT_DIR NAME=RUN_DIR [NAME=RUN_DIR ...]
"""

import csv
import sys
from pathlib import Path

from metasft.bench.report import plot_training_curves
from metasft.loggers import read_metrics

KEYS = ("val/exact_match", "val/query_loss_pre", "val/query_loss_post")


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    for spec in sys.argv[2:]:
        name, run_dir = spec.split("=", 1)
        records = {r["step"]: r for r in read_metrics(Path(run_dir)) if "val/exact_match" in r}  # last record of a step
        for step in sorted(records):
            r = records[step]
            rows.append({"method": name, "step": step, "train_seconds": round(r.get("train_seconds", 0.0), 1),
                         **{k.split("/")[1]: round(r[k], 4) for k in KEYS}})
        curves[name] = [{"step": s, "seconds": records[s].get("train_seconds"), "value": records[s]["val/exact_match"]}
                        for s in sorted(records)]
    with open(out / "curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_training_curves(curves, "exact_match", out / "curves.png")
    print(f"wrote {out / 'curves.csv'} ({len(rows)} points) and {out / 'curves.png'}")


if __name__ == "__main__":
    main()
