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

    metasft demo                   # generates it as part of the demo
    python -c "from metasft.data.synthetic import generate_suite; generate_suite('data/ciphers')"
"""

from __future__ import annotations

import itertools
import os

import numpy as np

from metasft.data.formatting import Example
from metasft.data.prepare import PreparedTask, write_prepared
from metasft.errors import ConfigError


def cipher_example(key: list[int], digits: list[int], source: str = "") -> Example:
    return Example(prompt="map: " + " ".join(map(str, digits)),
                   response=" " + " ".join(str(key[d]) for d in digits), source=source)


def generate_suite(output_dir: str | os.PathLike, num_tasks: int = 120, num_held_out: int = 20, symbols: int = 6,
                   length: int = 4, support_size: int = 100, query_size: int = 50, seed: int = 0) -> dict:
    """Write the suite into ``output_dir`` (prepared layout) and return its manifest."""
    if not 2 <= symbols <= 10:
        raise ConfigError(f"symbols: {symbols} must be between 2 and 10 (single digits)")
    if not 0 < num_held_out < num_tasks:
        raise ConfigError(f"num_held_out: {num_held_out} must be between 1 and num_tasks - 1 ({num_tasks - 1})")
    n_keys = int(np.prod(range(1, symbols + 1)))
    if num_tasks > n_keys:
        raise ConfigError(f"num_tasks: {num_tasks} exceeds the {n_keys} distinct keys over {symbols} symbols")
    n_inputs = symbols ** length
    if support_size + query_size > n_inputs:
        raise ConfigError(f"support_size + query_size: {support_size + query_size} exceeds the {n_inputs} distinct inputs")
    rng = np.random.default_rng(seed)
    keys: list[tuple[int, ...]] = []
    seen = set()
    while len(keys) < num_tasks:
        key = tuple(rng.permutation(symbols).tolist())
        if key not in seen:
            seen.add(key)
            keys.append(key)
    all_inputs = list(itertools.product(range(symbols), repeat=length))
    tasks = []
    for index, key in enumerate(keys):
        name = f"cipher_{index:03d}"
        chosen = rng.choice(n_inputs, size=support_size + query_size, replace=False)
        examples = [cipher_example(list(key), list(all_inputs[i]), f"{name} row {j}") for j, i in enumerate(chosen)]
        tasks.append(PreparedTask(name=name, support=examples[:support_size], query=examples[support_size:],
                                  held_out=index >= num_tasks - num_held_out,
                                  info={"key": " ".join(map(str, key))}))
    options = {"generator": "metasft.data.synthetic", "symbols": symbols, "length": length,
               "support_size": support_size, "query_size": query_size, "num_tasks": num_tasks,
               "num_held_out": num_held_out}
    return write_prepared(output_dir, tasks, seed=seed, options=options)
