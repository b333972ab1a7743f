"""Property-based tests (hypothesis) of the data pipeline's invariants."""

import json

import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metasft.data.collate import IGNORE_INDEX, collate
from metasft.data.formatting import Example
from metasft.data.prepare import prepare
from metasft.data.tokenize import encode_example, encode_examples

TEXT = st.text(alphabet=st.sampled_from(list("abc xyz0123456789:.,é日\n")), min_size=1, max_size=30).filter(str.strip)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(prompt=TEXT, response=TEXT, template=st.sampled_from(["auto", "none"]))
def test_targets_are_exactly_the_response_and_eos(tokenizer, prompt, response, template):
    enc = encode_example(Example(prompt=prompt, response=response), tokenizer, 4096, chat_template=template)
    targets = [t for t, m in zip(enc.input_ids, enc.target_mask) if m]
    assert targets == tokenizer(response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    first = enc.target_mask.index(1)
    assert all(enc.target_mask[first:]) and not any(enc.target_mask[:first])


@SETTINGS
@given(prompt=TEXT, response=TEXT, max_length=st.integers(2, 40), mode=st.sampled_from(["left", "right"]))
def test_truncation_keeps_targets_aligned_with_what_remains(tokenizer, prompt, response, max_length, mode):
    example = Example(prompt=prompt, response=response)
    full = encode_example(example, tokenizer, 4096, chat_template="none")
    cut = encode_example(example, tokenizer, max_length, truncation=mode, chat_template="none")
    n = min(len(full), max_length)
    assert len(cut) == n
    kept = slice(len(full) - n, None) if mode == "left" else slice(0, n)
    assert cut.input_ids == full.input_ids[kept]
    expected = full.target_mask[kept]
    assert cut.target_mask == [0] + expected[1:]


@SETTINGS
@given(rows=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=6))
def test_padding_is_never_attended_nor_a_target(tokenizer, rows):
    encoded = encode_examples([Example(prompt=p, response=r) for p, r in rows], tokenizer, 4096, chat_template="none")
    batch = collate(encoded, tokenizer.pad_token_id)
    for i, row in enumerate(encoded):
        n = len(row)
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        targets = (batch["labels"][i, :n] != IGNORE_INDEX).tolist()
        assert targets == [bool(m) for m in row.target_mask]


ROW = st.tuples(st.sampled_from(["a", "b", "c", "d", " a", "a ", "e f", "e  f"]), st.sampled_from(["1", "2", "3", " 1"]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(ROW, min_size=2, max_size=40), ratio=st.floats(0.1, 0.9), seed=st.integers(0, 5))
def test_prepare_splits_are_disjoint_deterministic_and_account_for_every_row(tmp_path_factory, rows, ratio, seed):
    root = tmp_path_factory.mktemp("prop")
    (root / "t.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))
    (root / "tasks.json").write_text(json.dumps({"t": {"input_file": str(root / "t.jsonl"), "support_ratio": ratio}}))
    unique = {(" ".join(p.split()), " ".join(r.split())) for p, r in rows}
    try:
        manifest, reports = prepare(root / "tasks.json", root / "a", seed=seed)
    except Exception as exc:  # too few unique rows for a non-empty support and query set
        assert len(unique) < 2 or "cannot make a non-empty support and query" in str(exc)
        return
    prepare(root / "tasks.json", root / "b", seed=seed)
    read = lambda d, s: pq.read_table(root / d / "t" / f"{s}.parquet").to_pylist()  # noqa: E731
    norm = lambda r: (" ".join(r["prompt"].split()), " ".join(r["response"].split()))  # noqa: E731
    support, query = read("a", "support"), read("a", "query")
    assert not {norm(r) for r in support} & {norm(r) for r in query}
    assert support == read("b", "support") and query == read("b", "query")
    report = reports[0]
    assert report.read == len(rows) == len(support) + len(query) + sum(report.dropped.values())
    assert {norm(r) for r in support} | {norm(r) for r in query} == unique
