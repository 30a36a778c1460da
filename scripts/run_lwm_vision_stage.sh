#!/usr/bin/env bash
# LWM vision-language training, one stage of the paper's chain from LWM-Text-1M's weights
# (1K -> 8K -> Chat-32K -> Chat-128K -> Chat-1M tokens, each stage from the previous one's weights):
#     stage=8k dataset_path=vision.jsonl bash scripts/run_lwm_vision_stage.sh [--more.flags=...]
# (or scripts/run_lwm_vision_stage_<stage>.sh). The data is json_vision JSONL from
# scripts/tokenize_vision.py (docs/vision_data.md), packed into rows. RoPE theta 50M throughout.
# Steps, warmup, learning rates and batch tokens are our memory of the paper's table, not
# checked against it (docs/train.md, "Vision-language stages"): check them before a pod-week.
# Arguments go to lwm.train after the script's flags (a repeated flag: the last one wins).
# The scale-down knobs are those of scripts/run_lwm_text_stage.sh; a frame is 257 tokens, so
# a tiny rehearsal needs min_length of 512 or more.
set -euo pipefail

stage="${stage:-}"  # 1k | 8k | chat-32k | chat-128k | chat-1m
output_root="${output_root:-$HOME/experiment_output/lwm-text}"  # the text stages' default, where lwm-text-1m is; or a bucket URL
text_checkpoint="${text_checkpoint:-params::$output_root/lwm-text-1m/streaming_params}"  # the 1k stage starts here
dataset_path="${dataset_path:-}"  # json_vision JSONL (scripts/tokenize_vision.py); image/video-text pairs, chat data for chat-*
fields_from_example="${fields_from_example:-fields}"  # the key of each line that holds its field spec
tokenizer="${tokenizer:-LargeWorldModel/LWM-Text-1M}"
model="${model:-7b}"  # --load_llama_config: a size name or json::PATH
dtype="${dtype:-bf16}"  # compute dtype; parameters and optimizer state stay float32
length_divisor="${length_divisor:-1}"  # length = max(paper length / length_divisor, min_length)
min_length="${min_length:-0}"
steps_divisor="${steps_divisor:-1}"  # steps and warmup = paper's / steps_divisor, at least 1 (warmup below steps)
batch_tokens="${batch_tokens:-8388608}"  # tokens a batch: batch = batch_tokens / length, at least 1
chunk_size="${chunk_size:-1024}"  # attention and MLP scan chunks, each min(chunk_size, length)
save_model_freq="${save_model_freq:-50}"  # steps between saves (save_milestone_freq: default steps / 4, at least 1)

# The paper's stages as we remember them (docs/train.md, "Vision-language stages"); from = the starting weights.
case "$stage" in
    1k)        length=1024    steps=45000 warmup=1000 lr=6e-4 end_lr=6e-5 from="$text_checkpoint" ;;
    8k)        length=8192    steps=14000 warmup=500  lr=6e-4 end_lr=6e-5 from="params::$output_root/lwm-vision-1k/streaming_params" ;;
    chat-32k)  length=32768   steps=1200  warmup=100  lr=8e-5 end_lr=8e-5 from="params::$output_root/lwm-vision-8k/streaming_params" ;;
    chat-128k) length=131072  steps=500   warmup=50   lr=8e-5 end_lr=8e-5 from="params::$output_root/lwm-vision-chat-32k/streaming_params" ;;
    chat-1m)   length=1048576 steps=50    warmup=5    lr=8e-5 end_lr=8e-5 from="params::$output_root/lwm-vision-chat-128k/streaming_params" ;;
    *) echo "set stage to one of 1k, 8k, chat-32k, chat-128k, chat-1m (got '$stage')" >&2; exit 2 ;;
esac
theta=50000000
init_checkpoint="${init_checkpoint:-$from}"
source "$(dirname -- "${BASH_SOURCE[0]}")/stage_scale.sh"  # length, steps, warmup, batch, chunk, mesh from the knobs

: "${dataset_path:?set dataset_path at the top of this script (or in the environment)}"
PROJECT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PROJECT_DIR"  # relative paths stay relative to the caller

# The trainer's default (--checkpointer.exact_resume=True) writes, at every save, the exact
# float32 streaming_train_state that --autoresume continues from and the bf16 streaming_params
# export that the next stage starts from.
python3 -u -m lwm.train \
    --modality=vision,text \
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
    --optimizer.adamw_optimizer.lr="$lr" \
    --optimizer.adamw_optimizer.end_lr="$end_lr" \
    --optimizer.adamw_optimizer.init_lr=0.0 \
    --optimizer.adamw_optimizer.lr_warmup_steps="$warmup" \
    --optimizer.adamw_optimizer.lr_decay_steps="$steps" \
    --optimizer.adamw_optimizer.weight_decay=0.1 \
    --train_dataset.type=json_vision \
    --train_dataset.vision_text_processor.fields_from_example="$fields_from_example" \
    --train_dataset.json_vision_dataset.path="$dataset_path" \
    --train_dataset.json_vision_dataset.seq_length="$length" \
    --train_dataset.json_vision_dataset.batch_size="$batch" \
    --train_dataset.json_vision_dataset.mode=packed \
    --autoresume=True \
    --logger.append_uuid=False \
    --logger.experiment_id="lwm-vision-$stage" \
    --logger.output_dir="$output_root" \
    "$@"
