"""The built-in synthetic task suite (SPEC §8): a family of substitution ciphers.

Each task is a hidden key — a permutation of ``symbols`` digits — and its examples map a string of
digits through it, written as short raw text so that tiny models can learn it::

    prompt: "map: 1 5 2 4"      response: " 3 2 4 5"

Tasks share the format and differ only in the key, so a good initialisation is one from which a
few SGD steps on a handful of examples recover a *new* key: what meta-learning optimises and
multi-task SFT (which learns the average mapping) does not. Generation is deterministic in the
seed; keys are distinct; meta-training and held-out tasks are disjoint; support and query inputs
within a task are disjoint. The output is ``metasft prepare``'s layout, so ``train`` and ``bench``
can point at it (``meta.tasks_dir``).

Held-out tasks come in two kinds: ``num_validation`` validation tasks, on which choices are made
(the benchmark's adaptation learning rate, training curves), and the test tasks that are scored.

The *pretraining family* (``generate_pretraining_suite``) is disjoint from every cipher: a few fixed,
named digit transforms (``copy: 1 5 2 4`` → `` 1 5 2 4``, ``next: …`` → each digit + 1, …). The
demo pretrains its tiny base on it, as real use starts from a pretrained LM: it teaches the format
and the position-wise copy that every cipher needs, and no key. Their permutations are never used as
cipher keys (``exclude_keys``), so held-out keys stay unseen by every stage.

    metasft demo                   # generates both as part of the demo
    python -c "from metasft.data.synthetic import generate_suite; generate_suite('data/ciphers')"
"""

from __future__ import annotations

import itertools
import os
from typing import Callable, Iterable

import numpy as np

from metasft.data.formatting import Example
from metasft.data.prepare import PreparedTask, write_prepared
from metasft.errors import ConfigError


def cipher_example(key: list[int], digits: list[int], source: str = "") -> Example:
    return Example(prompt="map: " + " ".join(map(str, digits)),
                   response=" " + " ".join(str(key[d]) for d in digits), source=source)


def generate_suite(output_dir: str | os.PathLike, num_tasks: int = 120, num_held_out: int = 20, symbols: int = 6,
                   length: int = 4, support_size: int = 100, query_size: int = 50, seed: int = 0,
                   num_validation: int = 0, exclude_keys: Iterable[tuple[int, ...]] = ()) -> dict:
    """Write the suite into ``output_dir`` (prepared layout) and return its manifest. The last
    ``num_held_out`` tasks are held out, the first ``num_validation`` of them as validation tasks."""
    if not 2 <= symbols <= 10:
        raise ConfigError(f"symbols: {symbols} must be between 2 and 10 (single digits)")
    if not 0 < num_held_out < num_tasks:
        raise ConfigError(f"num_held_out: {num_held_out} must be between 1 and num_tasks - 1 ({num_tasks - 1})")
    if not 0 <= num_validation < num_held_out:
        raise ConfigError(f"num_validation: {num_validation} must be between 0 and num_held_out - 1 ({num_held_out - 1})")
    seen = {tuple(k) for k in exclude_keys}
    n_keys = int(np.prod(range(1, symbols + 1))) - len(seen)
    if num_tasks > n_keys:
        raise ConfigError(f"num_tasks: {num_tasks} exceeds the {n_keys} distinct keys over {symbols} symbols")
    n_inputs = symbols ** length
    if support_size + query_size > n_inputs:
        raise ConfigError(f"support_size + query_size: {support_size + query_size} exceeds the {n_inputs} distinct inputs")
    rng = np.random.default_rng(seed)
    keys: list[tuple[int, ...]] = []
    while len(keys) < num_tasks:
        key = tuple(rng.permutation(symbols).tolist())
        if key not in seen:
            seen.add(key)
            keys.append(key)
    all_inputs = list(itertools.product(range(symbols), repeat=length))
    first_held_out = num_tasks - num_held_out
    tasks = []
    for index, key in enumerate(keys):
        name = f"cipher_{index:03d}"
        chosen = rng.choice(n_inputs, size=support_size + query_size, replace=False)
        examples = [cipher_example(list(key), list(all_inputs[i]), f"{name} row {j}") for j, i in enumerate(chosen)]
        tasks.append(PreparedTask(name=name, support=examples[:support_size], query=examples[support_size:],
                                  held_out=index >= first_held_out,
                                  validation=first_held_out <= index < first_held_out + num_validation,
                                  info={"key": " ".join(map(str, key))}))
    options = {"generator": "metasft.data.synthetic", "symbols": symbols, "length": length,
               "support_size": support_size, "query_size": query_size, "num_tasks": num_tasks,
               "num_held_out": num_held_out, "num_validation": num_validation, "excluded_keys": len(seen)}
    return write_prepared(output_dir, tasks, seed=seed, options=options)


# The pretraining family: fixed digit transforms over 6 symbols, each a named task.
PRETRAINING_TRANSFORMS: dict[str, Callable[[int], int]] = {
    "copy": lambda d: d,
    "next": lambda d: (d + 1) % 6,
    "prev": lambda d: (d - 1) % 6,
    "skip": lambda d: (d + 2) % 6,
    "mirror": lambda d: (-d) % 6,
}


def pretraining_keys() -> list[tuple[int, ...]]:
    """The permutations the pretraining transforms apply: excluded from the cipher keys."""
    return [tuple(f(d) for d in range(6)) for f in PRETRAINING_TRANSFORMS.values()]


def generate_pretraining_suite(output_dir: str | os.PathLike, length: int = 4, rows_per_task: int = 300,
                               seed: int = 0) -> dict:
    """Write the pretraining family (``PRETRAINING_TRANSFORMS``, prepared layout): every task is
    for training; its query rows only say how well pretraining learnt it."""
    rng = np.random.default_rng([seed, 1])
    all_inputs = list(itertools.product(range(6), repeat=length))
    tasks = []
    for name, transform in PRETRAINING_TRANSFORMS.items():
        chosen = rng.choice(len(all_inputs), size=rows_per_task, replace=False)
        examples = [Example(prompt=f"{name}: " + " ".join(map(str, all_inputs[i])),
                            response=" " + " ".join(str(transform(d)) for d in all_inputs[i]), source=f"{name} row {j}")
                    for j, i in enumerate(chosen)]
        split = rows_per_task * 4 // 5
        tasks.append(PreparedTask(name=name, support=examples[:split], query=examples[split:]))
    options = {"generator": "metasft.data.synthetic.generate_pretraining_suite", "length": length,
               "rows_per_task": rows_per_task}
    return write_prepared(output_dir, tasks, seed=seed, options=options)
