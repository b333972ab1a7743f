#!/usr/bin/env bash
# Meta-train one method of the top-4-layer SmolLM2 experiment (docs/real_model.md, issue 24).
#
#   bash experiments/smollm2_wordnet_top4/train.sh METHOD SEED TASKS_DIR OUT_DIR
#
# METHOD: sft | fomaml | anil | reptile | fomaml_meta_sgd. Every method: SmolLM2-135M-Instruct with
# LoRA r8 on every linear layer and lm_head, only the top 4 decoder layers (and the head) trained,
# the 26 frozen layers below computed once per row into a prefix cache shared by all methods
# (PREFIX_CACHE, default OUT_DIR/../prefix_cache), 1,000 steps that each pass 4 tasks x 20 rows
# forward and backward (meta-steps: 3 inner steps of 5 support rows + 5 query rows per task; SFT:
# 20 rows per task), AdamW at 2e-4, a validation evaluation every 100 steps, a checkpoint every 250.
# One thread (OMP_NUM_THREADS=1 unless set): two methods train side by side on a 2-core CPU.
set -euo pipefail
method=$1 seed=$2 tasks=$3 out=$4
model=${MODEL:-models/smollm2-135m}
cache=${PREFIX_CACHE:-$(dirname "$out")/prefix_cache}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
common=(
  "model.partial_pretrain=$model" "meta.tasks_dir=$tasks" "trainer.default_local_dir=$out" "trainer.seed=$seed"
  trainer.device=cpu trainer.precision=fp32 data.max_length=128 data.chat_template=auto
  model.lora_rank=8 model.lora_alpha=16
  "model.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]"
  model.train_top_layers=4 "trainer.prefix_cache_dir=$cache"
  meta.meta_batch_size=4 meta.num_inner_steps=3 meta.inner_lr=0.01 meta.outer_lr=2.0e-4 meta.task_batching=false
  optim.lr_scheduler=constant optim.warmup_steps_ratio=0.05 "trainer.total_training_steps=${STEPS:-1000}"
  trainer.save_freq=250 trainer.test_freq=100 trainer.test_exact_match_rows=25 "trainer.logger=[console,jsonl]"
  trainer.log_freq=10
)
case $method in
  sft)             extra=(--config-name sft meta.inner_batch_size=20) ;;
  fomaml)          extra=(--config-name fomaml meta.inner_batch_size=5 meta.query_batch_size=5) ;;
  anil)            extra=(--config-name maml meta.inner_scope=head meta.inner_batch_size=5 meta.query_batch_size=5) ;;
  reptile)         extra=(--config-name reptile meta.inner_batch_size=5 meta.num_inner_steps=4) ;;
  fomaml_meta_sgd) extra=(--config-name fomaml meta.inner_batch_size=5 meta.query_batch_size=5
                          meta.learn_inner_lr=per_tensor meta.inner_lr_lr=1.0e-3) ;;
  *) echo "train.sh: unknown method $method (sft, fomaml, anil, reptile, fomaml_meta_sgd)" >&2; exit 2 ;;
esac
exec metasft train "${extra[@]}" "${common[@]}"
