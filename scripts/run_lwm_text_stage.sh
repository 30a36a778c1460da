#!/usr/bin/env bash
# LWM-Text stage I, one stage of the paper's progressive context extension
# (32K -> 128K -> 256K -> 512K -> 1M tokens, each stage from the previous one's weights):
#     stage=128k dataset_path=books.jsonl bash scripts/run_lwm_text_stage.sh [--more.flags=...]
# (or scripts/run_lwm_text_stage_<stage>.sh). 4M tokens a batch, constant learning rate 4e-5
# after a short warmup. Runs on a TPU pod or GPU cluster as it is: change only the variables
# and the mesh (docs/train.md, "Context extension stages"; docs/sharding.md for the mesh).
# Arguments go to lwm.train after the script's flags (a repeated flag: the last one wins).
# The scale-down knobs (length_divisor, min_length, steps_divisor, batch_tokens, chunk_size,
# model, dtype) rehearse the whole chain at a tiny size; their defaults are the paper's run.
set -euo pipefail

stage="${stage:-}"  # 32k | 128k | 256k | 512k | 1m
output_root="${output_root:-$HOME/experiment_output/lwm-text}"  # a folder or a bucket URL (gs://bucket/runs)
dataset_path="${dataset_path:-}"  # JSONL of books ({"text": ...}), documents at least as long as the stage's context
tokenizer="${tokenizer:-LargeWorldModel/LWM-Text-1M}"
llama2_checkpoint="${llama2_checkpoint-params::/path/to/llama-2-7b/streaming_params}"  # scripts/convert_hf_to_lwm.py; set empty: random init
model="${model:-7b}"  # --load_llama_config: a size name or json::PATH
dtype="${dtype:-bf16}"  # compute dtype; parameters and optimizer state stay float32
length_divisor="${length_divisor:-1}"  # length = max(paper length / length_divisor, min_length)
min_length="${min_length:-0}"
steps_divisor="${steps_divisor:-1}"  # steps and warmup = paper's / steps_divisor, at least 1 (warmup below steps)
batch_tokens="${batch_tokens:-4194304}"  # tokens a batch: batch = batch_tokens / length, at least 1
chunk_size="${chunk_size:-1024}"  # attention and MLP scan chunks, each min(chunk_size, length)
save_model_freq="${save_model_freq:-50}"  # steps between saves (save_milestone_freq: default steps / 4, at least 1)

# The paper's stages (docs/train.md, "Context extension stages"); from = the starting weights.
case "$stage" in
    32k)  length=32768   theta=1000000  steps=1200 warmup=100 from="$llama2_checkpoint" ;;
    128k) length=131072  theta=10000000 steps=3000 warmup=200 from="params::$output_root/lwm-text-32k/streaming_params" ;;
    256k) length=262144  theta=10000000 steps=3000 warmup=200 from="params::$output_root/lwm-text-128k/streaming_params" ;;
    512k) length=524288  theta=25000000 steps=720  warmup=50  from="params::$output_root/lwm-text-256k/streaming_params" ;;
    1m)   length=1048576 theta=50000000 steps=450  warmup=25  from="params::$output_root/lwm-text-512k/streaming_params" ;;
    *) echo "set stage to one of 32k, 128k, 256k, 512k, 1m (got '$stage')" >&2; exit 2 ;;
esac
init_checkpoint="${init_checkpoint:-$from}"
source "$(dirname -- "${BASH_SOURCE[0]}")/stage_scale.sh"  # length, steps, warmup, batch, chunk, mesh from the knobs

: "${dataset_path:?set dataset_path at the top of this script (or in the environment)}"
PROJECT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PROJECT_DIR"  # relative paths stay relative to the caller

# The trainer's default (--checkpointer.exact_resume=True) writes, at every save, the exact
# float32 streaming_train_state that --autoresume continues from and the bf16 streaming_params
# export that the next stage starts from.
python3 -u -m lwm.train \
    --modality=text \
    --mesh_dim="$mesh_dim" \
    --dtype="$dtype" \
    --total_steps="$steps" \
    --log_freq=1 \
    --save_model_freq="$save_model_freq" \
    --save_milestone_freq="$save_milestone_freq" \
    --load_llama_config="$model" \
    --update_llama_config="dict(theta=$theta,max_sequence_length=$length,scan_attention=True,scan_query_chunk_size=$chunk,scan_key_chunk_size=$chunk,scan_mlp=True,scan_mlp_chunk_size=$chunk,scan_layers=True,remat_block='save_attention')" \
    --load_checkpoint="$init_checkpoint" \
    --tokenizer="$tokenizer" \
    --optimizer.type=adamw \
    --optimizer.adamw_optimizer.lr=4e-5 \
    --optimizer.adamw_optimizer.end_lr=4e-5 \
    --optimizer.adamw_optimizer.init_lr=0.0 \
    --optimizer.adamw_optimizer.lr_warmup_steps="$warmup" \
    --optimizer.adamw_optimizer.lr_decay_steps="$steps" \
    --optimizer.adamw_optimizer.weight_decay=0.0 \
    --train_dataset.type=json \
    --train_dataset.text_processor.fields=text \
    --train_dataset.json_dataset.path="$dataset_path" \
    --train_dataset.json_dataset.seq_length="$length" \
    --train_dataset.json_dataset.batch_size="$batch" \
    --train_dataset.json_dataset.packed=True \
    --autoresume=True \
    --logger.append_uuid=False \
    --logger.experiment_id="lwm-text-$stage" \
    --logger.output_dir="$output_root" \
    "$@"
