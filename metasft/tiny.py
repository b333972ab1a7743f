"""Tiny, fully local models and tokenizers for tests and ``metasft demo``.

Nothing here touches the network or the Hugging Face Hub: the tokenizer is a byte-level BPE trained
with the ``tokenizers`` library on a small built-in corpus, and the models are randomly initialised
``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` instances small enough to train on a laptop CPU in seconds.

The tokenizer deliberately mimics Qwen's conventions, because that is the kind of model most users
fine-tune: ChatML chat template, ``<|im_end|>`` as EOS, a separate pad token, and a BOS token that is
*defined* but never added automatically. Byte-level BPE means every unicode string encodes without
unknown tokens and decodes back exactly, so data-pipeline tests can use arbitrary text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
BOS = "<|bos|>"
# Order fixes the ids: the trainer gives special tokens ids 0..3 in this order.
SPECIAL_TOKENS = [PAD, BOS, IM_START, IM_END]

# The same ChatML template Qwen2/2.5 uses, minus the default system prompt and tool handling, so the
# rendered strings are easy to predict in tests.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

ARCHS = ("llama", "qwen2")


def default_corpus() -> list[str]:
    """A few hundred short English, number and chat-like strings (deterministic, no randomness).

    Enough for BPE to learn common English fragments and digits so that token sequences in tests
    are shorter than raw bytes; the exact content does not matter beyond that.
    """
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello, how are you today?",
        "I am fine, thank you for asking.",
        "What is the capital of France?",
        "The capital of France is Paris.",
        "Please summarize the following text.",
        "Translate this sentence into German.",
        "Write a short poem about the sea.",
        "The answer is not obvious at first.",
        "Let me think step by step.",
        "Meta-learning trains a model to learn new tasks quickly.",
        "Supervised fine-tuning adapts a pretrained language model.",
        "You are a helpful assistant.",
        "Sure! Here is what I found.",
        "Can you explain that again, please?",
        "The weather is sunny with a light breeze.",
        "She reads a book every evening before bed.",
        "They walked to the market and bought apples.",
        "Water boils at one hundred degrees Celsius.",
        "Numbers like 42, 3.14 and 1000 appear in text.",
    ]
    roles = ["system", "user", "assistant"]
    corpus: list[str] = list(sentences)
    # Chat-formatted strings so the role names and newlines merge into tokens.
    for i, text in enumerate(sentences):
        role = roles[i % len(roles)]
        corpus.append(f"{IM_START}{role}\n{text}{IM_END}\n")
    # Arithmetic question/answer pairs: lots of digits, operators and a fixed phrasing.
    for a in range(0, 20):
        for b in range(0, 20, 3):
            corpus.append(f"What is {a} + {b}? The answer is {a + b}.")
            corpus.append(f"Compute {a} * {b} = {a * b}")
    # Counting and lists.
    for n in range(1, 30):
        corpus.append(", ".join(str(k) for k in range(n, n + 5)))
        corpus.append(f"Item {n}: step {n} of the plan.")
    return corpus


def build_tokenizer(corpus: list[str] | None = None, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on ``corpus`` and wrap it as a transformers fast tokenizer.

    The result is a ``PreTrainedTokenizerFast`` (in transformers 5 that name is an alias of
    ``TokenizersBackend``) with ``<|im_end|>`` as EOS, ``<|pad|>`` as pad, ``<|bos|>`` as a BOS that
    is never inserted automatically, and a ChatML ``chat_template``. The BPE trainer breaks ties
    deterministically, so the same inputs always give the same vocabulary and merges (checked
    across processes with different hash seeds).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts: Iterable[str] = default_corpus() if corpus is None else corpus

    backend = Tokenizer(models.BPE())
    # No normalizer: byte-level BPE must round-trip every string byte for byte.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # A plain ByteLevel post-processor (no template) so nothing -- in particular no BOS -- is added.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        # Seed all 256 byte symbols so that any input (emoji, CJK, control chars) is encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        # Qwen-style: BOS exists but is never added; neither is EOS (the data pipeline appends it).
        add_bos_token=False,
        add_eos_token=False,
        # Keep decode() exact: the default cleanup would rewrite " ." to "." and the like.
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
        padding_side="right",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(
    tokenizer,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    max_position_embeddings: int = 2048,
):
    """A randomly initialised float32 ``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` for ``tokenizer``.

    Initialisation happens inside ``torch.random.fork_rng`` so it is reproducible under ``seed``
    without changing the caller's global RNG state. Dropout is zero so forward passes are
    deterministic in train mode too (meta-gradient tests compare exact numbers).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny model arch {arch!r}; expected one of {', '.join(ARCHS)}")

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0,
        dtype="float32",
    )
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**common)
        model_cls = LlamaForCausalLM
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(**common, use_sliding_window=False)
        model_cls = Qwen2ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(torch.float32).eval()


def save_tiny_model(out_dir, arch: str = "llama", **kwargs) -> Path:
    """Build a tokenizer and a tiny model and save both (safetensors) into ``out_dir``.

    ``kwargs`` go to :func:`build_tiny_model`. The directory loads back with
    ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` like any
    downloaded checkpoint, chat template, EOS and pad included.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, arch=arch, **kwargs)
    # Generation defaults that match the tokenizer (EOS = <|im_end|>), as real chat checkpoints ship.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
