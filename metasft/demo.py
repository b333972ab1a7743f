"""``metasft demo``: the whole pipeline on a laptop CPU, no downloads (SPEC §8).

    metasft demo                       # ./metasft-demo, seed 0, 300 meta-steps of FOMAML's work per method
    metasft demo --seed 3 --steps 200 --out /tmp/demo

1. generates the built-in cipher suite (``--seed``): 200 keys for meta-training, 10 validation keys
   (where each method's adaptation learning rate is chosen) and 20 held-out keys that are scored;
2. builds a tiny Llama (2 layers, 64 wide) and a byte-level BPE tokenizer locally, and *pretrains* it
   on a disjoint family of fixed digit transforms (``copy:``, ``next:``, …): every method starts from
   that base, as real use starts from a pretrained LM;
3. meta-trains ``sft``, ``fomaml``, ``reptile``, ``maml``, ``meta_lora`` and ``metaicl`` on the same
   budget of work;
4. benchmarks them and the pretrained base on the held-out keys (``metasft bench``), each trained
   method at its best checkpoint on the validation keys, adapted by gradient steps (the base, SFT and
   MetaICL also in context: the same shots in the prompt), prints the table and writes
   ``adaptation.png`` and ``training_curves.png``.

**Budget in work, not seconds.** Every method gets the same number of forward/backward passes over
the same kind of batches: ``--steps`` FOMAML meta-steps of ``meta_batch_size`` tasks × (K inner + 1
query) passes. A method whose step costs fewer passes gets more steps (SFT one pass per task, so
(K + 1)× the steps; Reptile, which has no query pass, (K + 1)/K×). It is the fair unit for "the same
data, the same number of gradient evaluations"; the wall time each method took is reported beside it.
With ``--seed`` fixing the suite, the initialisation, task sampling and the shots, the same command
prints the same numbers on any machine.

The numbers are measured on your machine each time; nothing is fixed. ``bench.yaml`` is left in the
output directory so the benchmark can be re-run or changed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

K = 5            # inner steps of the meta-learned methods, and adaptation steps in the benchmark
INNER_LR = 0.1   # inner SGD learning rate of the meta-learned methods
TASKS_PER_STEP = 4
ROWS = 10        # support rows per inner step and query rows per meta-step

# Settings shared by every method. Short raw-text examples and plain SGD inner loops: tiny models
# need short formats to show the effect (SPEC §8).
DEMO_TRAIN = {
    "meta.num_inner_steps": K,
    "meta.inner_lr": INNER_LR,
    "meta.meta_batch_size": TASKS_PER_STEP,
    "meta.inner_batch_size": ROWS,
    "meta.query_batch_size": ROWS,
    "meta.outer_lr": 3e-3,
    "optim.name": "adamw",
    "optim.lr_scheduler": "constant",
    "optim.warmup_steps_ratio": 0.0,
    "optim.clip_grad": 1.0,
    "trainer.save_freq": -1,
    "trainer.log_freq": 10,
    "trainer.precision": "fp32",
    "trainer.device": "cpu",
    "model.attn_implementation": "sdpa",
    # Training curves: adapt to the validation tasks and generate every so often.
    "trainer.test_exact_match_rows": 20,
}

# name -> (shipped config, overrides, forward/backward passes per task and step). docs/demo.md
# gives the measurements behind each choice.
MAML_K = 1  # K = 5 (or inner lr 0.01) makes MAML's unrolled inner loop chaotic on this base: docs/demo.md
METHODS: dict[str, tuple[str, dict, int]] = {
    "sft": ("sft", {}, 1),
    "fomaml": ("fomaml", {}, K + 1),
    "reptile": ("reptile", {"meta.outer_lr": 1.0, "optim.name": "sgd", "optim.clip_grad": None}, K),
    "maml": ("maml", {"meta.num_inner_steps": MAML_K}, MAML_K + 1),
    # Adapters on every linear layer *and the output head*: without the head, 5 inner steps only
    # learnt to fall back to the key-agnostic prior (docs/demo.md).
    "meta_lora": ("meta_lora", {"model.lora_rank": 16, "model.lora_alpha": 16,
                                "model.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                         "down_proj", "lm_head"]}, K + 1),
    # MetaICL: SFT on rows of 5 same-key demonstrations + one example, one pass per task and step
    # like SFT (over rows 6 times longer). 10 demonstrations (the fewest shots evaluated) learnt no
    # better and took the demo past 10 minutes (docs/meta_learning_vs_icl.md).
    "metaicl": ("metaicl", {"meta.metaicl_demos": 5}, 1),
}
# Opt-in (--methods): FOMAML and MAML with learned per-tensor inner rates (Meta-SGD; issue 16),
# initialised at INNER_LR and stepped by AdamW at the outer lr. docs/algorithms.md has what they gave.
OPTIONAL_METHODS: dict[str, tuple[str, dict, int]] = {
    "fomaml_meta_sgd": ("fomaml", {"meta.learn_inner_lr": "per_tensor", "meta.inner_lr_lr": 3e-3}, K + 1),
    "maml_meta_sgd": ("maml", {"meta.num_inner_steps": MAML_K, "meta.learn_inner_lr": "per_tensor",
                               "meta.inner_lr_lr": 3e-3}, MAML_K + 1),
}
ALL_METHODS = {**METHODS, **OPTIONAL_METHODS}
IN_CONTEXT_METHODS = ("sft", "metaicl")  # evaluated in context too, with the pretrained base
ADAPT_LR_GRID = [0.03, 0.1, 0.3]  # each method's adaptation lr, chosen on the validation tasks
NUM_TRAIN, NUM_VALIDATION, NUM_TEST = 200, 10, 20
DEFAULT_STEPS, DEFAULT_N_SHOTS = 300, [10, 50]  # `metasft demo` without --steps / --n-shots
CURVE_POINTS = 10


def method_steps(name: str, steps: int) -> int:
    """Meta-steps that give ``name`` the forward/backward passes of ``steps`` FOMAML meta-steps."""
    return max(1, round(steps * (K + 1) / ALL_METHODS[name][2]))


def _override(key: str, value) -> str:
    return f"{key}={'null' if value is None else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def write_bench_config(out: Path, base_model: Path, steps: int, seed: int, methods: list[str],
                       n_shots: list[int]) -> Path:
    common = dict(DEMO_TRAIN, **{"trainer.seed": seed})
    config = {
        "base_model": str(base_model),
        "tasks_dir": str(out / "data"),
        "n_shots": n_shots,
        "seeds": [seed],
        "adapt": {"optimizer": "sgd", "lr": INNER_LR, "lr_grid": ADAPT_LR_GRID, "steps": K, "batch_size": ROWS},
        "eval": {"batch_size": 50, "max_query_rows": 50},
        # Long enough for 50 in-context shots of ~12 tokens before a query.
        "data": {"chat_template": "none", "max_length": 1024},
        "adaptations": ["gradient", "in_context"],
        "train_overrides": [_override(k, v) for k, v in common.items()],
        "metric": "exact_match",
        # Every method is scored at its best checkpoint on the validation keys: FOMAML, META-LoRA and
        # at times MAML swing by up to 0.5 exact match between evaluations (docs/demo.md), so the
        # last step alone would score wherever a swing happens to stop.
        "select_checkpoint": "best_validation",
        # Tiny models are bound by Python overhead, not FLOPs: two single-threaded trainings at a
        # time use a 2-core CPU about twice as well as one two-threaded training.
        "train_parallel": 2,
        "train_threads": 1,
        "output_dir": str(out),
        "methods": [],
    }
    # The longest training (MetaICL's long rows) starts first, so that the two training slots stay
    # busy to the end instead of leaving it to run alone (about a minute of the demo's wall time).
    for name in sorted(methods, key=lambda m: m != "metaicl"):
        config_name, overrides, _ = ALL_METHODS[name]
        total = method_steps(name, steps)
        overrides = dict(overrides, **{"trainer.total_training_steps": total,
                                       "trainer.test_freq": max(1, total // CURVE_POINTS)})
        entry = {"name": name, "config_name": config_name, "overrides": [_override(k, v) for k, v in overrides.items()]}
        if name not in IN_CONTEXT_METHODS:
            # A 50-shot prompt is ~650 tokens: in-context evaluation cost each method ~25 s. The
            # gradient-meta-learned models were never trained on multi-example rows (they scored
            # 0.000 in context: docs/meta_learning_vs_icl.md), so only the base, SFT and MetaICL are.
            entry["adaptations"] = ["gradient"]
        config["methods"].append(entry)
    path = out / "bench.yaml"
    path.write_text("# metasft bench --config " + str(path) + "\n" + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def pretrain_base(out: Path, seed: int, pretrain_steps: int, console) -> Path:
    """Build the tiny model and pretrain it (multi-task SFT) on the transform family; returns the
    checkpoint every method starts from."""
    from metasft.bench import ResolvedMethod, train_methods
    from metasft.config import load_config
    from metasft.data.synthetic import generate_pretraining_suite
    from metasft.tiny import save_tiny_model

    generate_pretraining_suite(out / "pretrain_data", seed=seed)
    save_tiny_model(out / "init_model", arch="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=128, seed=seed)
    overrides = [f"model.partial_pretrain={out / 'init_model'}", f"meta.tasks_dir={out / 'pretrain_data'}",
                 f"trainer.default_local_dir={out / 'runs' / 'pretrain'}",
                 f"trainer.total_training_steps={pretrain_steps}", "trainer.logger=[jsonl]", "trainer.test_freq=-1",
                 "data.chat_template=none", "data.max_length=64",
                 *[_override(k, v) for k, v in DEMO_TRAIN.items() if k != "trainer.test_exact_match_rows"],
                 f"trainer.seed={seed}"]
    console.print(f"pretraining the tiny base: {pretrain_steps} multi-task steps on the transform family",
                  markup=False, highlight=False)
    pretrain = ResolvedMethod("pretrain", train_config=load_config(name="sft", overrides=overrides))
    # One thread, like every other stage (see run_demo).
    return train_methods([pretrain], out, parallel=1, threads=1, console=console)["pretrain"][0]


def run_demo(out: str | Path, steps: int, methods: list[str], n_shots: list[int], seed: int = 0,
             pretrain_steps: int = 600) -> dict:
    import torch
    from rich.console import Console

    from metasft.bench import load_bench_config, run_bench
    from metasft.data.synthetic import generate_suite, pretraining_keys
    from metasft.errors import ConfigError

    # Multi-task SFT is the baseline every verdict is about: always trained, on the same budget.
    methods = list(dict.fromkeys(["sft", *methods]))
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown method {unknown[0]!r} (choose from {', '.join(ALL_METHODS)})")
    for flag, value in (("--steps", steps), ("--pretrain-steps", pretrain_steps)):
        if value < 1:
            raise ConfigError(f"{flag}: {value} must be >= 1")
    console = Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "runs").exists():
        # Runs would resume from their last checkpoint and train no further: a demo measures afresh.
        shutil.rmtree(out / "runs")
    (out / "runs").mkdir()
    console.print(f"[bold]metasft demo[/bold] → {out}  (seed {seed}; {steps} FOMAML meta-steps of work per method)")
    manifest = generate_suite(out / "data", num_tasks=NUM_TRAIN + NUM_VALIDATION + NUM_TEST,
                              num_held_out=NUM_VALIDATION + NUM_TEST, num_validation=NUM_VALIDATION,
                              support_size=100, query_size=50, seed=seed, exclude_keys=pretraining_keys())
    console.print(f"suite: {len(manifest['train_tasks'])} meta-training, {len(manifest['validation_tasks'])} "
                  f"validation and {len(manifest['held_out_tasks'])} held-out cipher tasks, e.g. 'map: 1 5 2 4' → "
                  "' 3 2 4 5'", markup=False, highlight=False)
    base = pretrain_base(out, seed, pretrain_steps, console)
    bench_config = write_bench_config(out, base, steps, seed, methods, n_shots)
    # One thread in every stage (pretraining, trainings, evaluation): a reduction split over another
    # number of threads can round differently, and the same seed must print the same numbers on a
    # machine with more cores.
    torch.set_num_threads(1)
    result = run_bench(load_bench_config(bench_config), console=console)
    _verdict(result, console, min(n_shots))
    return result


BASELINES = ("base", "sft")


def _verdict(result: dict, console, n_shots: int, shots_word: str = "shots", against_best: bool = False) -> None:
    """Say plainly, per method, whether meta-learning beat multi-task SFT at the fewest shots; with
    ``against_best``, the best baseline instead: the base or SFT, adapted by gradient or in context."""
    if n_shots == 1:
        shots_word = shots_word.replace("shots", "shot", 1)
    rows = [e for e in result["summary"] if e["n_shots"] == n_shots and "exact_match" in e]
    at = {e["method"]: e for e in rows if e["adaptation"] == "gradient"}
    in_context = {e["method"]: e for e in rows if e["adaptation"] == "in_context"}
    if in_context:
        console.print(f"In context at {n_shots} {shots_word} (no gradient step), exact match: " + ", ".join(
            f"{m} {e['exact_match']:.3f}" for m, e in in_context.items()) + ".", markup=False, highlight=False)
    if against_best:
        candidates = [(e, m if a == "gradient" else f"{m} in context") for a, group in
                      (("gradient", at), ("in_context", in_context)) for m, e in group.items() if m in BASELINES]
        if not candidates:
            return
        baseline, label = max(candidates, key=lambda c: c[0]["exact_match"])
        label = f"the best baseline ({label})"
    elif "sft" in at:
        baseline, label = at["sft"], "multi-task SFT"
    else:
        return
    for method, e in at.items():
        if method in BASELINES:
            continue
        margin = e["exact_match"] - baseline["exact_match"]
        separated = e["exact_match"] - e["exact_match_ci95"] > baseline["exact_match"] + baseline["exact_match_ci95"]
        verdict = "beats" if separated else "does not beat"
        console.print(f"At {n_shots} {shots_word} {method} {verdict} {label} on held-out tasks: exact match "
                      f"{e['exact_match']:.3f} vs {baseline['exact_match']:.3f} ({margin:+.3f}"
                      f"{', 95% intervals do not overlap' if separated else ''}).", markup=False, highlight=False)
