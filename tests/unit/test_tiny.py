"""metasft.tiny: the local byte-level tokenizer and the tiny Llama/Qwen2 models."""

import pytest
import torch
from transformers import AutoTokenizer

from metasft.tiny import CHATML_TEMPLATE, build_tiny_model, build_tokenizer

UNICODE_TEXTS = [
    "",
    "plain ascii, with punctuation . , ! ?",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
    "héllo wörld ✓ ünïcode répønse",
    "日本語のテキスト 中文 한국어",
    "emoji 😀👍🏽 family 👨‍👩‍👧",
    "combining e\u0301 and zero\u200bwidth",
    "control \x00\x01\x7f chars",
    "math ∑∫√ 3.14159 -42 1e-9",
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_any_unicode_round_trips_without_unknowns(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    # Byte-level: no unk token exists, and every id is a real vocabulary entry.
    assert tok.unk_token is None
    assert all(0 <= i < len(tok) for i in ids)


def test_special_tokens_ids_and_no_automatic_bos(tok):
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|pad|>"
    assert tok.bos_token == "<|bos|>"
    assert len({tok.eos_token_id, tok.pad_token_id, tok.bos_token_id}) == 3
    assert tok.convert_tokens_to_ids("<|im_start|>") not in (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)
    # Qwen-like: the BOS is defined but never inserted, with or without add_special_tokens.
    with_special = tok("x")["input_ids"]
    without_special = tok("x", add_special_tokens=False)["input_ids"]
    assert with_special == without_special
    assert tok.bos_token_id not in with_special
    assert tok.eos_token_id not in with_special
    # Special tokens written in text are recognised as single tokens.
    assert tok("<|im_start|>user<|im_end|>", add_special_tokens=False)["input_ids"][0] == tok.convert_tokens_to_ids(
        "<|im_start|>"
    )
    assert tok("hi<|im_end|>", add_special_tokens=False)["input_ids"][-1] == tok.eos_token_id
    assert tok.model_max_length >= 4096


def test_chat_template_renders_chatml_exactly(tok):
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert tok.chat_template == CHATML_TEMPLATE
    assert (
        tok.apply_chat_template(messages, tokenize=False)
        == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    )
    assert (
        tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tokenizer_is_deterministic_and_respects_vocab_size():
    a, b = build_tokenizer(), build_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) <= 512
    small = build_tokenizer(["abc abd abe"] * 3, vocab_size=300)
    assert len(small) <= 300
    assert small.decode(small("zzz ✓", add_special_tokens=False)["input_ids"]) == "zzz ✓"


def test_saved_tokenizer_loads_back_with_template_eos_pad(tokenizer_dir, tok):
    loaded = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert loaded.chat_template == tok.chat_template
    assert (loaded.eos_token, loaded.pad_token, loaded.bos_token) == (tok.eos_token, tok.pad_token, tok.bos_token)
    assert loaded.get_vocab() == tok.get_vocab()
    text = "héllo 😀 <|im_end|>"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]


@pytest.mark.parametrize("arch,cls_name", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_tiny_model_matches_tokenizer_and_is_seeded(tok, arch, cls_name):
    rng_before = torch.get_rng_state()
    model = build_tiny_model(tok, arch=arch, seed=3)
    # Building a model must not consume the caller's global RNG stream.
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert type(model).__name__ == cls_name
    assert model.dtype == torch.float32
    cfg = model.config
    assert cfg.vocab_size == len(tok)
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id) == (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)
    assert cfg.attention_dropout == 0.0
    same = build_tiny_model(tok, arch=arch, seed=3)
    other = build_tiny_model(tok, arch=arch, seed=4)
    w = model.model.embed_tokens.weight
    assert torch.equal(w, same.model.embed_tokens.weight)
    assert not torch.equal(w, other.model.embed_tokens.weight)


def test_tiny_model_tied_embeddings(tok):
    model = build_tiny_model(tok, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_unknown_arch_is_named(tok):
    with pytest.raises(ValueError, match="mistral"):
        build_tiny_model(tok, arch="mistral")
