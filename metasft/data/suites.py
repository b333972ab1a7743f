"""``metasft suites build NAME --out DIR [--seed N]``: ready-made few-shot task suites in the
prepared layout (manifest + per-task support/query parquet), deterministic for a seed.

- ``cipher``: the demo's substitution ciphers over 6 digits (200 training, 10 validation and 20
  held-out keys; the demo's pretraining transforms excluded), raw text.
- ``wordnet``: N-way classification of WordNet 3.0 words (Debian ``wordnet-base``) by their
  lexicographer category (``noun.animal``, ``verb.motion``, ...): each task picks N categories and
  gives them N arbitrary label words, so the mapping must be learnt from the task's own examples.
  *Categories* are split between meta-training, validation and held-out pools.
- ``wordnet_cloze``: SMLMT-style cloze tasks (Bansal et al. 2020) from WordNet's glosses and usage
  examples: each task picks N words, blanks each out of real sentences that use it, and gives the N
  words arbitrary labels; the answer is the label of the blanked word. *Words* are split between
  meta-training, validation and held-out pools; 1,000 meta-training tasks by default.
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
import re
from pathlib import Path

import numpy as np

from metasft.data.formatting import Example
from metasft.data.prepare import PreparedTask, write_prepared
from metasft.errors import MetasftError

SUITES = ("cipher", "wordnet", "wordnet_cloze", "countries")

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


# Suites whose held-out tasks are drawn last from their own pools, so their count can grow alone.
N_WAY_SUITES = ("wordnet", "wordnet_cloze")


def build_suite(name: str, out: str | os.PathLike, seed: int = 0, held_out_tasks: int | None = None) -> dict:
    """Write suite ``name`` into ``out``; returns its manifest.

    ``held_out_tasks`` (N-way suites only; default 10) sets how many held-out tasks are drawn. They are
    drawn after every meta-training and validation task from the same generator, so a suite with more
    of them keeps the other tasks and its first held-out tasks byte for byte: only the evaluation grows,
    and its intervals over tasks narrow."""
    if held_out_tasks is not None:
        if name not in N_WAY_SUITES:
            raise MetasftError(f"suites build {name}: --held-out-tasks applies to {' and '.join(N_WAY_SUITES)} only")
        if held_out_tasks < 1:
            raise MetasftError(f"suites build {name}: --held-out-tasks {held_out_tasks} must be >= 1")
    sizes = {} if held_out_tasks is None else {"num_test_tasks": held_out_tasks}
    if name == "cipher":
        from metasft.data.synthetic import generate_suite, pretraining_keys

        return generate_suite(out, num_tasks=230, num_held_out=30, num_validation=10, seed=seed,
                              exclude_keys=pretraining_keys())
    if name == "countries":
        return build_countries(out, seed)
    if name == "wordnet":
        return build_wordnet(out, seed, **sizes)
    if name == "wordnet_cloze":
        return build_wordnet_cloze(out, seed, **sizes)
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


# The 45 lexicographer files of WordNet 3.0, by number (lexnames(5WN)); a synset's line names its file
# by this number.
WORDNET_CATEGORIES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)
# Arbitrary answers, one token each in common tokenizers and unrelated to the categories; every task
# draws its own N of them and its own assignment to categories.
WORDNET_LABELS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white",
                  "gray", "gold")
WORDNET_DIR_ENV = "WNSEARCHDIR"  # WordNet's own variable for where its database lies
WORDNET_INSTALL = "apt-get install wordnet-base (Debian/Ubuntu), or set WNSEARCHDIR to a WordNet 3.0 dict folder"


def wordnet_synsets(folder: str | os.PathLike | None = None) -> dict[str, list[tuple[str, str]]]:
    """Category -> [(word, definition)] for every synset of WordNet's four ``data.*`` files: the
    synset's first word (underscores as spaces) and its gloss up to the first ``;`` (the definition,
    without usage examples)."""
    folder = Path(folder or os.environ.get(WORDNET_DIR_ENV) or "/usr/share/wordnet")
    files = [folder / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise MetasftError(f"suites build wordnet: no WordNet database at {missing[0]}; install it with: {WORDNET_INSTALL}")
    by_category: dict[str, list[tuple[str, str]]] = {name: [] for name in WORDNET_CATEGORIES}
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if line.startswith("  "):  # the licence header
                    continue
                fields, _, gloss = line.partition(" | ")
                parts = fields.split()
                try:
                    category = WORDNET_CATEGORIES[int(parts[1])]
                    word = parts[4]
                except (IndexError, ValueError):
                    raise MetasftError(f"suites build wordnet: {path} line {number} is not a WordNet data line") from None
                definition = gloss.split(";")[0].strip()
                if definition:
                    by_category[category].append((re.sub(r"\(.*\)$", "", word).replace("_", " "), definition))
    return by_category


def _split_pools(items: list[str], rng, num_test: int, num_validation: int, ways: int, suite: str,
                 what: str) -> dict[str, list[str]]:
    """Held-out, validation and meta-training pools of ``items`` (categories, words): disjoint, by seed."""
    order = [items[i] for i in rng.permutation(len(items))]
    pools = {"test": order[:num_test], "validation": order[num_test:num_test + num_validation],
             "train": order[num_test + num_validation:]}
    if min(len(p) for p in pools.values()) < ways:
        raise MetasftError(f"suites build {suite}: {len(items)} usable {what} cannot fill three pools of {ways}-way tasks")
    return pools


def _n_way_tasks(prefix: str, pools: dict[str, list[str]], counts: tuple[int, int, int], rng, label_words, ways: int,
                 support_per_class: int, examples, info_key: str, width: int = 3) -> list[PreparedTask]:
    """N-way tasks whose classes come from each split's pool and whose answers are label words drawn
    anew per task; ``examples(class, label, options)`` gives a class's support + query examples."""
    tasks = []
    # Held-out tasks are drawn last: their count changes no other task (build_suite's held_out_tasks).
    for split, count in zip(("train", "validation", "test"), counts):
        pool = pools[split]
        for index in range(count):
            classes = [pool[i] for i in rng.choice(len(pool), ways, replace=False)]
            labels = [label_words[i] for i in rng.choice(len(label_words), ways, replace=False)]
            options = ", ".join(sorted(labels))
            support, query = [], []
            for cls, label in zip(classes, labels):
                for rank, example in enumerate(examples(cls, label, options)):
                    (support if rank < support_per_class else query).append(example)
            support = [support[i] for i in rng.permutation(len(support))]
            query = [query[i] for i in rng.permutation(len(query))]
            tasks.append(PreparedTask(name=f"{prefix}_{split}_{index:0{width}d}", support=support, query=query,
                                      held_out=split != "train", validation=split == "validation",
                                      info={info_key: classes, "labels": labels, "ways": ways}))
    return tasks


def build_wordnet(out: str | os.PathLike, seed: int = 0, ways: int = 5, support_per_class: int = 10,
                  query_per_class: int = 5, num_train_tasks: int = 100, num_validation_tasks: int = 5,
                  num_test_tasks: int = 10, num_validation_categories: int = 6, num_test_categories: int = 10,
                  max_definition_words: int = 16, folder: str | os.PathLike | None = None) -> dict:
    synsets = wordnet_synsets(folder)
    rng = np.random.default_rng([seed, 11])
    per_class = support_per_class + query_per_class
    usable = [c for c in WORDNET_CATEGORIES if len(synsets[c]) >= 4 * per_class]
    pools = _split_pools(usable, rng, num_test_categories, num_validation_categories, ways, "wordnet", "categories")

    def examples(category: str, label: str, options: str) -> list[Example]:
        members = synsets[category]
        rows = []
        for i in rng.choice(len(members), per_class, replace=False):
            word, definition = members[i]
            words = definition.split()
            definition = " ".join(words[:max_definition_words]) + (" ..." if len(words) > max_definition_words else "")
            rows.append(Example(prompt=f"Labels: {options}.\nWord: {word}\nMeaning: {definition}\nWhich label?",
                                response=label, source=f"wordnet {category} {word}"))
        return rows

    tasks = _n_way_tasks("wordnet", pools, (num_train_tasks, num_validation_tasks, num_test_tasks), rng, WORDNET_LABELS,
                         ways, support_per_class, examples, "categories")
    options = {"generator": "metasft.data.suites.build_wordnet", "source": "WordNet 3.0", "ways": ways,
               "support_per_class": support_per_class, "query_per_class": query_per_class,
               "category_pools": pools}
    return write_prepared(out, tasks, seed=seed, options=options)


# Answers of the cloze suite: plain nouns, unrelated to the blanked words, none of them a colour (the
# ``wordnet`` suite's labels), so a model meta-trained on one family meets new answer words on the other.
CLOZE_LABELS = ("apple", "river", "stone", "cloud", "tiger", "piano", "ocean", "candle", "forest", "silver",
                "garden", "window", "rocket", "violin", "desert", "island")
# Words too common to be a task's hidden word.
CLOZE_STOPWORDS = frozenset("""about above after again against also another because been before being below between
both could does doing down during each especially etc even every from further have having here into itself just
made make many more most much must only other over same should some something such than that their them then there
these they this those through under until upon used using very what when where which while with within without
would your usually often especially part form kind type sort something someone person persons thing things state
quality having being one's someone's""".split())


def wordnet_sentences(folder: str | os.PathLike | None = None) -> list[str]:
    """Every definition and quoted usage example of WordNet's four ``data.*`` files, one string each."""
    folder = Path(folder or os.environ.get(WORDNET_DIR_ENV) or "/usr/share/wordnet")
    files = [folder / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise MetasftError(f"suites build wordnet_cloze: no WordNet database at {missing[0]}; install it with: "
                           f"{WORDNET_INSTALL}")
    sentences = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):
                    continue
                _, _, gloss = line.partition(" | ")
                for piece in gloss.strip().split(";"):
                    piece = piece.strip().strip('"').strip()
                    if len(piece.split()) >= 5:
                        sentences.append(piece)
    return sentences


def build_wordnet_cloze(out: str | os.PathLike, seed: int = 0, ways: int = 5, support_per_class: int = 10,
                        query_per_class: int = 5, num_train_tasks: int = 1000, num_validation_tasks: int = 5,
                        num_test_tasks: int = 10, num_validation_words: int = 60, num_test_words: int = 120,
                        max_sentence_words: int = 24, folder: str | os.PathLike | None = None) -> dict:
    sentences = sorted(set(wordnet_sentences(folder)))
    per_class = support_per_class + query_per_class
    uses: dict[str, list[int]] = {}
    for index, sentence in enumerate(sentences):
        for word in set(re.findall(r"[a-z]+", sentence.lower())):
            if len(word) >= 4 and word not in CLOZE_STOPWORDS:
                uses.setdefault(word, []).append(index)
    words = sorted(w for w, idx in uses.items() if len(idx) >= per_class)
    rng = np.random.default_rng([seed, 13])
    pools = _split_pools(words, rng, num_test_words, num_validation_words, ways, "wordnet_cloze", "words")

    def examples(word: str, label: str, options: str) -> list[Example]:
        blank = re.compile(rf"\b{word}\b", re.IGNORECASE)
        rows = []
        for i in rng.choice(len(uses[word]), per_class, replace=False):
            text = blank.sub("____", sentences[uses[word][i]])
            tokens = text.split()
            if len(tokens) > max_sentence_words:  # keep a window around the first blank
                at = next(k for k, t in enumerate(tokens) if "____" in t)
                start = max(0, min(at - max_sentence_words // 2, len(tokens) - max_sentence_words))
                text = " ".join(tokens[start:start + max_sentence_words])
            rows.append(Example(prompt=f"Labels: {options}.\nSentence: {text}\nWhich label?", response=label,
                                source=f"wordnet_cloze {word}"))
        return rows

    tasks = _n_way_tasks("cloze", pools, (num_train_tasks, num_validation_tasks, num_test_tasks), rng, CLOZE_LABELS,
                         ways, support_per_class, examples, "words", width=4)
    options = {"generator": "metasft.data.suites.build_wordnet_cloze", "source": "WordNet 3.0 glosses", "ways": ways,
               "support_per_class": support_per_class, "query_per_class": query_per_class, "word_pools": pools}
    return write_prepared(out, tasks, seed=seed, options=options)
