"""metasft.model: loading tokenizer/model like a real checkpoint, LoRA, and the θ parameter list."""

from types import SimpleNamespace

import pytest
import torch

from metasft.errors import MetasftError
from metasft.model import (
    count_parameters,
    is_peft_model,
    load_model,
    load_tokenizer,
    quiet_peft,
    trainable_named_parameters,
)
from metasft.tiny import build_tiny_model, build_tokenizer

# A fixed input that includes special tokens and multi-byte text.
FIXED_TEXT = "<|im_start|>user\nWhat is 2+2? ✓<|im_end|>\n<|im_start|>assistant\n4<|im_end|>"


def make_cfg(path, **overrides):
    """A stand-in for the ``model`` config section (the real one is a dataclass)."""
    cfg = dict(
        partial_pretrain=str(path),
        tokenizer_path=None,
        trust_remote_code=False,
        attn_implementation=None,
        lora_rank=0,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules="all-linear",
        enable_gradient_checkpointing=False,
        lora_full_head=False,
    )
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def logits_of(model, tokenizer):
    ids = tokenizer(FIXED_TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_load_tokenizer_keeps_template_eos_pad(tiny_llama_dir):
    tok = load_tokenizer(make_cfg(tiny_llama_dir))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_load_tokenizer_from_separate_path_and_pad_fallback(tmp_path, tiny_llama_dir):
    tok = build_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    loaded = load_tokenizer(make_cfg(tiny_llama_dir, tokenizer_path=str(tmp_path / "nopad")))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"


@pytest.mark.parametrize("fixture,cls_name", [("tiny_llama_dir", "LlamaForCausalLM"), ("tiny_qwen2_dir", "Qwen2ForCausalLM")])
def test_load_model_reproduces_saved_logits(request, fixture, cls_name):
    path = request.getfixturevalue(fixture)
    model = load_model(make_cfg(path))
    assert type(model).__name__ == cls_name
    assert model.dtype == torch.float32
    assert not is_peft_model(model)
    # The saved model is exactly what build_tiny_model gives for the same seed, so rebuild it.
    tok = build_tokenizer()
    reference = build_tiny_model(tok, arch=model.config.model_type)
    torch.testing.assert_close(logits_of(model, tok), logits_of(reference, tok), rtol=0, atol=0)
    total, trainable = count_parameters(model)
    assert total == trainable == sum(p.numel() for p in reference.parameters())
    assert len(trainable_named_parameters(model)) == len(list(reference.parameters()))


def test_load_model_dtype(tiny_llama_dir):
    model = load_model(make_cfg(tiny_llama_dir), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_tied_embeddings_stay_tied_and_count_once(tiny_llama_tied_dir):
    model = load_model(make_cfg(tiny_llama_tied_dir))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    named = trainable_named_parameters(model)
    assert len({id(p) for _, p in named}) == len(named)
    assert sum(1 for _, p in named if p is model.lm_head.weight) == 1
    total, trainable = count_parameters(model)
    assert total == trainable == sum(p.numel() for p in model.parameters())  # parameters() dedups too
    # Exactly one vocab x hidden matrix fewer than the same model with an untied head.
    cfg = model.config
    untied = build_tiny_model(build_tokenizer(), tie_word_embeddings=False)
    assert count_parameters(untied)[0] - total == cfg.vocab_size * cfg.hidden_size


def test_lora_only_adapters_trainable(tiny_llama_dir):
    rank = 4
    model = load_model(make_cfg(tiny_llama_dir, lora_rank=rank, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert is_peft_model(model)
    named = trainable_named_parameters(model)
    assert named and all("lora_" in name for name, _ in named)
    # Every base weight is frozen.
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    cfg = model.config
    hidden = cfg.hidden_size
    q_out = cfg.num_attention_heads * (hidden // cfg.num_attention_heads)
    v_out = cfg.num_key_value_heads * (hidden // cfg.num_attention_heads)
    per_layer = rank * hidden + q_out * rank + rank * hidden + v_out * rank  # A (r x in) + B (out x r)
    total, trainable = count_parameters(model)
    assert trainable == cfg.num_hidden_layers * per_layer == sum(p.numel() for _, p in named)
    assert total == trainable + sum(p.numel() for p in load_model(make_cfg(tiny_llama_dir)).parameters())
    # LoRA B starts at zero, so the adapted model computes the same function as the base.
    tok = build_tokenizer()
    base = load_model(make_cfg(tiny_llama_dir))
    torch.testing.assert_close(logits_of(model, tok), logits_of(base, tok))


def test_a_full_head_adapter_steps_like_an_untied_full_head(tiny_llama_tied_dir):
    """lora_full_head: rank = hidden, A = I, scale 1, so one SGD step on lora_B from zero moves the logits
    exactly as a step on a full, untied head weight would. Reference: the closed-form cross-entropy
    gradient of h @ W.T in float64, with h the base model's final features."""
    model = load_model(make_cfg(tiny_llama_tied_dir, lora_rank=2, lora_full_head=True,
                                target_modules=["q_proj", "lm_head"]))
    tok = build_tokenizer()
    ids = tok(FIXED_TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    head = model.get_output_embeddings()
    hidden = model.config.hidden_size
    assert head.lora_A["default"].weight.shape == (hidden, hidden) and head.scaling["default"] == 1.0
    assert model.get_input_embeddings().weight is head.base_layer.weight  # the embeddings stay tied
    with torch.no_grad(), model.disable_adapter():
        out = model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(logits_of(model, tok), out.logits)  # B = 0: the base's function
    h = out.hidden_states[-1][0, :-1].double()
    targets = ids[0, 1:]
    weight = head.base_layer.weight.detach().double()
    lr = 0.5
    probs = torch.softmax(h @ weight.T, dim=-1)
    grad = (probs - torch.nn.functional.one_hot(targets, weight.shape[0]).double()).T @ h / len(targets)
    expected = out.hidden_states[-1][0].double() @ (weight - lr * grad).T

    logits = model(input_ids=ids).logits[0, :-1]
    torch.nn.functional.cross_entropy(logits, targets).backward()
    with torch.no_grad():
        b = head.lora_B["default"].weight
        b -= lr * b.grad
    torch.testing.assert_close(logits_of(model, tok)[0].double(), expected, atol=1e-5, rtol=1e-5)


def test_lora_all_linear_skips_lm_head(tiny_qwen2_dir):
    model = load_model(make_cfg(tiny_qwen2_dir, lora_rank=2, target_modules="all-linear"))
    names = [n for n, _ in trainable_named_parameters(model)]
    assert any("mlp.down_proj.lora_A" in n for n in names)
    assert any("self_attn.o_proj.lora_B" in n for n in names)
    assert not any("lm_head" in n for n in names)


def test_unknown_lora_target_names_the_key(tiny_llama_dir):
    with pytest.raises(MetasftError, match="model.target_modules"):
        load_model(make_cfg(tiny_llama_dir, lora_rank=2, target_modules=["no_such_proj"]))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attn_implementation_is_honoured(tiny_llama_dir, impl):
    model = load_model(make_cfg(tiny_llama_dir, attn_implementation=impl))
    assert model.config._attn_implementation == impl


def test_bad_attn_implementation_names_the_key(tiny_llama_dir):
    with pytest.raises(MetasftError, match="model.attn_implementation"):
        load_model(make_cfg(tiny_llama_dir, attn_implementation="no_such_kernel"))


def test_gradient_checkpointing_enabled_under_lora(tiny_llama_dir):
    model = load_model(make_cfg(tiny_llama_dir, enable_gradient_checkpointing=True, lora_rank=2))
    base = model.get_base_model()
    flag = getattr(base, "is_activation_checkpointing", None)
    assert flag if flag is not None else base.is_gradient_checkpointing
    # Gradients still reach the adapters through the recomputed blocks.
    model.train()
    ids = build_tokenizer()(FIXED_TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for _, p in trainable_named_parameters(model))


@pytest.mark.parametrize("loader", [load_model, load_tokenizer])
def test_missing_local_path_is_one_line_error(tmp_path, loader):
    missing = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(MetasftError) as info:
        loader(make_cfg(missing))
    message = str(info.value)
    assert message.startswith("model.partial_pretrain: ")
    assert missing in message
    assert "\n" not in message


@pytest.mark.parametrize("loader", [load_model, load_tokenizer])
def test_directory_that_is_not_a_checkpoint(tmp_path, loader):
    with pytest.raises(MetasftError, match=r"^model\.partial_pretrain: cannot load") as info:
        loader(make_cfg(tmp_path))
    assert "\n" not in str(info.value)


def test_missing_tokenizer_path_names_its_key(tiny_llama_dir):
    with pytest.raises(MetasftError, match=r"^model\.tokenizer_path: .*'\./nowhere'"):
        load_tokenizer(make_cfg(tiny_llama_dir, tokenizer_path="./nowhere"))


def test_hub_id_failure_is_one_line_error():
    # conftest sets HF_HUB_OFFLINE, so this fails fast instead of retrying the network.
    with pytest.raises(MetasftError, match=r"^model\.partial_pretrain: cannot load model from 'no-org/no-model'") as info:
        load_model(make_cfg("no-org/no-model"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "path,local",
    [("/abs/dir", True), ("./rel", True), ("../up", True), ("~/models/x", True), ("a/b/c", True),
     ("Qwen/Qwen2.5-0.5B", False), ("gpt2", False), ("runs/ckpt", True)],
)
def test_local_path_detection(tmp_path, monkeypatch, path, local):
    from metasft.model import _looks_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # "runs/ckpt" is local because its first component exists here
    assert _looks_local(path) is local


def test_a_head_adapter_over_tied_embeddings_builds_saves_and_loads_without_peft_warnings(tmp_path,
                                                                                      tiny_llama_tied_dir):
    """peft warns that a tied head is adapted without tying the adapter, and that the tied matrix is
    saved with it: both are what metasft means to do (the embeddings, and so the frozen layers, stay
    the base's), so the user sees neither; the adapter still reloads as the same function."""
    import warnings

    from metasft.checkpoint import load_pretrained

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(make_cfg(tiny_llama_tied_dir, lora_rank=2, lora_full_head=True,
                                    target_modules=["lm_head"]))
        with quiet_peft():
            model.save_pretrained(tmp_path / "adapter")
        tok = build_tokenizer()
        tok.save_pretrained(tmp_path / "adapter")
        loaded, _, _ = load_pretrained(tmp_path / "adapter")
    peft_warnings = [str(w.message) for w in caught if "peft" in w.filename]
    assert not peft_warnings, peft_warnings
    torch.testing.assert_close(logits_of(loaded, tok), logits_of(model, tok))
