"""Shared pytest fixtures: tiny checkpoints built locally, once per test session.

There is deliberately no ``tests/__init__.py``: pytest's rootdir-relative import mode finds this
conftest for every test below ``tests/``, and test file basenames are kept unique instead.
"""

import os

# Never touch the network: with no connectivity a Hub lookup retries for ~45 s before failing.
# Set before anything imports huggingface_hub, which reads these once at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# As `metasft` sets for itself (cli.main): MKL keeps the thread count it is given, so re-runs match.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A directory holding only the tiny tokenizer (no model weights)."""
    from metasft.tiny import build_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved tiny LlamaForCausalLM + tokenizer (untied embeddings, seed 0)."""
    from metasft.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    """A saved tiny Qwen2ForCausalLM + tokenizer (untied embeddings, seed 0)."""
    from metasft.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), arch="qwen2")


@pytest.fixture(scope="session")
def tiny_llama_tied_dir(tmp_path_factory):
    """A saved tiny LlamaForCausalLM whose LM head is tied to the input embeddings."""
    from metasft.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama_tied"), arch="llama", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    """The tiny tokenizer as a user would load it (``AutoTokenizer`` from disk). Shared: don't mutate."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


# ----------------------------------------------------------------------------- task data helpers

def cipher_rows(seed: int, n: int, symbols: int = 6, length: int = 4) -> list[dict]:
    """Rows of a substitution task: prompt 'map: 1 5 2 4', response ' 3 2 4 5' under a per-seed key."""
    import random

    rng = random.Random(seed)
    key = list(range(symbols))
    rng.shuffle(key)
    rows = []
    for _ in range(n):
        xs = [rng.randrange(symbols) for _ in range(length)]
        rows.append({"prompt": "map: " + " ".join(map(str, xs)), "response": " " + " ".join(str(key[x]) for x in xs)})
    return rows


def write_task_files(root, tasks: list[tuple[list[dict], list[dict]]], held_out: int = 0) -> list[str]:
    """Write each ``(support_rows, query_rows)`` as ``root/task<i>/{support,query}.parquet`` and
    return the ``meta.tasks`` override as one YAML flow list (the last ``held_out`` tasks held out)."""
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    entries = []
    for t, (support, query) in enumerate(tasks):
        task_dir = root / f"task{t}"
        task_dir.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(support), task_dir / "support.parquet")
        pq.write_table(pa.Table.from_pylist(query), task_dir / "query.parquet")
        entries.append(f"{{name: task{t}, support_files: [{task_dir}/support.parquet], "
                       f"query_files: [{task_dir}/query.parquet], held_out: {str(t >= len(tasks) - held_out).lower()}}}")
    return ["meta.tasks=[" + ", ".join(entries) + "]"]


def write_tasks(root, n_tasks: int, n_support: int, n_query: int, held_out: int = 0) -> list[str]:
    """Write parquet support/query files for ``n_tasks`` cipher tasks; return ``meta.tasks`` overrides
    as one YAML flow list (the last ``held_out`` tasks are held out)."""
    rows = [cipher_rows(1000 + t, n_support + n_query) for t in range(n_tasks)]
    return write_task_files(root, [(r[:n_support], r[n_support:]) for r in rows], held_out)


# ----------------------------------------------------------------------------- no process left behind

@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_suite():
    """After the last test, no process started under this pytest process may still be alive
    (tests/procs.py kills whole trees on every failure path; this is the check that it did)."""
    yield
    import procs

    left = procs.descendants(os.getpid())
    for pid in left:
        procs.kill_tree(pid)
    assert not left, f"processes left behind by the test suite (now killed): {left}"
