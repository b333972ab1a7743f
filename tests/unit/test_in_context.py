"""In-context rows (issue 15): the rendered prompt is exactly the spec's (golden, on the tiny
tokenizer, raw and chat), the targets are the query's response only, and when the demonstrations do
not fit, the farthest are dropped and the query stays whole."""

import pytest

from metasft.data.formatting import Example
from metasft.data.in_context import render_in_context
from metasft.data.tokenize import encode_example

DEMOS = [Example(prompt="map: 1 2", response=" 3 4"), Example(prompt="map: 5 6", response=" 1 2"),
         Example(prompt="map: 2 2", response=" 4 4")]
QUERY = Example(prompt="map: 6 5", response=" 2 1")


def targets(tokenizer, row) -> str:
    return tokenizer.decode([t for t, m in zip(row.input_ids, row.target_mask) if m])


def test_raw_rows_are_each_demonstration_then_the_query_token_by_token(tokenizer):
    row, used = render_in_context(DEMOS, QUERY, tokenizer, max_length=256, chat_template="none")
    eos = tokenizer.eos_token
    assert used == 3
    assert tokenizer.decode(row.input_ids) == f"map: 1 2 3 4{eos}map: 5 6 1 2{eos}map: 2 2 4 4{eos}map: 6 5 2 1{eos}"
    pieces = [encode_example(e, tokenizer, 256, chat_template="none").input_ids for e in DEMOS + [QUERY]]
    assert row.input_ids == [t for p in pieces for t in p]
    assert targets(tokenizer, row) == f" 2 1{eos}"  # the query's response and EOS, nothing else
    alone = encode_example(QUERY, tokenizer, 256, chat_template="none")
    assert row.target_mask[-len(alone):] == alone.target_mask


def test_chat_rows_put_demonstrations_as_earlier_turns(tokenizer):
    row, used = render_in_context(DEMOS[:2], QUERY, tokenizer, max_length=256)
    assert used == 2
    expected = ("<|im_start|>user\nmap: 1 2<|im_end|>\n<|im_start|>assistant\n 3 4<|im_end|>\n"
                "<|im_start|>user\nmap: 5 6<|im_end|>\n<|im_start|>assistant\n 1 2<|im_end|>\n"
                "<|im_start|>user\nmap: 6 5<|im_end|>\n<|im_start|>assistant\n 2 1<|im_end|>\n")
    assert tokenizer.decode(row.input_ids) == expected
    messages = [{"role": r, "content": c} for e in DEMOS[:2] + [QUERY]
                for r, c in (("user", e.prompt), ("assistant", e.response))]
    assert tokenizer.decode(row.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert targets(tokenizer, row) == " 2 1<|im_end|>"
    trained_all, _ = render_in_context(DEMOS[:2], QUERY, tokenizer, max_length=256, loss_on_demos=True)
    assert trained_all.input_ids == row.input_ids
    assert targets(tokenizer, trained_all) == " 3 4<|im_end|> 1 2<|im_end|> 2 1<|im_end|>"


@pytest.mark.parametrize("chat_template", ["none", "auto"])
def test_demonstrations_that_do_not_fit_are_dropped_farthest_first_and_the_query_stays_whole(tokenizer, chat_template):
    full, _ = render_in_context(DEMOS, QUERY, tokenizer, max_length=512, chat_template=chat_template)
    two, used_two = render_in_context(DEMOS[1:], QUERY, tokenizer, max_length=512, chat_template=chat_template)
    assert used_two == 2
    limit = len(two.input_ids)  # room for the two nearest demonstrations, not the third
    row, used = render_in_context(DEMOS, QUERY, tokenizer, max_length=limit, chat_template=chat_template)
    assert used == 2 and row.input_ids == two.input_ids and row.target_mask == two.target_mask
    assert len(row.input_ids) <= limit < len(full.input_ids)
    # No room for any demonstration: the query alone, exactly as it is encoded alone.
    alone = encode_example(QUERY, tokenizer, 512, chat_template=chat_template)
    row, used = render_in_context(DEMOS, QUERY, tokenizer, max_length=len(alone.input_ids) + 1, chat_template=chat_template)
    assert used == 0 and row.input_ids == alone.input_ids and row.target_mask == alone.target_mask


def test_multi_turn_demonstrations_bring_all_their_turns(tokenizer):
    demo = Example(messages=(("user", "hi"), ("assistant", "hello"), ("user", "map: 1 2"), ("assistant", " 3 4")))
    row, used = render_in_context([demo], QUERY, tokenizer, max_length=256)
    text = tokenizer.decode(row.input_ids)
    assert used == 1 and text.count("<|im_start|>user") == 3 and text.endswith("assistant\n 2 1<|im_end|>\n")
    assert targets(tokenizer, row) == " 2 1<|im_end|>"


@pytest.mark.parametrize("chat_template", ["none", "auto"])
def test_uneven_demonstrations_keep_the_most_nearest_ones_that_fit(tokenizer, chat_template):
    """One long demonstration far away and three short ones near the query: every short one fits, the
    long one does not. A per-demonstration length estimate (the mean, inflated by the long one) dropped
    the short ones with it; the row must keep the largest number of nearest demonstrations that fit,
    found here by trying every count."""
    long = Example(prompt="map: " + " ".join(["1 2 3 4 5"] * 40), response=" 3 4")
    demos = [long] + DEMOS
    counts = {}
    for k in range(len(demos) + 1):
        row, used = render_in_context(demos[len(demos) - k:], QUERY, tokenizer, max_length=10**6,
                                      chat_template=chat_template)
        assert used == k
        counts[k] = len(row.input_ids)
    assert counts[4] > 3 * counts[3]  # the far demonstration really is long
    for limit in (counts[3], counts[3] + 5, counts[2], counts[1] + 1):
        expected = max(k for k, n in counts.items() if n <= limit)
        row, used = render_in_context(demos, QUERY, tokenizer, max_length=limit, chat_template=chat_template)
        assert used == expected, (limit, used, expected)
        assert len(row.input_ids) == counts[expected] and targets(tokenizer, row).endswith(" 2 1" + (
            "<|im_end|>" if chat_template == "auto" else tokenizer.eos_token))


def test_the_shared_prefix_stops_before_the_token_that_predicts_the_first_target(tokenizer):
    """``evaluate_rows(share_prefix=True)`` runs the tokens every row starts with once; each row must
    keep the token whose logits predict its first target (and its first generated token)."""
    from metasft.evaluate import shared_prefix_length

    rows = [render_in_context(DEMOS, q, tokenizer, max_length=256)[0] for q in (QUERY, DEMOS[0])]
    first_difference = next(t for t, (a, b) in enumerate(zip(rows[0].input_ids, rows[1].input_ids)) if a != b)
    demonstrations_only = len(tokenizer(tokenizer.apply_chat_template(
        [{"role": r, "content": c} for d in DEMOS for r, c in (("user", d.prompt), ("assistant", d.response))],
        tokenize=False), add_special_tokens=False)["input_ids"])
    assert first_difference > demonstrations_only  # the rows differ inside the query's turn
    assert shared_prefix_length(rows) == first_difference
    # Identical rows share everything up to the token before the first target, not the whole row.
    first_target = rows[0].target_mask.index(1)
    assert shared_prefix_length([rows[0], rows[0]]) == first_target - 1
    assert shared_prefix_length([rows[0]]) == first_target - 1
    assert shared_prefix_length([]) == 0
