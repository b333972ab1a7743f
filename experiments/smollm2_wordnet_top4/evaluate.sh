#!/usr/bin/env bash
# Score trained runs of the top-4-layer SmolLM2 experiment on held-out tasks (docs/real_model.md).
#
#   bash experiments/smollm2_wordnet_top4/evaluate.sh SEED TASKS_DIR RUNS_DIR OUT_DIR [STEP] [METHOD ...]
#
# RUNS_DIR/<method>/step_STEP is each method's checkpoint (STEP defaults to 1000; METHODs default to
# sft and fomaml). Writes three benchmarks under OUT_DIR (the base model is always scored too):
#   gradient/   every method adapted by gradient steps: 3 SGD steps on its top 4 layers' adapters
#               (and the head's), shots drawn per class (5-way: 1 and 5 per class), the rate chosen
#               per method and shots from {0.003, 0.01, 0.03, 0.1} on the 5 validation tasks;
#   in_context/ the base and SFT with the same shots in the prompt, no gradient step (10 query rows
#               a task: a 5-shot-per-class prompt is ~2,000 tokens).
set -euo pipefail
seed=$1 tasks=$2 runs=$3 out=$4 step=${5:-1000}
shift $(( $# < 5 ? $# : 5 ))
methods=("$@"); [ ${#methods[@]} -gt 0 ] || methods=(sft fomaml)
model=${MODEL:-models/smollm2-135m}
mkdir -p "$out"
# The base is adapted in the same parameters as every trained method: SmolLM2 with fresh LoRA
# adapters (B = 0, so the same function as the base) on the same modules. Its full-weight head is
# tied to the input embeddings, so it could not be adapted on its own.
if [ ! -f "$out/base_lora/adapter_config.json" ]; then
  python - "$(realpath "$model")" "$out/base_lora" <<'PY'
import sys
from metasft.config import ModelConfig
from metasft.model import load_model, load_tokenizer
cfg = ModelConfig(partial_pretrain=sys.argv[1], lora_rank=8, lora_alpha=16,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"])
load_model(cfg).save_pretrained(sys.argv[2])
load_tokenizer(cfg).save_pretrained(sys.argv[2])
PY
fi
entries=""
for m in "${methods[@]}"; do entries+="  - {name: $m, checkpoint: $runs/$m/step_$step}"$'\n'; done
common="base_model: $out/base_lora
tasks_dir: $tasks
seeds: [$seed]
shots: per_class
n_shots: [1, 5]
data: {chat_template: auto, max_length: 2560}
metric: exact_match
device: cpu"
cat > "$out/gradient.yaml" <<YAML
# metasft bench --config $out/gradient.yaml   (written by experiments/smollm2_wordnet_top4/evaluate.sh)
$common
output_dir: $out/gradient
adapt: {optimizer: sgd, lr_grid: [0.003, 0.01, 0.03, 0.1], steps: 3, batch_size: 5, inner_scope: "top_layers:4"}
eval: {batch_size: 25, max_query_rows: 25, max_new_tokens: 4}
methods:
$entries
YAML
cat > "$out/in_context.yaml" <<YAML
# metasft bench --config $out/in_context.yaml   (written by experiments/smollm2_wordnet_top4/evaluate.sh)
$common
output_dir: $out/in_context
adaptations: [in_context]
eval: {batch_size: 5, max_query_rows: 10, max_new_tokens: 4}
methods:
  - {name: sft, checkpoint: $runs/sft/step_$step}
YAML
metasft bench --config "$out/gradient.yaml"
if [ -z "${SKIP_IN_CONTEXT:-}" ]; then metasft bench --config "$out/in_context.yaml"; fi
