#!/usr/bin/env bash
# Generate a video from text with LWM (python -m lwm.vision_generation; docs/vision_inference.md).
# --temperature_*: temperature applied to the logits of each modality
# --top_k_*: sample only from the tokens with the top k logits
# --cfg_scale_*: classifier-free guidance scale for each modality (1.0 = no guidance)
# --n_frames: number of frames to generate (the mp4 plays at 4 fps)
set -euo pipefail

llama_tokenizer_path="${llama_tokenizer_path:-LargeWorldModel/LWM-Text-1M}"  # tokenizer.model, its folder, or a hub name
vqgan_checkpoint="${vqgan_checkpoint:-}"  # pickle of the VQGAN params
lwm_checkpoint="${lwm_checkpoint:-}"      # streaming params of an LWM-Chat model
output_file="${output_file:-fireworks.mp4}"

: "${vqgan_checkpoint:?set vqgan_checkpoint at the top of this script (or in the environment)}"
: "${lwm_checkpoint:?set lwm_checkpoint at the top of this script (or in the environment)}"

PROJECT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$PROJECT_DIR"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PROJECT_DIR"

python3 -u -m lwm.vision_generation \
    --prompt='Fireworks over the city' \
    --output_file="$output_file" \
    --temperature_image=1.0 \
    --temperature_video=1.0 \
    --top_k_image=8192 \
    --top_k_video=1000 \
    --cfg_scale_image=5.0 \
    --cfg_scale_video=1.0 \
    --vqgan_checkpoint="$vqgan_checkpoint" \
    --n_frames=8 \
    --mesh_dim='!1,1,-1,1' \
    --dtype='fp32' \
    --load_llama_config='7b' \
    --update_llama_config="dict(sample_mode='vision',theta=50000000,max_sequence_length=32768,use_flash_attention=True,scan_attention=False,scan_query_chunk_size=128,scan_key_chunk_size=128,scan_mlp=False,scan_mlp_chunk_size=8192,scan_layers=True)" \
    --load_checkpoint="params::$lwm_checkpoint" \
    --tokenizer.vocab_file="$llama_tokenizer_path"
