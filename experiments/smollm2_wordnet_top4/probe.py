"""Diagnostic: do SmolLM2's hidden states tell a task's categories apart from 1 or 5 examples each?

For each held-out (or validation) 5-way task of a prepared WordNet suite, every row's prompt is
rendered with the chat template and run through the frozen model once; the hidden state at the
last prompt token, after layer L, is that row's feature. A nearest-centroid classifier (cosine) is
then built from k support rows per class and scored on the task's query rows, over 20 seeded draws.
No parameter is trained: it measures how much a perfect head-only adaptation could get from the
features, and at which depth. With ``--project R ...`` the last layer's features are also read
through random R-dimensional Gaussian projections (5 of them), as a rank-R LoRA adapter on the head
first reads them: how much survives that.

    python experiments/smollm2_wordnet_top4/probe.py MODEL_DIR TASKS_DIR [--split test] [--layers 16 26 30] [--project 8 64]
"""

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def features(model, tokenizer, prompts: list[str], layers: list[int]) -> dict[int, np.ndarray]:
    out = {layer: [] for layer in layers}
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
            for layer in layers:
                out[layer].append(hidden[layer][0, -1].float().numpy())
    return {layer: np.stack(v) for layer, v in out.items()}


def centroid_accuracy(support: np.ndarray, support_labels: list[str], query: np.ndarray, query_labels: list[str],
                      k: int, rng) -> float:
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    classes = sorted(set(support_labels))
    centroids = []
    for c in classes:
        rows = [i for i, label in enumerate(support_labels) if label == c]
        centroids.append(support[rng.choice(rows, k, replace=False)].mean(0))
    centre = np.mean(centroids, axis=0)  # remove what every class shares (the prompt's common part)
    scores = unit(query - centre) @ unit(np.stack(centroids) - centre).T
    predicted = [classes[i] for i in scores.argmax(1)]
    return float(np.mean([p == t for p, t in zip(predicted, query_labels)]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("tasks_dir")
    parser.add_argument("--split", default="test", choices=["test", "validation"])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16, 22, 26, 28, 30])
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--project", type=int, nargs="*", default=[], metavar="R")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir).eval()
    manifest = json.loads((Path(args.tasks_dir) / "manifest.json").read_text())
    tasks = manifest["held_out_tasks" if args.split == "test" else "validation_tasks"]
    results = {layer: {1: [], 5: []} for layer in args.layers}
    last = max(args.layers)
    projections = {f"{last}@rank{r}": [np.random.default_rng([r, i]).standard_normal((model.config.hidden_size, r))
                                        for i in range(5)] for r in args.project}
    results.update({key: {1: [], 5: []} for key in projections})
    for name in tasks:
        rows = {part: pq.read_table(Path(args.tasks_dir) / name / f"{part}.parquet").to_pylist()
                for part in ("support", "query")}
        feats = {part: features(model, tokenizer, [r["prompt"] for r in rows[part]], args.layers) for part in rows}
        labels = {part: [r["response"] for r in rows[part]] for part in rows}
        for layer in args.layers:
            for k in (1, 5):
                rng = np.random.default_rng(0)
                accs = [centroid_accuracy(feats["support"][layer], labels["support"], feats["query"][layer],
                                          labels["query"], k, rng) for _ in range(args.draws)]
                results[layer][k].append(float(np.mean(accs)))
        for key, mats in projections.items():
            for k in (1, 5):
                rng = np.random.default_rng(0)
                accs = [centroid_accuracy(feats["support"][last] @ m, labels["support"], feats["query"][last] @ m,
                                          labels["query"], k, rng) for m in mats for _ in range(args.draws // 5)]
                results[key][k].append(float(np.mean(accs)))
        print(name, {layer: {k: round(results[layer][k][-1], 3) for k in (1, 5)} for layer in results}, flush=True)
    summary = {layer: {k: round(float(np.mean(v)), 3) for k, v in by_k.items()} for layer, by_k in results.items()}
    print(json.dumps({"split": args.split, "tasks": len(tasks), "chance": 0.2,
                      "nearest_centroid_accuracy_by_layer_and_shots_per_class": summary}))


if __name__ == "__main__":
    main()
