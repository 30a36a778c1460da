#!/usr/bin/env bash
# LWM-Text stage I, one stage of the paper's progressive context extension
# (32K -> 128K -> 256K -> 512K -> 1M tokens, each stage from the previous one's weights):
#     stage=128k dataset_path=books.jsonl bash scripts/run_lwm_text_stage.sh
# (or scripts/run_lwm_text_stage_<stage>.sh). 4M tokens a batch, constant learning rate 4e-5
# after a short warmup. Runs on a TPU pod or GPU cluster as it is: change only the variables
# and the mesh (docs/train.md, "Context extension stages"; docs/sharding.md for the mesh).
set -euo pipefail

stage="${stage:-}"  # 32k | 128k | 256k | 512k | 1m
output_root="${output_root:-$HOME/experiment_output/lwm-text}"
dataset_path="${dataset_path:-}"  # JSONL of books ({"text": ...}), documents at least as long as the stage's context
tokenizer="${tokenizer:-LargeWorldModel/LWM-Text-1M}"
llama2_checkpoint="${llama2_checkpoint:-params::/path/to/llama-2-7b/streaming_params}"  # scripts/convert_hf_to_lwm.py

#                  length   theta     steps warmup  starts from
case "$stage" in
    32k)  set -- 32768   1000000   1200  100  "$llama2_checkpoint" ;;
    128k) set -- 131072  10000000  3000  200  "params::$output_root/lwm-text-32k/streaming_params" ;;
    256k) set -- 262144  10000000  3000  200  "params::$output_root/lwm-text-128k/streaming_params" ;;
    512k) set -- 524288  25000000  720   50   "params::$output_root/lwm-text-256k/streaming_params" ;;
    1m)   set -- 1048576 50000000  450   25   "params::$output_root/lwm-text-512k/streaming_params" ;;
    *) echo "set stage to one of 32k, 128k, 256k, 512k, 1m (got '$stage')" >&2; exit 2 ;;
esac
length=$1 theta=$2 steps=$3 warmup=$4 init_checkpoint="${init_checkpoint:-$5}"
batch=$(( 4 * 1024 * 1024 / length ))  # 4M tokens a batch
mesh_dim="${mesh_dim:-1,-1,1,$(( length / 32768 ))}"  # dp,fsdp,tp,sp: sp splits each sequence over a ring

: "${dataset_path:?set dataset_path at the top of this script (or in the environment)}"
PROJECT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$PROJECT_DIR"

python3 -u -m lwm.train \
    --modality=text \
    --mesh_dim="$mesh_dim" \
    --dtype=bf16 \
    --total_steps="$steps" \
    --log_freq=1 \
    --save_model_freq=50 \
    --save_milestone_freq=$(( steps / 4 )) \
    --load_llama_config=7b \
    --update_llama_config="dict(theta=$theta,max_sequence_length=$length,scan_attention=True,scan_query_chunk_size=1024,scan_key_chunk_size=1024,scan_mlp=True,scan_mlp_chunk_size=1024,scan_layers=True,remat_block='save_attention')" \
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
    --checkpointer.save_optimizer_state=True \
    --autoresume=True \
    --logger.append_uuid=False \
    --logger.experiment_id="lwm-text-$stage" \
    --logger.output_dir="$output_root"
