"""``metasft inspect``: show exactly what the model is trained on.

    metasft inspect data/maml/medical/support.parquet --tokenizer /models/qwen --rows 3
    metasft inspect data.parquet --tokenizer /models/qwen --json      # one JSON object per row

The pretty view prints each row's rendered text with the tokens the loss predicts highlighted;
``--json`` prints ``input_ids``, ``attention_mask``, ``position_ids`` and ``target_mask`` (1 where the
loss predicts that token). ``--pad-to-max-length`` pads like verl's ``SFTDataset`` does.
"""

from __future__ import annotations

import json
import sys


from rich.console import Console
from rich.text import Text

from metasft.data.collate import pad_id
from metasft.data.formatting import rows_to_examples
from metasft.data.io import read_rows
from metasft.data.tokenize import Encoded, encode_examples


def row_json(index: int, enc: Encoded, pad_token_id: int, pad_to: int | None) -> dict:
    n = len(enc.input_ids)
    width = max(n, pad_to or 0)
    pad = width - n
    return {
        "row": index,
        "input_ids": enc.input_ids + [pad_token_id] * pad,
        "attention_mask": [1] * n + [0] * pad,
        "position_ids": list(range(n)) + [0] * pad,
        "target_mask": enc.target_mask + [0] * pad,
    }


def render_row(index: int, enc: Encoded, tokenizer) -> Text:
    text = Text()
    text.append(f"── row {index}: {len(enc)} tokens, {enc.num_targets} trained on ──\n", style="bold")
    for token_id, is_target in zip(enc.input_ids, enc.target_mask):
        piece = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        text.append(piece, style="black on green" if is_target else "dim")
    text.append("\n")
    return text


def inspect_file(path: str, tokenizer, max_length: int, truncation: str, chat_template: str,
                 prompt_key: str, response_key: str, messages_key: str, as_json: bool,
                 rows: int | None, pad_to_max_length: bool, out=None) -> None:
    raw = read_rows(path)
    if rows is not None:
        raw = raw[:rows]
    examples, _ = rows_to_examples(raw, path, prompt_key, response_key, messages_key)
    encoded = encode_examples(examples, tokenizer, max_length, truncation, chat_template)
    pad_token = pad_id(tokenizer)
    if as_json:
        stream = out or sys.stdout
        for index, enc in enumerate(encoded):
            stream.write(json.dumps(row_json(index, enc, pad_token, max_length if pad_to_max_length else None)) + "\n")
        return
    console = Console(file=out) if out is not None else Console()
    console.print(Text("legend: ", style="bold") + Text("trained-on token", style="black on green")
                  + Text("  ") + Text("context only", style="dim"))
    for index, enc in enumerate(encoded):
        console.print(render_row(index, enc, tokenizer))
    total = sum(len(e) for e in encoded)
    targets = sum(e.num_targets for e in encoded)
    console.print(f"{len(encoded)} rows, {total} tokens, {targets} trained on ({targets / max(total, 1):.1%})")


