"""Independent construction of task files and model batches for the exactness tests.

Batches are built here straight from the tokenizer (SPEC §2.2 written out by hand: prompt tokens are
context, response + EOS tokens are targets; right padding, masked, never a target), sharing no code
with ``metasft.data``, so a reference computed on them checks the data pipeline too.
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from conftest import cipher_rows, write_task_files


def write_uneven_tasks(root, specs) -> tuple[list[str], list[dict]]:
    """Write one support/query parquet pair per ``(n_support, n_query, length)`` in ``specs``
    (cipher rows of ``length`` symbols, so tasks differ in target tokens per row and in rows).

    Returns the ``meta.tasks`` override and, per task, ``{"support": rows, "query": rows}``."""
    rows = [cipher_rows(2000 + t, n_support + n_query, length=length)
            for t, (n_support, n_query, length) in enumerate(specs)]
    tasks = [{"support": r[:n_support], "query": r[n_support:]} for r, (n_support, _, _) in zip(rows, specs)]
    return write_task_files(root, [(t["support"], t["query"]) for t in tasks]), tasks


def write_rows(path, rows) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def prompt_ids(row: dict, tokenizer, chat: bool = False) -> list[int]:
    text = row["prompt"]
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_row(row: dict, tokenizer, chat: bool = False) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels are -100 on the prompt and the token itself on response + EOS."""
    p = prompt_ids(row, tokenizer, chat)
    r = tokenizer(row["response"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    assert r[-1] == tokenizer.eos_token_id
    return p + r, [-100] * len(p) + r


def ref_batch(rows: list[dict], tokenizer, chat: bool = False) -> dict[str, torch.Tensor]:
    """One right-padded batch of ``rows`` with attention mask and position ids, built by hand."""
    encoded = [encode_row(row, tokenizer, chat) for row in rows]
    width = max(len(ids) for ids, _ in encoded)
    n = len(encoded)
    batch = {"input_ids": torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long),
             "labels": torch.full((n, width), -100, dtype=torch.long),
             "attention_mask": torch.zeros((n, width), dtype=torch.long),
             "position_ids": torch.zeros((n, width), dtype=torch.long)}
    for i, (ids, labels) in enumerate(encoded):
        batch["input_ids"][i, :len(ids)] = torch.tensor(ids)
        batch["labels"][i, :len(ids)] = torch.tensor(labels)
        batch["attention_mask"][i, :len(ids)] = 1
        batch["position_ids"][i, :len(ids)] = torch.arange(len(ids))
    return batch


def num_targets(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def rel_err(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """‖actual − expected‖ / ‖expected‖ over all tensors (float64)."""
    num = sum(((actual[n].double() - expected[n].double()) ** 2).sum() for n in expected)
    den = sum((expected[n].double() ** 2).sum() for n in expected)
    return float((num / den) ** 0.5)
