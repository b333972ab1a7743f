"""In-context scoring with the demonstrations run once per task, against every row run whole.

    python benchmarks/in_context_prefix.py --model models/smollm2-135m --tasks data/wordnet [--count 3]

The bench's in-context baseline renders one task's seeded shots before each of its query rows
(``metasft.data.in_context``), so the rows of a task share everything up to the query's own turn.
``evaluate_rows(share_prefix=True)`` runs that prefix once and copies its keys and values to every
row; ``share_prefix=False`` runs each row whole, as before. Both score the first ``--count`` held-out
tasks (1 shot per class, seed 0, 25 query rows, one batch, 4 new tokens: the real-model demo's
protocol), alternating which goes first. JSON on stdout:

- ``whole_over_shared``: total time of the whole rows over the shared prefix (the speed-up);
- ``predictions_equal`` / ``rows``: generated answers that agree between the two;
- ``max_abs_query_loss_difference``: the largest per-task difference of the mean query loss;
- ``prefix_fraction``: the share of a row's tokens that the prefix holds, averaged over tasks.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a causal LM directory (metasft models get smollm2-135m)")
    parser.add_argument("--tasks", required=True, help="a suite directory (metasft suites build wordnet)")
    parser.add_argument("--count", type=int, default=3, help="held-out tasks to score")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metasft.adapt import select_shots_per_class
    from metasft.bench.evaluation import class_label
    from metasft.config import DataConfig
    from metasft.data.in_context import render_in_context
    from metasft.data.tasks import load_task, read_manifest_specs
    from metasft.evaluate import evaluate_rows, shared_prefix_length

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    data = DataConfig(max_length=2560)
    specs = [s for s in read_manifest_specs(args.tasks) if s.held_out][: args.count]
    seconds = {False: 0.0, True: 0.0}
    equal = rows_total = 0
    loss_differences, fractions = [], []
    for i, spec in enumerate(specs):
        task = load_task(spec, data, tokenizer)
        shots = [task.support_examples[j] for j in
                 select_shots_per_class([class_label(e) for e in task.support_examples], 1, 0, task.name)]
        examples = task.query_examples[:25]
        rows = [render_in_context(shots, e, tokenizer, max_length=data.max_length)[0] for e in examples]
        fractions.append(shared_prefix_length(rows) / (sum(len(r.input_ids) for r in rows) / len(rows)))
        results = {}
        for share in ((False, True) if i % 2 == 0 else (True, False)):
            started = time.perf_counter()
            results[share] = evaluate_rows(model, tokenizer, rows, examples, batch_size=25, max_new_tokens=4,
                                           share_prefix=share)
            seconds[share] += time.perf_counter() - started
        equal += sum(a == b for a, b in zip(results[False]["predictions"], results[True]["predictions"]))
        rows_total += len(rows)
        loss_differences.append(abs(results[False]["query_loss"] - results[True]["query_loss"]))
    print(json.dumps({
        "model": args.model, "tasks": len(specs), "threads": torch.get_num_threads(),
        "seconds_whole": round(seconds[False], 2), "seconds_shared": round(seconds[True], 2),
        "whole_over_shared": round(seconds[False] / seconds[True], 2),
        "predictions_equal": equal, "rows": rows_total,
        "max_abs_query_loss_difference": max(loss_differences),
        "prefix_fraction": round(sum(fractions) / len(fractions), 3),
    }, indent=2))


if __name__ == "__main__":
    main()
