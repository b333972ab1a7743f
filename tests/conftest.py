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
