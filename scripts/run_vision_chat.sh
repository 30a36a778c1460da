#!/usr/bin/env bash
# Ask LWM-Chat about an image or a video (python -m lwm.vision_chat; docs/vision_inference.md).
# --input_file: an image (png or jpg) or a video (any format decord reads, e.g. mp4)
# --max_n_frames: videos longer than this are sampled uniformly down to max_n_frames frames
set -euo pipefail

llama_tokenizer_path="${llama_tokenizer_path:-LargeWorldModel/LWM-Text-1M}"  # tokenizer.model, its folder, or a hub name
vqgan_checkpoint="${vqgan_checkpoint:-}"  # pickle of the VQGAN params
lwm_checkpoint="${lwm_checkpoint:-}"      # streaming params of an LWM-Chat model
input_file="${input_file:-}"              # the image or video to ask about

: "${vqgan_checkpoint:?set vqgan_checkpoint at the top of this script (or in the environment)}"
: "${lwm_checkpoint:?set lwm_checkpoint at the top of this script (or in the environment)}"
: "${input_file:?set input_file at the top of this script (or in the environment)}"

PROJECT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$PROJECT_DIR"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PROJECT_DIR"

python3 -u -m lwm.vision_chat \
    --prompt="What is the video about?" \
    --input_file="$input_file" \
    --vqgan_checkpoint="$vqgan_checkpoint" \
    --mesh_dim='!1,1,-1,1' \
    --dtype='fp32' \
    --load_llama_config='7b' \
    --max_n_frames=8 \
    --update_llama_config="dict(sample_mode='text',theta=50000000,max_sequence_length=131072,use_flash_attention=False,scan_attention=False,scan_query_chunk_size=128,scan_key_chunk_size=128,remat_attention='',scan_mlp=False,scan_mlp_chunk_size=2048,remat_mlp='',remat_block='',scan_layers=True)" \
    --load_checkpoint="params::$lwm_checkpoint" \
    --tokenizer.vocab_file="$llama_tokenizer_path"
