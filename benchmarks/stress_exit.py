"""Stress the clean exit of 2-rank `torchrun` training runs on CPU (gloo), optionally under load.

    python benchmarks/stress_exit.py --runs 50 --load          # both cores kept busy meanwhile
    python benchmarks/stress_exit.py --runs 10 --case fsdp-reptile-full

Runs the 2-process task-parallel and FSDP training of the distributed tests again and again, one
after another, and counts every run whose launcher did not exit 0, split by cause (a rank aborted
with SIGABRT, i.e. ``terminate called ...``; another non-zero exit; a hang past the timeout). With
``--load``, one busy-looping process per core competes for the CPU the whole time, as another job
on a shared machine would. Prints one JSON object; the figures live in docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CASES = {
    "task-parallel-reptile-lora": ["meta.algorithm=reptile", "model.use_fsdp=false", "model.lora_rank=4",
                                   "model.lora_alpha=8"],
    "fsdp-reptile-full": ["meta.algorithm=reptile", "model.use_fsdp=true"],
    "task-parallel-fomaml-full": ["meta.algorithm=fomaml", "model.use_fsdp=false"],
    "fsdp-sft-lora": ["meta.algorithm=sft", "model.use_fsdp=true", "model.lora_rank=4", "model.lora_alpha=8"],
}
COMMON = ["optim.name=sgd", "meta.outer_lr=0.5", "trainer.total_training_steps=2", "meta.meta_batch_size=3",
          "meta.inner_batch_size=3", "meta.query_batch_size=3", "meta.inner_lr=0.2", "meta.num_inner_steps=2",
          "data.chat_template=none", "trainer.logger=[jsonl]", "trainer.device=cpu", "trainer.save_freq=1"]


def _burn(stop) -> None:
    x = 0
    while not stop.is_set():
        x = (x * 1103515245 + 12345) % 2147483648


def _allow_core_dumps() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="runs per case")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="default: the first two")
    parser.add_argument("--load", action="store_true", help="keep every core busy with another process")
    parser.add_argument("--timeout", type=float, default=300, help="seconds before a run counts as hung")
    parser.add_argument("--keep-cores", metavar="DIR",
                        help="let ranks dump core into DIR/<case>-<run> (read them with gdb: `thread apply all bt`)")
    args = parser.parse_args()
    cases = args.case or list(CASES)[:2]

    from conftest import write_tasks
    from metasft.tiny import save_tiny_model

    stop = multiprocessing.Event()
    burners = [multiprocessing.Process(target=_burn, args=(stop,), daemon=True)
               for _ in range(os.cpu_count() or 1)] if args.load else []
    for p in burners:
        p.start()
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            model = save_tiny_model(tmp / "model", arch="llama")
            tasks = write_tasks(tmp / "tasks", 4, 5, 4)
            env = {**os.environ, "OMP_NUM_THREADS": "1", "METASFT_DIST_TIMEOUT": "60", "HF_HUB_OFFLINE": "1",
                   "PYTHONFAULTHANDLER": "1"}  # a SIGABRT prints every thread's Python stack
            for case in cases:
                counts = {"runs": 0, "exit_0": 0, "sigabrt": 0, "other_failure": 0, "hung": 0, "seconds": 0.0}
                failures = []
                for i in range(args.runs):
                    run_dir = tmp / f"{case}-{i}"
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--max_restarts=0", "-m", "metasft", "train", f"model.partial_pretrain={model}",
                           *COMMON, *tasks, *CASES[case], f"trainer.default_local_dir={run_dir}"]
                    started = time.monotonic()
                    cwd = None
                    if args.keep_cores:
                        cwd = Path(args.keep_cores) / f"{case}-{i}"
                        cwd.mkdir(parents=True, exist_ok=True)
                    try:
                        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env,
                                              cwd=cwd, preexec_fn=_allow_core_dumps if cwd else None)
                    except subprocess.TimeoutExpired:
                        counts["hung"] += 1
                        continue
                    finally:
                        counts["runs"] += 1
                        counts["seconds"] += time.monotonic() - started
                    if proc.returncode == 0 and (run_dir / "step_2").is_dir():
                        counts["exit_0"] += 1
                    elif "SIGABRT" in proc.stderr or "terminate called" in proc.stderr:
                        counts["sigabrt"] += 1
                        failures.append(proc.stderr[-1500:])
                    else:
                        counts["other_failure"] += 1
                        failures.append(proc.stderr[-1500:])
                    print(f"{case} {i + 1}/{args.runs}: exit {proc.returncode}", file=sys.stderr, flush=True)
                    if proc.returncode != 0 and cwd is not None:  # the whole story, faulthandler's stacks included
                        (cwd / "stderr.txt").write_text(proc.stderr)
                        (cwd / "stdout.txt").write_text(proc.stdout)
                counts["seconds"] = round(counts["seconds"], 1)
                results[case] = {**counts, "first_failures": failures[:2]}
    finally:
        stop.set()
        for p in burners:
            p.join(timeout=5)
    print(json.dumps({"load": args.load, "cores": os.cpu_count(), "cases": results}, indent=2))


if __name__ == "__main__":
    main()
