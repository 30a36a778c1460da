#!/usr/bin/env bash
# LWM-Text stage I, 512k tokens: stage 4 of 5 of the paper's progressive context extension
# (32K -> 128K -> 256K -> 512K -> 1M), starting from the 256k stage's weights.
# 524288 tokens a sequence, RoPE theta 25,000,000, 8 sequences (4M tokens) a batch,
# 720 steps (3.0B tokens), constant learning rate 4e-5 after 50 warmup steps.
# Runs on a TPU pod or GPU cluster as it is: change only the variables and the mesh below
# (docs/train.md, "Context extension stages"; docs/sharding.md for the mesh).
set -euo pipefail

output_root="${output_root:-$HOME/experiment_output/lwm-text}"
dataset_path="${dataset_path:-}"  # JSONL of books ({"text": ...}), filtered to documents of at least 512K tokens
tokenizer="${tokenizer:-LargeWorldModel/LWM-Text-1M}"
init_checkpoint="${init_checkpoint:-params::$output_root/lwm-text-256k/streaming_params}"  # the previous stage's export
mesh_dim="${mesh_dim:-1,-1,1,16}"  # dp,fsdp,tp,sp: sp splits each sequence over a ring of devices

: "${dataset_path:?set dataset_path at the top of this script (or in the environment)}"
PROJECT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$PROJECT_DIR"

python3 -u -m lwm.train \
    --modality=text \
    --mesh_dim="$mesh_dim" \
    --dtype=bf16 \
    --total_steps=720 \
    --log_freq=1 \
    --save_model_freq=50 \
    --save_milestone_freq=180 \
    --load_llama_config=7b \
    --update_llama_config="dict(theta=25000000,max_sequence_length=524288,scan_attention=True,scan_query_chunk_size=1024,scan_key_chunk_size=1024,scan_mlp=True,scan_mlp_chunk_size=1024,scan_layers=True,remat_block='save_attention')" \
    --load_checkpoint="$init_checkpoint" \
    --tokenizer="$tokenizer" \
    --optimizer.type=adamw \
    --optimizer.adamw_optimizer.lr=4e-5 \
    --optimizer.adamw_optimizer.end_lr=4e-5 \
    --optimizer.adamw_optimizer.init_lr=0.0 \
    --optimizer.adamw_optimizer.lr_warmup_steps=50 \
    --optimizer.adamw_optimizer.lr_decay_steps=720 \
    --optimizer.adamw_optimizer.weight_decay=0.0 \
    --train_dataset.type=json \
    --train_dataset.text_processor.fields=text \
    --train_dataset.json_dataset.path="$dataset_path" \
    --train_dataset.json_dataset.seq_length=524288 \
    --train_dataset.json_dataset.batch_size=8 \
    --train_dataset.json_dataset.packed=True \
    --checkpointer.save_optimizer_state=True \
    --autoresume=True \
    --logger.append_uuid=False \
    --logger.experiment_id=lwm-text-512k \
    --logger.output_dir="$output_root"
