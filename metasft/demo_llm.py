"""``metasft demo --model smollm2-135m``: the pipeline on a real pretrained LLM, on a 2-core CPU.

    metasft demo --model smollm2-135m                          # ./metasft-demo-smollm2-135m, seed 0
    metasft demo --model smollm2-135m --steps 1000 --n-shots 1 5 --methods sft,anil,fomaml,reptile

1. converts SmolLM2-135M-Instruct with ``metasft models get`` (once, into ``--model-dir``);
2. builds the ``wordnet`` suite for ``--seed`` (or takes ``--tasks-dir``, any prepared N-way suite):
   5-way tasks whose label words are drawn per task, categories disjoint across meta-training,
   validation and held-out tasks;
3. trains each method from the same model. Only a full-rank adapter of the output head is trained
   (``model.lora_full_head``: a zero-initialised head delta B·A with A a 576 × 576 matrix that starts
   at the identity), so every decoder layer is frozen and computed once per row into a prefix cache
   all methods share (``out/prefix_cache``); two methods at a time, one thread each. FOMAML (the
   default) and ANIL (MAML with the head as the inner scope, second order) meta-learn A, the metric
   in which a head step on B compares rows: docs/real_model.md, experiment 3, measured why the
   frozen features need one;
4. benchmarks them and the base on the held-out tasks (``metasft bench``): every model adapted with
   the same protocol (3 SGD steps on the head adapter, the rate chosen per method on the validation
   tasks, shots drawn per class), the base and SFT also in context; prints the table, the verdict
   lines and writes ``adaptation.png`` and ``training_curves.png``.

**Budget in passes.** Every method passes ``TASKS_PER_STEP`` tasks × ``ROWS_PER_TASK`` rows forward
and backward per step, ``--steps`` steps: a meta-step is K = 3 inner steps of 5 support rows and
one query batch of 5 rows a task, an SFT step 20 rows a task, a Reptile step 4 inner steps of 5.

**Runs continue.** Unlike the toy demo, a re-run keeps ``out/runs``: each training resumes from its
last checkpoint, so an interrupted long run is not lost (``--fresh`` starts over).
docs/real_model.md has the experiment these settings come from and what each budget gave.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from metasft.demo import _override, _verdict

MODEL = "smollm2-135m"
TOP_LAYERS = 4       # model.train_top_layers: with the adapter on the head alone, no layer trains
K = 3                # inner steps, and adaptation steps in the benchmark
INNER_LR = 0.01      # the meta-learned methods' inner SGD rate
TASKS_PER_STEP = 4
ROWS = 5             # support rows per inner step, query rows per meta-step
ROWS_PER_TASK = ROWS * (K + 1)
LORA_MODULES = ["lm_head"]  # with model.lora_full_head: the head delta only (experiment 3)
ADAPT_LR_GRID = [0.003, 0.01, 0.03, 0.1]
# Test-time adaptation steps take every shot of a 5-way task up to 5 per class: at 1 shot per class
# the 5 rows (what meta-training's inner steps take), at 5 the 25. Batches of 5 drawn from 25 shots
# can miss labels; full batches raised FOMAML at 5 shots per class by +0.06 to +0.11 on 3 seeds
# (docs/real_model.md, "Why 5 shots did not help").
ADAPT_BATCH = 25
CURVE_POINTS = 5     # validation evaluations per run: losses from the cache, generation through all 30 layers

REAL_TRAIN = {  # trainer.device stays auto: the same command runs on a GPU when there is one
    "trainer.precision": "fp32",
    "data.max_length": 128,
    "data.chat_template": "auto",
    "model.lora_rank": 8,
    "model.lora_alpha": 16,
    "model.target_modules": LORA_MODULES,
    "model.lora_full_head": True,
    "meta.meta_batch_size": TASKS_PER_STEP,
    "meta.num_inner_steps": K,
    "meta.inner_lr": INNER_LR,
    "meta.outer_lr": 2.0e-4,
    # auto: the meta-learners' 4 tasks run together by rows over the head adapter, B factored (ANIL
    # 2.9x, FOMAML 4.3x, Reptile 4.0x a step: benchmarks/head_paths.py); SFT and learned rates run
    # one task at a time.
    "meta.task_batching": "auto",
    "optim.lr_scheduler": "constant",
    "optim.warmup_steps_ratio": 0.05,
    "trainer.test_exact_match_rows": 25,
    "trainer.log_freq": 10,
}

# name -> (shipped config, overrides). Every method passes ROWS_PER_TASK rows of each task a step.
METHODS: dict[str, tuple[str, dict]] = {
    "sft": ("sft", {"meta.inner_batch_size": ROWS_PER_TASK}),
    "fomaml": ("fomaml", {"meta.inner_batch_size": ROWS, "meta.query_batch_size": ROWS}),
    # ANIL: MAML with the head's adapter as the inner scope, second order through it.
    "anil": ("maml", {"meta.inner_scope": "head", "meta.inner_batch_size": ROWS, "meta.query_batch_size": ROWS}),
    "reptile": ("reptile", {"meta.inner_batch_size": ROWS, "meta.num_inner_steps": K + 1}),
    "fomaml_meta_sgd": ("fomaml", {"meta.inner_batch_size": ROWS, "meta.query_batch_size": ROWS,
                                   "meta.learn_inner_lr": "per_tensor", "meta.inner_lr_lr": 1e-3}),
}
# FOMAML: the best method at 1 shot per class on every seed at 1,000 steps, and ahead of ANIL at 250
# and 500 steps on most (docs/real_model.md, "FOMAML on 3 seeds"); its steps are also cheaper.
DEFAULT_METHODS = ["sft", "fomaml"]
DEFAULT_STEPS = 250  # half experiment 3's budget; docs/real_model.md has what 250 and 500 steps gave
DEFAULT_N_SHOTS = [1]
IN_CONTEXT_METHODS = ("sft",)  # and the base: with the shots in the prompt


def write_bench_config(out: Path, model_dir: Path, tasks_dir: Path, steps: int, seed: int, methods: list[str],
                       n_shots: list[int], top_layers: int = TOP_LAYERS) -> Path:
    common = dict(REAL_TRAIN, **{"model.train_top_layers": top_layers, "trainer.seed": seed, "trainer.prefix_cache_dir": str(out / "prefix_cache"),
                                 "trainer.total_training_steps": steps,
                                 "trainer.test_freq": max(1, steps // CURVE_POINTS),
                                 "trainer.save_freq": max(1, steps // 4)})
    config = {
        "base_model": str(model_dir),
        "tasks_dir": str(tasks_dir),
        "n_shots": n_shots,
        "shots": "per_class",
        "seeds": [seed],
        "adaptations": ["gradient", "in_context"],
        # The rate is chosen by validation query loss: exact match on 125 validation rows could not tell
        # adjacent rates apart and once picked an unstable one (docs/real_model.md, seed 1).
        "adapt": {"optimizer": "sgd", "lr_grid": ADAPT_LR_GRID, "steps": K, "batch_size": ADAPT_BATCH,
                  "inner_scope": "head", "select_lr_by": "query_loss"},
        # The base adapts the same adapters as the trained methods (its head is tied: docs/bench.md).
        "base_adapters_from": "sft",
        "eval": {"batch_size": 25, "max_query_rows": 25, "max_new_tokens": 4},
        # Room for 5 in-context shots per class (25 chat turns of ~80 tokens) before a query.
        "data": {"chat_template": "auto", "max_length": 2560},
        "train_overrides": [_override(k, v) for k, v in common.items()],
        "metric": "exact_match",
        "select_checkpoint": "last",
        "train_parallel": 2,
        "train_threads": 1,
        "output_dir": str(out),
        # The trainings' cache: the validation rows they evaluated are not run through 30 layers again.
        "prefix_cache_dir": str(out / "prefix_cache"),
        "methods": [],
    }
    for name in methods:
        config_name, overrides = METHODS[name]
        entry = {"name": name, "config_name": config_name, "overrides": [_override(k, v) for k, v in overrides.items()]}
        if name not in IN_CONTEXT_METHODS:
            entry["adaptations"] = ["gradient"]
        config["methods"].append(entry)
    path = out / "bench.yaml"
    path.write_text("# metasft bench --config " + str(path) + "\n" + yaml.safe_dump(config, sort_keys=False),
                    encoding="utf-8")
    return path


def run_llm_demo(out: str | Path, steps: int, methods: list[str], n_shots: list[int], seed: int = 0,
                 model_dir: str | Path = Path("models") / MODEL, tasks_dir: str | Path | None = None,
                 fresh: bool = False, top_layers: int = TOP_LAYERS) -> dict:
    from rich.console import Console

    from metasft.bench import load_bench_config, run_bench
    from metasft.data.suites import build_wordnet
    from metasft.errors import ConfigError
    from metasft.models import get_model

    methods = list(dict.fromkeys(["sft", *methods]))  # SFT is the baseline every verdict is about
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown method {unknown[0]!r} for --model {MODEL} "
                          f"(choose from {', '.join(METHODS)})")
    if steps < 1:
        raise ConfigError(f"--steps: {steps} must be >= 1")
    console = Console()
    out, model_dir = Path(out), Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fresh and (out / "runs").exists():
        shutil.rmtree(out / "runs")
    console.print(f"[bold]metasft demo --model {MODEL}[/bold] → {out}  (seed {seed}; {steps} steps of "
                  f"{TASKS_PER_STEP} tasks × {ROWS_PER_TASK} rows per method)")
    if not (model_dir / "config.json").is_file():
        get_model(MODEL, model_dir, console=lambda line: console.print(line, markup=False, highlight=False))
    if tasks_dir is None:
        tasks_dir = out / "data"
        manifest = build_wordnet(tasks_dir, seed=seed)
        console.print(f"suite: wordnet (seed {seed}), {len(manifest['train_tasks'])} meta-training, "
                      f"{len(manifest['validation_tasks'])} validation and {len(manifest['held_out_tasks'])} "
                      "held-out 5-way tasks", markup=False, highlight=False)
    bench_config = write_bench_config(out, model_dir, Path(tasks_dir), steps, seed, methods, n_shots, top_layers)
    result = run_bench(load_bench_config(bench_config), console=console)
    _verdict(result, console, min(n_shots), shots_word="shots per class", against_best=True)
    return result
