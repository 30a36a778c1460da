#!/usr/bin/env bash
# Generate an image from text with LWM (python -m lwm.vision_generation; docs/vision_inference.md).
# --temperature_*: temperature applied to the logits of each modality
# --top_k_*: sample only from the tokens with the top k logits
# --cfg_scale_*: classifier-free guidance scale for each modality (1.0 = no guidance)
# --n_frames: number of frames to generate; 1 for an image
set -euo pipefail

llama_tokenizer_path="${llama_tokenizer_path:-LargeWorldModel/LWM-Text-1M}"  # tokenizer.model, its folder, or a hub name
vqgan_checkpoint="${vqgan_checkpoint:-}"  # pickle of the VQGAN params
lwm_checkpoint="${lwm_checkpoint:-}"      # streaming params of an LWM-Chat model
output_file="${output_file:-fireworks.png}"

: "${vqgan_checkpoint:?set vqgan_checkpoint at the top of this script (or in the environment)}"
: "${lwm_checkpoint:?set lwm_checkpoint at the top of this script (or in the environment)}"

PROJECT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$PROJECT_DIR"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PROJECT_DIR"

python3 -u -m lwm.vision_generation \
    --prompt='Fireworks over the city' \
    --output_file="$output_file" \
    --temperature_image=1.0 \
    --top_k_image=8192 \
    --cfg_scale_image=5.0 \
    --vqgan_checkpoint="$vqgan_checkpoint" \
    --n_frames=1 \
    --mesh_dim='!1,1,-1,1' \
    --dtype='fp32' \
    --load_llama_config='7b' \
    --update_llama_config="dict(sample_mode='vision',theta=50000000,max_sequence_length=32768,scan_attention=False,scan_query_chunk_size=128,scan_key_chunk_size=128,scan_mlp=False,scan_mlp_chunk_size=8192,scan_layers=True)" \
    --load_checkpoint="params::$lwm_checkpoint" \
    --tokenizer="$llama_tokenizer_path"
