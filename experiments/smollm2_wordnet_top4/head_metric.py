"""What a trained full-rank head adapter (``model.lora_full_head``) did to the metric its first step acts in.

    python experiments/smollm2_wordnet_top4/head_metric.py models/smollm2-135m data/wordnet CHECKPOINT ...

From B = 0, one SGD step on the head adapter moves a query's logits by α Σ g (A h_support)·(A h_query):
the kernel is A Aᵀ. The decision features h (the last layer, at the position that predicts the label)
of different rows share one direction u (cosine 0.98, head_step.py). For each checkpoint this prints
how much A keeps of u, ``|A u|``, and of what tells rows apart (the features minus their mean r),
``mean |A r| / |r|``, measured on the first 10 support rows of validation tasks 000 and 001. At
A = I both are 1; a metric in which one step can separate classes keeps the second and drops the first.
"""

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from metasft.config import ModelConfig
from metasft.data.collate import collate
from metasft.data.tasks import Example
from metasft.data.tokenize import encode_examples
from metasft.model import load_model, load_tokenizer

TASKS = ("wordnet_validation_000", "wordnet_validation_001")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("tasks_dir", type=Path)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    args = parser.parse_args()
    cfg = ModelConfig(partial_pretrain=args.model)
    model, tokenizer = load_model(cfg), load_tokenizer(cfg)
    rows = []
    for task in TASKS:
        rows += pq.read_table(args.tasks_dir / task / "support.parquet").to_pylist()[:10]
    encoded = encode_examples([Example(prompt=r["prompt"], response=r["response"], source=r["source"]) for r in rows],
                              tokenizer, 256, chat_template="auto")
    batch = collate(encoded, tokenizer.pad_token_id)
    with torch.no_grad():
        states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True).hidden_states[-1]
    decision = torch.stack([states[i, (batch["labels"][i] != -100).nonzero().flatten()[0] - 1]
                            for i in range(len(encoded))])
    shared = decision.mean(0) / decision.mean(0).norm()
    apart = decision - decision.mean(0)
    for checkpoint in args.checkpoints:
        weights = load_file(checkpoint / "adapter_model.safetensors")
        a = next(v for k, v in weights.items() if "lm_head" in k and "lora_A" in k)
        keeps_shared = float((a @ shared).norm())
        keeps_apart = float(((apart @ a.T).norm(dim=1) / apart.norm(dim=1)).mean())
        print(json.dumps({"checkpoint": str(checkpoint), "A_keeps_shared": round(keeps_shared, 3),
                          "A_keeps_apart": round(keeps_apart, 3), "ratio": round(keeps_apart / keeps_shared, 2),
                          "A_minus_I_frobenius": round(float((a - torch.eye(a.shape[0])).norm()), 2)}), flush=True)


if __name__ == "__main__":
    main()
