"""The real-model guard test's bench on several seeds: where its margin comes from.

    python experiments/smollm2_wordnet_top4/guard_seeds.py MODEL_DIR OUT SEED [SEED ...] [--steps N] [--outer-lr X]

Runs tests/integration/test_real_model.py's guard config (``guard_bench_config`` on ``guard_suite``)
once per seed and prints, per seed, each method's held-out query loss after adaptation and the wall
time; appends the same as JSON lines to OUT/guard_seeds.jsonl.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from test_real_model import guard_bench_config, guard_suite  # noqa: E402

from metasft.cli import main as metasft  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("seeds", type=int, nargs="+")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--outer-lr", type=float, default=1e-3)
    args = parser.parse_args()
    out = Path(args.out)
    for seed in args.seeds:
        run = out / f"steps{args.steps}_lr{args.outer_lr:g}_seed{seed}"
        guard_suite(run / "suite", seed)
        config = guard_bench_config(args.model_dir, run / "suite", run / "bench", seed, args.steps, args.outer_lr)
        (run / "bench.yaml").write_text(yaml.safe_dump(config))
        start = time.time()
        assert metasft(["bench", "--config", str(run / "bench.yaml")]) == 0
        summary = json.loads((run / "bench" / "results.json").read_text())["summary"]
        record = {"seed": seed, "steps": args.steps, "outer_lr": args.outer_lr, "wall_s": round(time.time() - start, 1),
                  **{f"{e['method']}_query_loss": round(e["query_loss"], 4) for e in summary}}
        print(json.dumps(record), flush=True)
        with open(out / "guard_seeds.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
