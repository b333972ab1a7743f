"""``metasft suites build NAME --out DIR [--seed N]``: ready-made few-shot task suites in the
prepared layout (manifest + per-task support/query parquet), deterministic for a seed.

- ``cipher``: the demo's substitution ciphers over 6 digits (200 training, 10 validation and 20
  held-out keys; the demo's pretraining transforms excluded), raw text.
- ``countries``: real facts about ~250 countries from the ``countryinfo`` package (MIT): one task per
  field × answer style. *Fields* are split between meta-training, validation and held-out pools, so
  a held-out task asks for a kind of fact never trained on. Prompt/response rows, which
  ``data.chat_template: auto`` renders through the model's chat template.

A missing data source ends with exit 2 and the install command.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np

from metasft.data.formatting import Example
from metasft.data.prepare import PreparedTask, write_prepared
from metasft.errors import MetasftError

SUITES = ("cipher", "countries")

# field -> (how to read it from a countryinfo record, question, sentence answer)
COUNTRY_FIELDS = {
    "capital": (lambda r: r.get("capital"), "What is the capital of {c}?", "The capital of {c} is {a}."),
    "region": (lambda r: r.get("region"), "Which region of the world is {c} in?", "{c} is in {a}."),
    "subregion": (lambda r: r.get("subregion"), "Which subregion of the world is {c} in?", "{c} is in {a}."),
    "demonym": (lambda r: r.get("demonym"), "What are people from {c} called?", "People from {c} are called {a}."),
    "currency": (lambda r: (r.get("currencies") or [None])[0], "What is the currency code of {c}?",
                 "The currency code of {c} is {a}."),
    "calling_code": (lambda r: (r.get("callingCodes") or [None])[0], "What is the international calling code of {c}?",
                     "The calling code of {c} is +{a}."),
    "tld": (lambda r: (r.get("tld") or [None])[0], "What is the internet domain of {c}?",
            "The internet domain of {c} is {a}."),
    "iso_code": (lambda r: (r.get("ISO") or {}).get("alpha3"), "What is the three-letter ISO code of {c}?",
                 "The ISO code of {c} is {a}."),
}
STYLES = ("short", "sentence")


def build_suite(name: str, out: str | os.PathLike, seed: int = 0) -> dict:
    """Write suite ``name`` into ``out``; returns its manifest."""
    if name == "cipher":
        from metasft.data.synthetic import generate_suite, pretraining_keys

        return generate_suite(out, num_tasks=230, num_held_out=30, num_validation=10, seed=seed,
                              exclude_keys=pretraining_keys())
    if name == "countries":
        return build_countries(out, seed)
    raise MetasftError(f"suites build: unknown suite {name!r} (known: {', '.join(SUITES)})")


def country_records() -> list[dict]:
    """Every country record shipped with ``countryinfo`` (read as JSON from the package's data)."""
    spec = importlib.util.find_spec("countryinfo")
    if spec is None or not spec.submodule_search_locations:
        raise MetasftError("suites build countries: the countryinfo package is not installed; install it with: "
                           "pip install countryinfo")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    files = sorted(folder.glob("*.json"))
    if not files:
        raise MetasftError(f"suites build countries: no country data in {folder}; reinstall it with: "
                           "pip install --force-reinstall countryinfo")
    return [json.loads(f.read_text(encoding="utf-8")) for f in files]


def build_countries(out: str | os.PathLike, seed: int = 0, support_size: int = 100, query_size: int = 50,
                    num_validation_fields: int = 1, num_test_fields: int = 2) -> dict:
    records = country_records()
    rng = np.random.default_rng([seed, 7])
    fields = list(COUNTRY_FIELDS)
    order = [fields[i] for i in rng.permutation(len(fields))]
    test_fields = set(order[:num_test_fields])
    validation_fields = set(order[num_test_fields:num_test_fields + num_validation_fields])
    tasks = []
    for field in fields:
        read, question, sentence = COUNTRY_FIELDS[field]
        facts = [(r["name"], str(read(r))) for r in records if r.get("name") and read(r) not in (None, "")]
        for style in STYLES:
            task = f"country_{field}_{style}"
            chosen = rng.permutation(len(facts))[:support_size + query_size]
            examples = [Example(prompt=question.format(c=facts[i][0]),
                                response=facts[i][1] if style == "short" else sentence.format(c=facts[i][0], a=facts[i][1]),
                                source=f"countryinfo {facts[i][0]}") for i in chosen]
            split = min(support_size, len(examples) * 2 // 3)
            tasks.append(PreparedTask(name=task, support=examples[:split], query=examples[split:],
                                      held_out=field in test_fields or field in validation_fields,
                                      validation=field in validation_fields,
                                      info={"field": field, "style": style}))
    options = {"generator": "metasft.data.suites.build_countries", "source": "countryinfo",
               "test_fields": sorted(test_fields), "validation_fields": sorted(validation_fields),
               "support_size": support_size, "query_size": query_size}
    return write_prepared(out, tasks, seed=seed, options=options)
