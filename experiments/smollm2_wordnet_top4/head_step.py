"""Why a plain gradient step on the head fails at 1 shot per class, measured on the frozen base model.

    python experiments/smollm2_wordnet_top4/head_step.py models/smollm2-135m data/wordnet

For validation tasks 000 and 001, with one support row per class (the first of each label):

1. the geometry of the features the head reads (the last layer, after the final norm): their norm,
   the mean cosine between the decision features of two rows (the position that predicts the label),
   the same after removing their mean, and the cosine between a decision feature and an
   end-of-answer feature (the position that predicts ``<|im_end|>``);
2. one SGD step on a full-rank head adapter (``model.lora_full_head``: the step a full, untied head
   weight would take) at several rates, on the support loss as training defines it (label and
   ``<|im_end|>``) and with the end-of-answer targets left out, then greedy answers on the 25 query
   rows: exact match and the most common answers.

Prints one JSON object per line.
"""

import argparse
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import torch

from metasft.config import ModelConfig
from metasft.data.collate import collate
from metasft.data.tasks import Example
from metasft.data.tokenize import encode_examples
from metasft.evaluate import evaluate_rows
from metasft.model import load_model, load_tokenizer

TASKS = ("wordnet_validation_000", "wordnet_validation_001")
RATES = (0.003, 0.01, 0.03, 0.1)


def examples(rows):
    return [Example(prompt=r["prompt"], response=r["response"], source=r["source"]) for r in rows]


def one_shot_per_class(rows):
    first = {}
    for row in rows:
        first.setdefault(row["response"], row)
    return list(first.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("tasks_dir", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig(partial_pretrain=args.model, lora_rank=8, lora_alpha=16, target_modules=["lm_head"],
                      lora_full_head=True)
    model, tokenizer = load_model(cfg), load_tokenizer(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    b_weight = model.get_output_embeddings().lora_B["default"].weight
    b_weight.requires_grad_(True)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    for task in TASKS:
        support = one_shot_per_class(pq.read_table(args.tasks_dir / task / "support.parquet").to_pylist())
        query = pq.read_table(args.tasks_dir / task / "query.parquet").to_pylist()
        rows = encode_examples(examples(support), tokenizer, 256, chat_template="auto")
        query_rows = encode_examples(examples(query), tokenizer, 256, chat_template="auto")
        batch = collate(rows, tokenizer.pad_token_id)
        with torch.no_grad():
            states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True).hidden_states[-1]
        decision, end = [], []
        for i in range(len(rows)):
            targets = (batch["labels"][i] != -100).nonzero().flatten()  # the label's token, then <|im_end|>
            decision.append(states[i, targets[0] - 1])
            end.append(states[i, targets[-1] - 1])
        d, e = torch.stack(decision), torch.stack(end)
        off = ~torch.eye(len(d), dtype=torch.bool)
        centred = unit(d - d.mean(0))
        print(json.dumps({"task": task, "decision_norm": round(float(d.norm(dim=-1).mean()), 1),
                          "end_norm": round(float(e.norm(dim=-1).mean()), 1),
                          "cos_decision_decision": round(float((unit(d) @ unit(d).T)[off].mean()), 3),
                          "cos_decision_decision_centred": round(float((centred @ centred.T)[off].mean()), 3),
                          "cos_decision_end": round(float((unit(d) @ unit(e).T).mean()), 3)}), flush=True)
        for with_end in (True, False):
            for rate in RATES:
                labels = batch["labels"][:, 1:].clone()
                if not with_end:
                    labels[labels == eos] = -100
                with torch.no_grad():
                    b_weight.zero_()
                b_weight.grad = None
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
                torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                  ignore_index=-100).backward()
                with torch.no_grad():
                    b_weight -= rate * b_weight.grad
                scores = evaluate_rows(model, tokenizer, query_rows, examples(query), batch_size=25, max_new_tokens=4)
                print(json.dumps({"task": task, "loss_targets": "label+end" if with_end else "label", "rate": rate,
                                  "exact_match": scores["exact_match"], "query_loss": round(scores["query_loss"], 3),
                                  "answers": Counter(scores["predictions"]).most_common(3)}), flush=True)


if __name__ == "__main__":
    main()
