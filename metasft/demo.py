"""``metasft demo``: the whole pipeline on a laptop CPU, no downloads (SPEC §8).

    metasft demo                       # ./metasft-demo, 150 s of meta-training per method, two at a time
    metasft demo --budget 30 --out /tmp/demo

1. generates the built-in cipher suite (120 tasks: 100 for meta-training, 20 held out);
2. builds a tiny Llama (2 layers, 64 wide) and a byte-level BPE tokenizer locally;
3. meta-trains ``sft``, ``fomaml``, ``reptile``, ``maml`` and ``meta_lora`` for ``--budget`` seconds each;
4. benchmarks them and the untrained base model on the held-out tasks (``metasft bench``), prints
   the table and writes ``adaptation.png``.

The numbers are measured on your machine each time; nothing is fixed. ``bench.yaml`` is left in
the output directory so the benchmark can be re-run or changed.
"""

from __future__ import annotations

from pathlib import Path

import yaml

# Settings shared by every meta-trained method. Short raw-text examples and plain SGD inner loops:
# tiny models need short formats to show the effect (SPEC §8).
DEMO_TRAIN = {
    "meta.num_inner_steps": 5,
    "meta.meta_batch_size": 4,
    "meta.inner_batch_size": 10,
    "meta.query_batch_size": 20,
    "optim.name": "adamw",
    "optim.lr_scheduler": "constant",
    "optim.warmup_steps_ratio": 0.0,
    "optim.clip_grad": 1.0,
    "trainer.total_training_steps": 1000000,
    "trainer.save_freq": -1,
    "trainer.log_freq": 10,
    "model.attn_implementation": "sdpa",
}
INNER_LR = 0.5
METHODS = {
    "sft": ("sft", {"meta.outer_lr": 3e-3}),
    "fomaml": ("fomaml", {"meta.outer_lr": 3e-3, "meta.inner_lr": INNER_LR}),
    "reptile": ("reptile", {"meta.outer_lr": 1.0, "meta.inner_lr": INNER_LR, "optim.name": "sgd", "optim.clip_grad": None}),
    "maml": ("maml", {"meta.outer_lr": 3e-3, "meta.inner_lr": INNER_LR}),
    "meta_lora": ("meta_lora", {"meta.outer_lr": 1e-2, "meta.inner_lr": INNER_LR * 4, "model.lora_rank": 16,
                                "model.lora_alpha": 16}),
}


def write_bench_config(out: Path, budget: float, methods: list[str], n_shots: list[int], seeds: list[int]) -> Path:
    config = {
        "base_model": str(out / "base_model"),
        "tasks_dir": str(out / "data"),
        "n_shots": n_shots,
        "seeds": seeds,
        "adapt": {"optimizer": "sgd", "lr": INNER_LR, "steps": DEMO_TRAIN["meta.num_inner_steps"], "batch_size": 10},
        "eval": {"batch_size": 50, "max_query_rows": 50},
        "data": {"chat_template": "none", "max_length": 64},
        "train_overrides": [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                            for k, v in DEMO_TRAIN.items()] + [f"trainer.time_budget_s={budget}"],
        "metric": "exact_match",
        # Tiny models are bound by Python overhead, not FLOPs: two single-threaded trainings at a
        # time use a 2-core CPU about twice as well as one two-threaded training.
        "train_parallel": 2,
        "train_threads": 1,
        "output_dir": str(out),
        "methods": [{"name": name, "config_name": METHODS[name][0],
                     "overrides": [f"{k}={'null' if v is None else v}" for k, v in METHODS[name][1].items()]}
                    for name in methods],
    }
    path = out / "bench.yaml"
    path.write_text("# metasft bench --config " + str(path) + "\n" + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def run_demo(out: str | Path, budget: float, methods: list[str], n_shots: list[int], seeds: list[int],
             num_tasks: int = 120, num_held_out: int = 20) -> dict:
    from rich.console import Console

    from metasft.bench import load_bench_config, run_bench
    from metasft.data.synthetic import generate_suite
    from metasft.errors import ConfigError
    from metasft.tiny import save_tiny_model

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown method {unknown[0]!r} (choose from {', '.join(METHODS)})")
    if budget <= 0:
        raise ConfigError(f"--budget: {budget} must be > 0 seconds")
    console = Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "runs").exists():
        # Time-budgeted runs would resume and train for another budget: a demo measures afresh.
        import shutil

        shutil.rmtree(out / "runs")
    console.print(f"[bold]metasft demo[/bold] → {out}  ({budget:g} s of meta-training per method)")
    manifest = generate_suite(out / "data", num_tasks=num_tasks, num_held_out=num_held_out, support_size=100, query_size=50)
    console.print(f"suite: {len(manifest['train_tasks'])} meta-training and {len(manifest['held_out_tasks'])} held-out "
                  "cipher tasks, e.g. 'map: 1 5 2 4' → ' 3 2 4 5'", markup=False, highlight=False)
    save_tiny_model(out / "base_model", arch="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=128)
    bench_config = write_bench_config(out, budget, methods, n_shots, seeds)
    result = run_bench(load_bench_config(bench_config), console=console)
    _verdict(result, console, min(n_shots))
    return result


def _verdict(result: dict, console, n_shots: int) -> None:
    """Say plainly whether meta-learning beat multi-task SFT at the fewest shots."""
    at = {e["method"]: e for e in result["summary"] if e["n_shots"] == n_shots and "exact_match" in e}
    if "sft" not in at:
        return
    sft = at["sft"]
    better = [m for m, e in at.items() if m not in ("sft", "base")
              and e["exact_match"] - e["exact_match_ci95"] > sft["exact_match"] + sft["exact_match_ci95"]]
    if better:
        console.print(f"At {n_shots} shots, {', '.join(better)} beat multi-task SFT on held-out tasks "
                      "(95% intervals do not overlap).", markup=False, highlight=False)
    else:
        console.print(f"At {n_shots} shots no meta-learned method beat multi-task SFT beyond the 95% intervals "
                      "with this budget; try a larger --budget.", markup=False, highlight=False)
