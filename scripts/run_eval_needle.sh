#!/usr/bin/env bash
# Single-needle needle-in-a-haystack eval of an LWM-Text model (scripts/eval_needle.py; docs/needle.md).
# Results go to $output_file (resumed if it exists); a heatmap PNG is written next to it.
# Haystack: a JSONL file, one {"text": ...} a line (scripts/create_needle_data.py writes one).
set -euo pipefail

llama_tokenizer_path="${llama_tokenizer_path:-LargeWorldModel/LWM-Text-1M}"  # tokenizer.model, its folder, or a hub name
lwm_text_checkpoint="${lwm_text_checkpoint:-}"  # streaming params of an LWM-Text model
haystack_file="${haystack_file:-}"              # JSONL haystack
output_file="${output_file:-}"                  # results JSON

: "${lwm_text_checkpoint:?set lwm_text_checkpoint at the top of this script (or in the environment)}"
: "${haystack_file:?set haystack_file at the top of this script (or in the environment)}"
: "${output_file:?set output_file at the top of this script (or in the environment)}"

PROJECT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$PROJECT_DIR"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PROJECT_DIR"

python3 -u scripts/eval_needle.py \
    --mesh_dim='!1,-1,4,1' \
    --dtype='fp32' \
    --load_llama_config='7b' \
    --update_llama_config="dict(theta=10000000,max_sequence_length=131072,scan_attention=True,scan_query_chunk_size=1024,scan_key_chunk_size=1024,scan_mlp=True,scan_mlp_chunk_size=1024,scan_layers=True)" \
    --load_checkpoint="params::$lwm_text_checkpoint" \
    --tokenizer="$llama_tokenizer_path" \
    --max_tokens_per_batch=5000 \
    --output_file="$output_file" \
    --haystack_file="$haystack_file" \
    --context_lengths_min=1000 \
    --context_lengths_max=10000 \
    --n_context_length_intervals=20 \
    --n_document_depth_intervals=20 \
    --n_rounds=3
