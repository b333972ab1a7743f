"""Inner scopes and the frozen-prefix cache, measured side by side (a section of ``benchmarks/run.py``).

    python benchmarks/scopes.py --smollm2 models/smollm2-135m      # this section alone, as JSON

Keys (ratios are meta-steps/s of the first over the second, i.e. time of the second over the first):

- ``top_layers_over_all_layers``: META-LoRA on SmolLM2-135M-Instruct, adapters on the top 4 of 30
  layers and the head (``model.train_top_layers=4``) with the frozen prefix cached per row, over
  META-LoRA with adapters on every layer and the head. The WordNet experiment's shapes: FOMAML, 2
  tasks per meta-step, K = 3 inner steps, 5 rows of 70 tokens with 3 target tokens each, sequential.
  The cache is warm (the run's rows recur); ``smollm2_prefix_cache_mib`` is its size for these rows.
- ``anil_over_maml`` / ``anil_over_fomaml``: the demo model (2 layers, 64 wide), 4 tasks, K = 5, 10
  rows per batch: MAML / FOMAML with ``meta.inner_scope=head`` over the same with every weight.
- ``*_peak_rss_mib``: peak RSS of two meta-steps of each in a fresh process.

The SmolLM2 part runs when the converted model is present (``--smollm2`` or ``$METASFT_SMOLLM2``,
default ``models/smollm2-135m``; ``metasft models get smollm2-135m`` makes it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from metasft.algorithms import Episode, InnerLoop, build_algorithm
from metasft.config import Config, MetaConfig, ModelConfig
from metasft.data.collate import IGNORE_INDEX
from metasft.model import load_model, trainable_named_parameters
from metasft.scope import parse_scope, restrict_trainable
from metasft.train import build_optimizer, run_meta_step

SMOLLM2_DEFAULT = "models/smollm2-135m"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def smollm2_path(given: str | None = None) -> Path | None:
    path = Path(given or os.environ.get("METASFT_SMOLLM2") or SMOLLM2_DEFAULT).expanduser()
    return path if (path / "config.json").is_file() else None


def token_episodes(vocab: int, num_tasks: int, num_inner_steps: int, rows: int, length: int, targets: int,
                   seed: int = 0) -> list[Episode]:
    """Episodes of random token rows shaped like SFT rows: ``length`` tokens, the last ``targets`` of
    them targets. The rows of a task recur across its batches, as a small support set's do."""
    gen = torch.Generator().manual_seed(seed)
    episodes = []
    for t in range(num_tasks):
        def batch():
            ids = torch.randint(10, vocab, (rows, length), generator=gen)
            labels = torch.full_like(ids, IGNORE_INDEX)
            labels[:, -targets:] = ids[:, -targets:]
            return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
                    "position_ids": torch.arange(length).expand(rows, length).clone()}
        episodes.append(Episode(f"t{t}", [batch() for _ in range(num_inner_steps)], batch()))
    return episodes


class Stepper:
    """One trainer meta-step (``run_meta_step``) of ``algorithm`` over ``model``'s meta-parameters."""

    def __init__(self, model, algorithm: str, num_inner_steps: int, inner_scope: str = "all",
                 prefix_cache: bool = False, inner_lr: float = 0.01):
        cfg = Config()
        cfg.meta.outer_lr = 1e-4
        self.algorithm = build_algorithm(MetaConfig(algorithm=algorithm))
        self.engine = InnerLoop(model, trainable_named_parameters(model), inner_lr, num_inner_steps,
                                inner_scope=parse_scope(inner_scope), prefix_cache=prefix_cache)
        self.optimizer = build_optimizer(cfg, self.engine.params)

    def __call__(self, episodes):
        run_meta_step(self.engine, self.algorithm, episodes, len(episodes), self.optimizer, clip_grad=1.0)


def smollm2_stepper(path: Path, top_layers: int | None) -> Stepper:
    model = load_model(ModelConfig(partial_pretrain=str(path), attn_implementation="sdpa", lora_rank=8,
                                   lora_alpha=16, target_modules=TARGETS))
    model.train()
    if top_layers:
        restrict_trainable(model, top_layers)
    return Stepper(model, "fomaml", 3, prefix_cache=bool(top_layers))


def smollm2_episodes(vocab: int) -> list[Episode]:
    return token_episodes(vocab, num_tasks=2, num_inner_steps=3, rows=5, length=70, targets=3)


def _demo_model():
    from metasft.tiny import build_tiny_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, arch="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                             intermediate_size=128)
    model.train()
    return tokenizer, model


def _demo_episodes(tokenizer):
    return token_episodes(len(tokenizer), num_tasks=4, num_inner_steps=5, rows=10, length=14, targets=6)


def memory_probe(kind: str, smollm2: str | None) -> dict:
    """In a fresh process: peak RSS of two meta-steps of ``kind``."""
    import gc

    if kind.startswith("smollm2"):
        path = smollm2_path(smollm2)
        stepper = smollm2_stepper(path, 4 if kind == "smollm2_top4" else None)
        episodes = smollm2_episodes(stepper.engine.model.config.vocab_size)
    else:
        algorithm, scope = kind.split("_")
        tokenizer, model = _demo_model()
        stepper = Stepper(model, algorithm, 5, inner_scope=scope, inner_lr=0.05)
        episodes = _demo_episodes(tokenizer)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:  # reset the high-water mark after loading
        handle.write("5")
    for _ in range(2):
        stepper(episodes)
    with open("/proc/self/status") as handle:
        peak = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))
    cache = stepper.engine.prefix_cache
    return {"peak_rss_mib": peak / 1024, "prefix_cache_mib": cache.bytes / 2**20 if cache else 0.0}


def _probe(kind: str, smollm2: str | None) -> dict:
    args = [sys.executable, __file__, "--memory-probe", kind] + (["--smollm2", smollm2] if smollm2 else [])
    proc = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def scope_ratios(paired_ratios, rounds: int, smollm2: str | None = None, memory: bool = True) -> dict:
    """The section's keys (see the module docstring); ``paired_ratios`` is run.py's timer."""
    result = {}
    tokenizer, _ = _demo_model()
    episodes = _demo_episodes(tokenizer)
    pairs = {}
    for algorithm in ("maml", "fomaml"):
        full = Stepper(_demo_model()[1], algorithm, 5, inner_lr=0.05)
        anil = Stepper(_demo_model()[1], algorithm, 5, inner_scope="head", inner_lr=0.05)
        pairs[f"anil_over_{algorithm}"] = (lambda s=full: s(episodes), lambda s=anil: s(episodes))
    ratios, seconds = paired_ratios(pairs, rounds)
    result.update(ratios)
    result["anil_seconds"] = seconds
    path = smollm2_path(smollm2)
    if path is None:
        result["smollm2"] = f"absent (no {smollm2 or os.environ.get('METASFT_SMOLLM2') or SMOLLM2_DEFAULT}; run " \
                            "`metasft models get smollm2-135m`)"
    else:
        torch.manual_seed(0)
        every = smollm2_stepper(path, None)
        top = smollm2_stepper(path, 4)
        big = smollm2_episodes(every.engine.model.config.vocab_size)
        top(big)  # fills the cache: in a run, every row recurs
        ratios, seconds = paired_ratios({"top_layers_over_all_layers": (lambda: every(big), lambda: top(big))},
                                        max(1, rounds // 3))
        result.update(ratios)
        result["smollm2_seconds"] = seconds["top_layers_over_all_layers"]
        result["smollm2_prefix_cache_mib"] = top.engine.prefix_cache.bytes / 2**20
        result["smollm2_prefix_cache_rows"] = len(top.engine.prefix_cache.rows)
        del every, top
    if memory:
        kinds = ["maml_all", "maml_head", "fomaml_all", "fomaml_head"] + (
            ["smollm2_all", "smollm2_top4"] if path is not None else [])
        result["scope_peak_rss_mib"] = {k: _probe(k, str(path) if path else None) for k in kinds}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smollm2", help="the converted SmolLM2-135M-Instruct folder")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.smollm2)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from run import paired_ratios

    print(json.dumps(scope_ratios(paired_ratios, args.rounds, args.smollm2), indent=2))


if __name__ == "__main__":
    main()
