#!/usr/bin/env bash
# LWM-Text stage I, 32k tokens: stage 1 of 5 of the paper's progressive context extension
# (32K -> 128K -> 256K -> 512K -> 1M), starting from LLaMA-2 7B.
# 32768 tokens a sequence, RoPE theta 1,000,000, 128 sequences (4M tokens) a batch,
# 1200 steps (5.0B tokens), constant learning rate 4e-5 after 100 warmup steps.
# Runs on a TPU pod or GPU cluster as it is: change only the variables and the mesh below
# (docs/train.md, "Context extension stages"; docs/sharding.md for the mesh).
set -euo pipefail

output_root="${output_root:-$HOME/experiment_output/lwm-text}"
dataset_path="${dataset_path:-}"  # JSONL of books ({"text": ...}), filtered to documents of at least 32K tokens
tokenizer="${tokenizer:-LargeWorldModel/LWM-Text-1M}"
init_checkpoint="${init_checkpoint:-params::/path/to/llama-2-7b/streaming_params}"  # LLaMA-2 7B in LWM format (scripts/convert_hf_to_lwm.py)
mesh_dim="${mesh_dim:-1,-1,1,1}"  # dp,fsdp,tp,sp: sp splits each sequence over a ring of devices

: "${dataset_path:?set dataset_path at the top of this script (or in the environment)}"
PROJECT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$PROJECT_DIR"

python3 -u -m lwm.train \
    --modality=text \
    --mesh_dim="$mesh_dim" \
    --dtype=bf16 \
    --total_steps=1200 \
    --log_freq=1 \
    --save_model_freq=50 \
    --save_milestone_freq=300 \
    --load_llama_config=7b \
    --update_llama_config="dict(theta=1000000,max_sequence_length=32768,scan_attention=True,scan_query_chunk_size=1024,scan_key_chunk_size=1024,scan_mlp=True,scan_mlp_chunk_size=1024,scan_layers=True,remat_block='save_attention')" \
    --load_checkpoint="$init_checkpoint" \
    --tokenizer="$tokenizer" \
    --optimizer.type=adamw \
    --optimizer.adamw_optimizer.lr=4e-5 \
    --optimizer.adamw_optimizer.end_lr=4e-5 \
    --optimizer.adamw_optimizer.init_lr=0.0 \
    --optimizer.adamw_optimizer.lr_warmup_steps=100 \
    --optimizer.adamw_optimizer.lr_decay_steps=1200 \
    --optimizer.adamw_optimizer.weight_decay=0.0 \
    --train_dataset.type=json \
    --train_dataset.text_processor.fields=text \
    --train_dataset.json_dataset.path="$dataset_path" \
    --train_dataset.json_dataset.seq_length=32768 \
    --train_dataset.json_dataset.batch_size=128 \
    --train_dataset.json_dataset.packed=True \
    --checkpointer.save_optimizer_state=True \
    --autoresume=True \
    --logger.append_uuid=False \
    --logger.experiment_id=lwm-text-32k \
    --logger.output_dir="$output_root"
