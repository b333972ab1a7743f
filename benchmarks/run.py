"""metasft performance benchmarks: cost ratios measured side by side, in one run, on the same batches.

    python benchmarks/run.py --quick            # under 3 minutes on 2 CPU cores
    python benchmarks/run.py --out benchmarks/results.json

Prints one JSON object (and writes it to --out). Every ratio is a median over rounds of the two
sides timed back to back (alternating which goes first), in the same process on the same
batches; peak memory is peak RSS of fresh subprocesses. Everything runs on the CPU. Keys:

- ``fomaml_over_floor`` / ``reptile_over_floor``: meta-step time over the time of the same
  forward+backward passes done as plain SFT steps (FOMAML: K support + 1 query per task; Reptile:
  K support per task — it has no query pass);
- ``maml_over_fomaml``: second- over first-order meta-step time; ``maml_over_second_order_bound`` divides
  it by (9K+3)/(3K+3), the matmul ratio that exact second order cannot go below (see
  ``second_order_matmul_bound``), and ``maml_over_fomaml_by_inner_steps`` gives both against K;
- ``lora_over_full`` (time), ``lora_over_full_memory``, ``lora_over_full_checkpoint``: META-LoRA over
  full-weight FOMAML;
- ``fomaml_mem_over_sft``, ``maml_mem_over_sft``: peak memory of a meta-step over a plain SFT step;
- ``padding_speedup``: training tokens/s with dynamic padding over padding to max_length on a
  long-tailed length distribution;
- ``generate_batched_speedup``: rows/s of batched KV-cache generation (batch 16) over one row at a time;
- ``scaling``: meta-step time against num_inner_steps and meta_batch_size, with linear fits;
- ``batched_over_sequential_demo``: FOMAML meta-steps/s with ``meta.task_batching`` over the sequential
  engine, on the demo's model (2 layers, 64 wide) and shapes (4 tasks, K=5, 10 rows of ~11 tokens);
  ``..._by_algorithm`` adds Reptile and MAML, ``..._one_thread`` the single thread the demo runs on;
  ``batched_bound_demo`` is sequential time over the same passes done as *one plain pass* of all the
  tasks' rows through shared weights — what no batching of per-task weights can beat;
- ``batched_over_sequential_bench``: the same on the benchmark model, the lower of 4 and 16 tasks
  (both in ``..._by_tasks``); ``batched_over_sequential_single``: one task per meta-step with the
  trainer's default (``auto``) over the sequential engine;
- ``target_logits_speedup``: forward+backward of the loss with logits at every position over the
  default, logits only where a target is predicted, on a 49,152-word vocabulary (SmolLM2's) and
  rows of 96 prompt + 4 response tokens;
- ``batched_mem_over_sequential``: peak memory of a batched meta-step over a sequential one (FOMAML,
  full weights, 4 tasks; MAML in ``..._maml``);
- ``top_layers_over_all_layers`` (SmolLM2-135M, when converted: ``--smollm2 DIR``), ``anil_over_maml``,
  ``anil_over_fomaml`` and their peak memory: inner scopes and the frozen-prefix cache
  (``benchmarks/scopes.py`` says exactly what is compared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch

from metasft.algorithms import Episode, InnerLoop, build_algorithm
from metasft.algorithms.inner_loop import stack_batches
from metasft.config import Config, MetaConfig, ModelConfig
from metasft.data.collate import collate
from metasft.data.formatting import Example
from metasft.data.tokenize import encode_examples
from metasft.evaluate import _prompt_ids, generate
from metasft.losses import lm_loss
from metasft.model import apply_lora, count_parameters, trainable_named_parameters
from metasft.tiny import build_tiny_model, build_tokenizer
from metasft.train import build_optimizer, resolve_tasks_per_pass, run_meta_step

from scopes import scope_ratios  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

MODEL = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512)
DEMO_MODEL = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


def build(lora: bool = False):
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, arch="llama", **MODEL)
    model.train()
    if lora:
        model = apply_lora(model, ModelConfig(lora_rank=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    return tokenizer, model


def cipher_rows(rng: np.random.Generator, n: int, length: int = 12) -> list[Example]:
    key = rng.permutation(10)
    rows = []
    for _ in range(n):
        digits = rng.integers(0, 10, size=length)
        rows.append(Example(prompt="map: " + " ".join(map(str, digits)), response=" " + " ".join(str(key[d]) for d in digits)))
    return rows


def make_episodes(tokenizer, num_tasks: int, num_inner_steps: int, batch_size: int = 8, seed: int = 0,
                  digits: int = 12) -> list[Episode]:
    rng = np.random.default_rng(seed)
    episodes = []
    for t in range(num_tasks):
        rows = encode_examples(cipher_rows(rng, batch_size * (num_inner_steps + 1), digits), tokenizer, 256,
                               chat_template="none")
        batches = [collate(rows[i * batch_size:(i + 1) * batch_size], tokenizer.pad_token_id)
                   for i in range(num_inner_steps + 1)]
        episodes.append(Episode(task=f"t{t}", support_batches=batches[:-1], query_batch=batches[-1]))
    return episodes


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _outer_config() -> Config:
    """The trainer's default outer optimizer (AdamW) at a small learning rate."""
    cfg = Config()
    cfg.meta.outer_lr = 1e-4
    return cfg


class MetaStepper:
    """One algorithm's meta-step, exactly as the trainer runs it (``run_meta_step``)."""

    def __init__(self, model, algorithm: str, num_inner_steps: int, inner_lr: float = 0.05, tasks_per_pass: int = 1):
        self.tasks_per_pass = tasks_per_pass  # 1: the sequential engine; more: task-batched passes
        self.algorithm = build_algorithm(MetaConfig(algorithm=algorithm))
        self.engine = InnerLoop(model, trainable_named_parameters(model), inner_lr, num_inner_steps)
        self.optimizer = build_optimizer(_outer_config(), self.engine.params)

    def __call__(self, episodes):
        run_meta_step(self.engine, self.algorithm, episodes, len(episodes), self.optimizer, clip_grad=1.0,
                      tasks_per_pass=self.tasks_per_pass)


def sft_floor(model, batches_per_task: list[list[dict]], lr: float = 0.05):
    """The compute floor: the same forward+backward passes as plain SFT steps (SGD update)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        for batches in batches_per_task:
            for batch in batches:
                loss = lm_loss(model, batch)
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    torch._foreach_add_(params, grads, alpha=-lr)
    return run


def paired_ratios(pairs: dict[str, tuple], rounds: int) -> tuple[dict[str, float], dict[str, dict]]:
    """Median over rounds of time(a) / time(b) for each ``name: (a, b)``, the two sides of a pair
    timed back to back (in alternating order) so that a shared machine's drift hits both alike.
    Returns the ratios and, per name, the median seconds of each side."""
    for a, b in pairs.values():  # warm-up: allocator, caches, lazy initialisation
        a(), b()
    ratios = {name: [] for name in pairs}
    seconds = {name: ([], []) for name in pairs}
    for r in range(rounds):
        for name, (a, b) in pairs.items():
            timed = {}
            for side, fn in ((("a", a), ("b", b)) if r % 2 == 0 else (("b", b), ("a", a))):
                start = time.perf_counter()
                fn()
                timed[side] = time.perf_counter() - start
            ratios[name].append(timed["a"] / timed["b"])
            seconds[name][0].append(timed["a"])
            seconds[name][1].append(timed["b"])
    return ({name: statistics.median(v) for name, v in ratios.items()},
            {name: {"a": statistics.median(a), "b": statistics.median(b)} for name, (a, b) in seconds.items()})


def second_order_matmul_bound(num_inner_steps: int) -> float:
    """MAML over FOMAML in matmuls per linear layer: FOMAML runs K+1 forward+backward passes (1+2
    matmuls each); exact MAML also differentiates each of the K inner backward passes again — a
    Hessian-vector product through the kept graph, 4 matmuls for the backward graph plus 2 for the
    forward graph. No exact second-order method needs fewer (Pearlmutter, 1994)."""
    k = num_inner_steps
    return (9 * k + 3) / (3 * k + 3)


def step_ratios(repeats: int) -> dict:
    tokenizer, model = build()
    # 2 tasks: each timed meta-step is short (~0.4 s), so the two sides of a pair run close in time
    # on a machine whose speed drifts, and more rounds fit; the ratios are per task anyway.
    K, T = 5, 2
    episodes = make_episodes(tokenizer, T, K)
    out = {}
    fomaml = MetaStepper(model, "fomaml", K)
    reptile = MetaStepper(model, "reptile", K)
    maml = MetaStepper(model, "maml", K)
    floor_fomaml = sft_floor(model, [e.support_batches + [e.query_batch] for e in episodes])
    floor_reptile = sft_floor(model, [e.support_batches for e in episodes])
    # The floor ratios sit near 1 against a 5% target, so they get the most rounds; the MAML ratio is
    # ~2.7 and its meta-step the slowest, so fewer rounds pin it down well enough.
    ratios, seconds = paired_ratios({
        "fomaml_over_floor": (lambda: fomaml(episodes), floor_fomaml),
        "reptile_over_floor": (lambda: reptile(episodes), floor_reptile),
    }, repeats)
    maml_ratio, maml_seconds = paired_ratios(
        {"maml_over_fomaml": (lambda: maml(episodes), lambda: fomaml(episodes))}, max(5, repeats // 3))
    ratios.update(maml_ratio)
    seconds.update(maml_seconds)
    out.update(ratios)
    out["maml_over_second_order_bound"] = ratios["maml_over_fomaml"] / second_order_matmul_bound(K)
    out["seconds"] = {"fomaml": seconds["fomaml_over_floor"]["a"], "floor_fomaml": seconds["fomaml_over_floor"]["b"],
                      "reptile": seconds["reptile_over_floor"]["a"], "floor_reptile": seconds["reptile_over_floor"]["b"],
                      "maml": seconds["maml_over_fomaml"]["a"]}
    _, lora_model = build(lora=True)
    lora = MetaStepper(lora_model, "fomaml", K)
    ratio, timed = paired_ratios({"lora_over_full": (lambda: lora(episodes), lambda: fomaml(episodes))},
                                 max(5, repeats // 3))
    out.update(ratio)
    out["seconds"].update({"fomaml_lora": timed["lora_over_full"]["a"], "fomaml_beside_lora": timed["lora_over_full"]["b"]})
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "full")
        lora_model.save_pretrained(Path(tmp) / "lora")
        size = lambda d: sum(f.stat().st_size for f in (Path(tmp) / d).glob("*.safetensors"))  # noqa: E731
        out["checkpoint_bytes"] = {"full": size("full"), "lora": size("lora")}
        out["lora_over_full_checkpoint"] = size("lora") / size("full")
    total, _ = count_parameters(model)
    out["parameters"] = {"full": total, "lora_trainable": count_parameters(lora_model)[1]}
    out["shape"] = {"num_tasks": T, "num_inner_steps": K, "batch_size": 8, "tokens_per_row": int(
        episodes[0].query_batch["attention_mask"].sum() / 8)}
    return out


def folded_passes(model, episodes):
    """The bound for task batching: the K+1 passes of a meta-step done as plain forward+backward
    passes over all tasks' rows at once, through *shared* weights (SGD update)."""
    params = [p for p in model.parameters() if p.requires_grad]
    steps = [e.support_batches + [e.query_batch] for e in episodes]
    folded = []
    for k in range(len(steps[0])):
        stacked = stack_batches([s[k] for s in steps])
        folded.append({name: t.reshape(-1, t.shape[-1]) for name, t in stacked.items()})

    def run():
        for batch in folded:
            grads = torch.autograd.grad(lm_loss(model, batch), params)
            with torch.no_grad():
                torch._foreach_add_(params, grads, alpha=-0.05)
    return run


def task_batching(rounds: int) -> dict:
    tokenizer = build_tokenizer()
    demo_model = build_tiny_model(tokenizer, arch="llama", **DEMO_MODEL)
    demo_model.train()
    K = 5
    demo_episodes = make_episodes(tokenizer, 4, K, batch_size=10, digits=4)  # the demo's rows: ~11 tokens
    pairs = {}
    for algorithm in ("fomaml", "reptile", "maml"):
        sequential, batched = MetaStepper(demo_model, algorithm, K), MetaStepper(demo_model, algorithm, K, tasks_per_pass=4)
        pairs[algorithm] = (lambda s=sequential: s(demo_episodes), lambda b=batched: b(demo_episodes))
    fomaml_sequential = pairs["fomaml"][0]
    pairs["bound"] = (fomaml_sequential, folded_passes(demo_model, demo_episodes))
    ratios, seconds = paired_ratios(pairs, rounds)
    out = {"batched_over_sequential_demo": ratios["fomaml"],
           "batched_over_sequential_demo_by_algorithm": {a: ratios[a] for a in ("fomaml", "reptile", "maml")},
           "batched_bound_demo": ratios["bound"],
           "batched_seconds_demo": {a: {"sequential": seconds[a]["a"], "batched": seconds[a]["b"]}
                                    for a in ("fomaml", "reptile", "maml")}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one, _ = paired_ratios({"r": pairs["fomaml"]}, rounds)
    finally:
        torch.set_num_threads(threads)
    out["batched_over_sequential_demo_one_thread"] = one["r"]

    single = make_episodes(tokenizer, 1, K, batch_size=10, digits=4)
    cfg = Config()
    cfg.meta.meta_batch_size = 1
    default, _ = resolve_tasks_per_pass(cfg)
    auto, sequential = MetaStepper(demo_model, "fomaml", K, tasks_per_pass=default), MetaStepper(demo_model, "fomaml", K)
    ratio, _ = paired_ratios({"r": (lambda: sequential(single), lambda: auto(single))}, rounds)
    out["batched_over_sequential_single"] = ratio["r"]

    _, model = build()
    by_tasks = {}
    for tasks in (4, 16):
        episodes = make_episodes(tokenizer, tasks, K)
        sequential, batched = MetaStepper(model, "fomaml", K), MetaStepper(model, "fomaml", K, tasks_per_pass=tasks)
        ratio, timed = paired_ratios({"r": (lambda: sequential(episodes), lambda: batched(episodes))},
                                     max(3, rounds // (tasks // 4)))
        by_tasks[str(tasks)] = {"ratio": ratio["r"], "sequential_s": timed["r"]["a"], "batched_s": timed["r"]["b"]}
    out["batched_over_sequential_bench"] = min(v["ratio"] for v in by_tasks.values())
    out["batched_over_sequential_bench_by_tasks"] = by_tasks
    return out


def maml_by_inner_steps(repeats: int, quick: bool) -> dict:
    """maml_over_fomaml against K, beside the matmul bound of exact second order at that K."""
    tokenizer, model = build()
    result = {}
    for k in ([1, 2] if quick else [1, 2, 3, 5, 8]):
        episodes = make_episodes(tokenizer, 2, k)  # 2 tasks: the ratio is per task, and time is short
        maml, fomaml = MetaStepper(model, "maml", k), MetaStepper(model, "fomaml", k)
        ratio, _ = paired_ratios({"r": (lambda: maml(episodes), lambda: fomaml(episodes))}, repeats)
        bound = second_order_matmul_bound(k)
        result[str(k)] = {"maml_over_fomaml": ratio["r"], "matmul_bound": bound, "over_bound": ratio["r"] / bound}
    return result


def scaling(repeats: int, quick: bool) -> dict:
    tokenizer, model = build()
    steps_grid = [1, 2, 4] if quick else [1, 2, 4, 8]
    tasks_grid = [1, 2, 4] if quick else [1, 2, 4, 8]
    result = {}
    for name, grid, make in (("num_inner_steps", steps_grid, lambda v: (make_episodes(tokenizer, 2, v), v)),
                             ("meta_batch_size", tasks_grid, lambda v: (make_episodes(tokenizer, v, 2), 2))):
        times = []
        for value in grid:
            episodes, k = make(value)
            stepper = MetaStepper(model, "fomaml", k)
            times.append(median_time(lambda: stepper(episodes), repeats))
        slope, intercept = np.polyfit(grid, times, 1)
        predicted = np.polyval([slope, intercept], grid)
        ss_res = float(((np.array(times) - predicted) ** 2).sum())
        ss_tot = float(((np.array(times) - np.mean(times)) ** 2).sum())
        result[name] = {"values": grid, "seconds": times, "seconds_per_unit": float(slope),
                        "intercept_s": float(intercept), "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}
    return result


def padding_speedup(repeats: int) -> dict:
    """SFT steps over a long-tailed length distribution: dynamic padding vs padding to max_length."""
    tokenizer, model = build()
    rng = np.random.default_rng(1)
    max_length = 512
    lengths = np.clip(rng.lognormal(mean=3.3, sigma=0.9, size=64).astype(int), 8, max_length - 8)
    rows = encode_examples([Example(prompt=" ".join(["7"] * int(n)), response=" 1 2") for n in lengths], tokenizer,
                           max_length, chat_template="none")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(_outer_config(), params)
    tokens = sum(len(r) for r in rows)

    def epoch(pad_to):
        for i in range(0, len(rows), 8):
            batch = collate(rows[i:i + 8], tokenizer.pad_token_id, pad_to_length=pad_to)
            lm_loss(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    dynamic = median_time(lambda: epoch(None), repeats)
    # No warm-up: each padded epoch takes seconds and the dynamic epochs already warmed the model up.
    padded = median_time(lambda: epoch(max_length), max(1, repeats // 2), warmup=0)
    return {"padding_speedup": padded / dynamic, "tokens_per_s_dynamic": tokens / dynamic,
            "tokens_per_s_padded": tokens / padded, "max_length": max_length,
            "length_quantiles": {q: int(np.quantile(lengths, q / 100)) for q in (50, 90, 99)}}


def generation_speedup(repeats: int) -> dict:
    tokenizer, model = build()
    model.eval()
    rng = np.random.default_rng(2)
    rows = encode_examples(cipher_rows(rng, 32), tokenizer, 256, chat_template="none")
    prompts = [_prompt_ids(r) for r in rows]
    device = torch.device("cpu")
    batched = median_time(lambda: generate(model, tokenizer, prompts, 16, 16, device), repeats)
    single = median_time(lambda: generate(model, tokenizer, prompts, 16, 1, device), max(1, repeats // 2))
    return {"generate_batched_speedup": single / batched, "rows_per_s_batched": len(prompts) / batched,
            "rows_per_s_single": len(prompts) / single, "batch_size": 16, "max_new_tokens": 16}


# ----------------------------------------------------------------------------- memory (subprocesses)

def memory_probe(kind: str) -> dict:
    """Run in a fresh process: peak memory of two steps of ``kind`` (sft | fomaml | maml | fomaml_lora |
    fomaml_batched | maml_batched)."""
    import gc

    tokenizer, model = build(lora=kind == "fomaml_lora")
    episodes = make_episodes(tokenizer, 4, 5)
    gc.collect()
    # Building the tokenizer and model has its own peak; reset the high-water mark so the peak
    # below is the steps' own (Linux: writing 5 to clear_refs resets VmHWM).
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    baseline = _proc_status_kib("VmRSS")
    if kind == "sft":
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(_outer_config(), params)
        for _ in range(2):
            for e in episodes:  # the same batches, one SFT step each
                for batch in e.support_batches + [e.query_batch]:
                    lm_loss(model, batch).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
    else:
        algorithm = kind.replace("_lora", "").replace("_batched", "")
        stepper = MetaStepper(model, algorithm, 5, tasks_per_pass=4 if kind.endswith("_batched") else 1)
        for _ in range(2):
            stepper(episodes)
    peak = _proc_status_kib("VmHWM")
    return {"peak_rss_mib": peak / 1024, "baseline_rss_mib": baseline / 1024, "delta_mib": (peak - baseline) / 1024}


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_ratios() -> dict:
    # Peak RSS does not depend on timing, so the probes run two at a time, one thread each.
    from concurrent.futures import ThreadPoolExecutor

    def probe(kind: str) -> dict:
        proc = subprocess.run([sys.executable, __file__, "--memory-probe", kind], capture_output=True, text=True,
                              check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return json.loads(proc.stdout.strip().splitlines()[-1])

    kinds = ("sft", "fomaml", "maml", "fomaml_lora", "fomaml_batched", "maml_batched")
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(kinds, pool.map(probe, kinds)))
    peak = {k: v["peak_rss_mib"] for k, v in results.items()}
    delta = {k: v["delta_mib"] for k, v in results.items()}
    return {
        "fomaml_mem_over_sft": peak["fomaml"] / peak["sft"],
        "maml_mem_over_sft": peak["maml"] / peak["sft"],
        "lora_over_full_memory": peak["fomaml_lora"] / peak["fomaml"],
        "delta_fomaml_over_sft": delta["fomaml"] / max(delta["sft"], 1e-9),
        "delta_maml_over_sft": delta["maml"] / max(delta["sft"], 1e-9),
        "batched_mem_over_sequential": peak["fomaml_batched"] / peak["fomaml"],
        "batched_mem_over_sequential_maml": peak["maml_batched"] / peak["maml"],
        "delta_batched_over_sequential": delta["fomaml_batched"] / max(delta["fomaml"], 1e-9),
        "delta_batched_over_sequential_maml": delta["maml_batched"] / max(delta["maml"], 1e-9),
        "probes": results,
        "note": "peak RSS (VmHWM, reset after building the model and batches) of a fresh process, which includes "
                "the Python/torch baseline; delta_* compare only the growth above that baseline",
    }


def target_logits_speedup(rounds: int) -> dict:
    """Full-vocabulary logits at every position against only at target positions (``logits_to_keep``,
    what ``lm_loss`` does), on rows shaped like SFT rows: mostly prompt, a short response."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from metasft.data.collate import IGNORE_INDEX
    from metasft.losses import forward_logits, token_loss_sum

    config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.train()
    input_ids = torch.randint(0, config.vocab_size, (8, 100))
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, 96:] = input_ids[:, 96:]
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "position_ids": torch.arange(100).expand(8, 100), "labels": labels}

    def kept():
        model.zero_grad(set_to_none=True)
        lm_loss(model, batch).backward()

    def full():
        model.zero_grad(set_to_none=True)
        total, count = token_loss_sum(forward_logits(model, batch), labels)
        (total / count).backward()

    ratios, seconds = paired_ratios({"target_logits": (full, kept)}, rounds)
    return {"target_logits_speedup": ratios["target_logits"], "target_logits_seconds": seconds["target_logits"]}


def machine() -> dict:
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        model_name = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        info["cpu"] = model_name[0] if model_name else None
    except OSError:
        pass
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller scaling grid (< 3 min)")
    parser.add_argument("--out", default="benchmarks/results.json", help="where to write the JSON")
    parser.add_argument("--smollm2", help="converted SmolLM2-135M-Instruct folder (default $METASFT_SMOLLM2 or "
                                          "models/smollm2-135m); its section is skipped when absent")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe)))
        return
    torch.manual_seed(0)
    repeats = 25 if args.quick else 61
    started = time.perf_counter()
    result = {"machine": machine(), "model": MODEL, "quick": args.quick}
    few = 3 if args.quick else 7
    sections = {
        "step_ratios": lambda: step_ratios(repeats),
        "memory": memory_ratios,
        "padding": lambda: padding_speedup(few),
        "generation": lambda: generation_speedup(few),
        "maml_by_k": lambda: {"maml_over_fomaml_by_inner_steps": maml_by_inner_steps(few + 2, args.quick)},
        "scaling": lambda: {"scaling": scaling(few, args.quick)},
        "task_batching": lambda: task_batching(few + 4),
        "target_logits": lambda: target_logits_speedup(few + 4),
        "scopes": lambda: scope_ratios(paired_ratios, few, args.smollm2),
    }
    result["section_seconds"] = {}
    for name, section in sections.items():
        section_start = time.perf_counter()
        result.update(section())
        result["section_seconds"][name] = round(time.perf_counter() - section_start, 1)
    result["targets"] = {
        "fomaml_over_floor <= 1.05": result["fomaml_over_floor"] <= 1.05,
        "reptile_over_floor <= 1.05": result["reptile_over_floor"] <= 1.05,
        "maml_over_fomaml <= 2.5": result["maml_over_fomaml"] <= 2.5,
        "fomaml_mem_over_sft <= 1.3": result["fomaml_mem_over_sft"] <= 1.3,
        "padding_speedup >= 2": result["padding_speedup"] >= 2,
        "generate_batched_speedup >= 5": result["generate_batched_speedup"] >= 5,
        "batched_over_sequential_demo >= 2.5": result["batched_over_sequential_demo"] >= 2.5,
        "batched_over_sequential_bench >= 1.5": result["batched_over_sequential_bench"] >= 1.5,
    }
    if "top_layers_over_all_layers" in result:
        result["targets"]["top_layers_over_all_layers >= 5"] = result["top_layers_over_all_layers"] >= 5
    result["wall_seconds"] = time.perf_counter() - started
    text = json.dumps(result, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
