"""Tokenisation: verl's inputs, correct targets (response + EOS), truncation, multi-turn."""

import pytest
import torch

from metasft.data.collate import IGNORE_INDEX, collate, num_target_tokens
from metasft.data.formatting import Example
from metasft.data.tokenize import encode_example, encode_examples
from metasft.errors import DataError
from metasft.losses import token_loss_sum


def verl_sft_reference(tokenizer, prompt, response, max_length, truncation="error"):
    """verl 0.7.0 ``SFTDataset.__getitem__`` recomputed here (without padding): tokenise the
    templated prompt and ``response + eos`` separately, concatenate, and its loss_mask."""
    prompt_text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=False)
    prompt_ids = tokenizer(prompt_text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    response_ids = tokenizer(response + tokenizer.eos_token, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    input_ids = torch.cat((prompt_ids, response_ids), dim=-1)
    if len(input_ids) > max_length:
        input_ids = input_ids[-max_length:] if truncation == "left" else input_ids[:max_length]
    loss_mask = torch.ones_like(input_ids)
    if len(prompt_ids) > 1:
        loss_mask[: min(len(prompt_ids), len(loss_mask)) - 1] = 0
    loss_mask[min(len(prompt_ids) + len(response_ids), len(loss_mask)) - 1] = 0
    return input_ids.tolist(), loss_mask.tolist(), len(prompt_ids), len(response_ids)


CASES = [("map: 1 5 2 4", " 3 2 4 5"), ("What is 2+2?", "4"), ("héllo wörld ✓", "ünïcode répønse 日本")]


@pytest.mark.parametrize("prompt,response", CASES)
def test_single_turn_inputs_match_verl_and_targets_are_response_plus_eos(tokenizer, prompt, response):
    enc = encode_example(Example(prompt=prompt, response=response), tokenizer, max_length=512)
    ref_ids, ref_loss_mask, n_prompt, n_response = verl_sft_reference(tokenizer, prompt, response, 512)
    assert enc.input_ids == ref_ids
    assert enc.target_mask == [0] * n_prompt + [1] * n_response
    assert enc.input_ids[-1] == tokenizer.eos_token_id and enc.target_mask[-1] == 1
    # verl's loss_mask marks the position *before* each trained token: ours is it shifted by one.
    assert enc.target_mask[1:] == ref_loss_mask[:-1]
    decoded = tokenizer.decode([t for t, m in zip(enc.input_ids, enc.target_mask) if m])
    assert decoded == response + tokenizer.eos_token


def test_no_chat_template_uses_raw_prompt(tokenizer):
    ex = Example(prompt="abc", response="def")
    enc = encode_example(ex, tokenizer, 64, chat_template="none")
    prompt_ids = tokenizer("abc", add_special_tokens=False)["input_ids"]
    assert enc.input_ids[: len(prompt_ids)] == prompt_ids
    assert sum(enc.target_mask) == len(enc.input_ids) - len(prompt_ids)


@pytest.mark.parametrize("mode", ["left", "right"])
def test_truncation_keeps_targets_aligned(tokenizer, mode):
    ex = Example(prompt="a long prompt " * 5, response="the answer is here")
    full = encode_example(ex, tokenizer, 512)
    cut = encode_example(ex, tokenizer, 12, truncation=mode)
    assert len(cut.input_ids) == 12
    if mode == "left":
        assert cut.input_ids == full.input_ids[-12:]
        assert cut.target_mask[1:] == full.target_mask[-11:]
    else:
        assert cut.input_ids == full.input_ids[:12]
        assert cut.target_mask == full.target_mask[:12]
    assert cut.target_mask[0] == 0  # nothing precedes the first token


def test_truncation_error_names_row(tokenizer):
    ex = Example(prompt="x " * 50, response="y", source="train.parquet row 7")
    with pytest.raises(DataError, match=r"train.parquet row 7: \d+ tokens exceed data.max_length=10"):
        encode_example(ex, tokenizer, 10)


def test_multi_turn_targets_are_assistant_turns_with_end_of_turn(tokenizer):
    ex = Example(messages=(("system", "be brief"), ("user", "hi"), ("assistant", "hello there"),
                           ("user", "bye"), ("assistant", "ok")))
    enc = encode_example(ex, tokenizer, 512)
    full_text = tokenizer.apply_chat_template(ex.messages_as_dicts(), tokenize=False)
    assert tokenizer.decode(enc.input_ids) == full_text
    trained = []
    run = []
    for token, flag in zip(enc.input_ids, enc.target_mask):
        if flag:
            run.append(token)
        elif run:
            trained.append(tokenizer.decode(run))
            run = []
    if run:
        trained.append(tokenizer.decode(run))
    assert trained == ["hello there<|im_end|>", "ok<|im_end|>"]


def test_collate_pads_dynamically_and_never_targets_padding(tokenizer):
    rows = encode_examples([Example(prompt="a", response="b"), Example(prompt="a much longer prompt", response="c d e")],
                           tokenizer, 128)
    batch = collate(rows, tokenizer.pad_token_id)
    width = max(len(r) for r in rows)
    assert batch["input_ids"].shape == (2, width)
    short = len(rows[0])
    assert batch["attention_mask"][0, short:].sum() == 0
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert batch["position_ids"][0, :short].tolist() == list(range(short))
    assert num_target_tokens(batch) == sum(r.num_targets for r in rows)


def test_token_mean_loss_is_independent_of_batch_split():
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (4, 7))
    labels[labels % 3 == 0] = IGNORE_INDEX
    total, count = token_loss_sum(logits, labels)
    # Reference: explicit log-softmax over every target position.
    logp = torch.log_softmax(logits, -1)
    ref, n = 0.0, 0
    for b in range(4):
        for t in range(1, 7):
            if labels[b, t] != IGNORE_INDEX:
                ref -= logp[b, t - 1, labels[b, t]].item()
                n += 1
    assert count.item() == n
    assert total.item() == pytest.approx(ref, rel=1e-12)
    # Two micro-batches normalised by the global count sum to the full-batch mean.
    parts = [token_loss_sum(logits[i:i + 2], labels[i:i + 2])[0] / count for i in (0, 2)]
    assert (parts[0] + parts[1]).item() == pytest.approx((total / count).item(), rel=1e-12)


def test_logits_at_target_positions_only_give_the_same_loss_and_gradient(tiny_llama_dir):
    """lm_loss computes the head only at the target tokens (the head's input gathered row by row), or
    with ``gather=False`` at the positions where any row has a target (logits_to_keep); in float64
    the loss and every gradient equal those of the full logits either way, and a model with neither
    an output head to gather for nor logits_to_keep falls back to the full logits."""
    from transformers import AutoModelForCausalLM

    from metasft.losses import accepts_logits_to_keep, lm_loss, logits_at_targets, target_positions

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).double()
    torch.manual_seed(0)
    input_ids = torch.randint(3, model.config.vocab_size, (3, 9))
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, 5:7], labels[1, 3:5], labels[2, 8] = input_ids[0, 5:7], input_ids[1, 3:5], input_ids[2, 8]
    batch = {"input_ids": input_ids, "labels": labels}
    assert target_positions(labels).tolist() == [2, 3, 4, 5, 7]
    assert target_positions(torch.stack([labels, labels])).tolist() == [2, 3, 4, 5, 7]  # stacked tasks
    assert accepts_logits_to_keep(model)

    def loss_and_grads(loss):
        grads = torch.autograd.grad(loss, [p for p in model.parameters()])
        return loss.detach(), grads

    full_logits = model(input_ids=input_ids).logits
    full, full_grads = loss_and_grads(token_loss_sum(full_logits, labels)[0] / (labels[:, 1:] != IGNORE_INDEX).sum())
    for gather in (True, False):
        kept, kept_grads = loss_and_grads(lm_loss(model, batch, gather=gather))
        assert torch.allclose(kept, full, rtol=1e-12)
        assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(kept_grads, full_grads))
    logits, targets = logits_at_targets(model, batch)
    assert logits.shape == (5, model.config.vocab_size) and targets.tolist() == labels[labels != IGNORE_INDEX].tolist()

    class NoKeep(torch.nn.Module):  # a forward without logits_to_keep: full logits
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    wrapped = NoKeep()
    assert not accepts_logits_to_keep(wrapped)
    assert torch.allclose(lm_loss(wrapped, batch).detach(), full, rtol=1e-12)

    class OwnProjection(NoKeep):  # has an output head, but computes its logits from the head's weight
        def get_output_embeddings(self):
            return self.inner.lm_head

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
            hidden = self.inner.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return type("Out", (), {"logits": hidden @ self.inner.lm_head.weight.T})

    own = OwnProjection()
    logits, targets = logits_at_targets(own, batch)  # the head never ran: the full logits, gathered after
    assert logits.shape == (5, model.config.vocab_size)
    assert torch.allclose(lm_loss(own, batch).detach(), full, rtol=1e-12)
