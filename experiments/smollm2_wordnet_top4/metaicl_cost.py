"""How much longer MetaICL's rows (5 demonstrations + one example) are than SFT's on a WordNet suite,
and how much longer a forward through SmolLM2's 30 layers takes on them (side by side, one thread):
what filling the prefix cache would cost MetaICL on experiment 3's setting, where every layer is cached.

    python experiments/smollm2_wordnet_top4/metaicl_cost.py [MODEL_DIR] [TASKS_DIR]   # prints JSON
"""
import json
import sys
import time

import torch
from metasft.config import load_config
from metasft.data.tasks import load_tasks
from metasft.data.in_context import metaicl_tasks
from metasft.data.collate import collate
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
M = sys.argv[1] if len(sys.argv) > 1 else "models/smollm2-135m"
TASKS = sys.argv[2] if len(sys.argv) > 2 else "data/wordnet"
tok = AutoTokenizer.from_pretrained(M)
cfg = load_config(overrides=[f"meta.tasks_dir={TASKS}", "data.max_length=1024", "data.chat_template=auto"])
tasks = [t for t in load_tasks(cfg.meta, cfg.data, tok) if not t.held_out][:20]
icl = metaicl_tasks(tasks, tok, demos=5, loss_on_demos=False, seed=42, max_length=1024)
sft_rows = [r for t in tasks for r in list(t.support) + list(t.query)]
icl_rows = [r for t in icl for r in t.support]
lens = lambda rows: sum(len(r.input_ids) for r in rows) / len(rows)
model = AutoModelForCausalLM.from_pretrained(M).eval()
def timed(rows, n=20):
    batch = collate(rows[:n], tok.pad_token_id)
    with torch.no_grad():
        model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # warm
        t = time.perf_counter(); model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return (time.perf_counter() - t) / n
out = {"sft_tokens_per_row": lens(sft_rows), "metaicl_tokens_per_row": lens(icl_rows),
       "rows_per_suite": 100 * 75, "sft_s_per_row_30_layers": timed(sft_rows), "metaicl_s_per_row_30_layers": timed(icl_rows)}
out["ratio"] = out["metaicl_s_per_row_30_layers"] / out["sft_s_per_row_30_layers"]
out["metaicl_cache_fill_core_hours"] = out["metaicl_s_per_row_30_layers"] * out["rows_per_suite"] / 3600
out["metaicl_cache_gb"] = out["metaicl_tokens_per_row"] * 576 * 4 * out["rows_per_suite"] / 1e9
print(json.dumps(out, indent=1))
