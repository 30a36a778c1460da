#!/usr/bin/env bash
# The tiny-world demo (`make demo`): train a small LWM-Text model on this CPU with ring
# attention over 8 virtual devices (mesh 1,1,1,8: the sequence is split over sp=8), on the
# Paul Graham essays and the LLaMA-style tokenizer that PyPI packages ship, then evaluate it
# on held-out essays and let it write a few sentences.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-outputs/demo}"
steps="${STEPS:-150}"
python="${PYTHON:-.venv/bin/python}"
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8 --xla_cpu_collective_call_terminate_timeout_seconds=300}"
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT=true JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"

"$python" -m lwm.corpus "$out/data"
"$python" -u -m lwm.train \
    --modality=text \
    --mesh_dim='1,1,1,8' \
    --dtype=fp32 \
    --total_steps="$steps" \
    --log_freq=10 \
    --eval_steps=2 \
    --save_model_freq="$steps" \
    --load_llama_config="json::configs/tiny_text.json" \
    --update_llama_config="dict(max_sequence_length=1024,scan_query_chunk_size=64,scan_key_chunk_size=64,scan_mlp_chunk_size=256,scan_loss_chunk_size=256)" \
    --tokenizer=builtin \
    --optimizer.type=adamw \
    --optimizer.adamw_optimizer.lr=3e-3 \
    --optimizer.adamw_optimizer.end_lr=3e-4 \
    --optimizer.adamw_optimizer.lr_warmup_steps=10 \
    --optimizer.adamw_optimizer.lr_decay_steps="$steps" \
    --optimizer.adamw_optimizer.weight_decay=0.01 \
    --train_dataset.type=json \
    --train_dataset.text_processor.fields=text \
    --train_dataset.json_dataset.path="$out/data/train.jsonl" \
    --train_dataset.json_dataset.seq_length=512 \
    --train_dataset.json_dataset.batch_size=4 \
    --eval_dataset.type=json \
    --eval_dataset.text_processor.fields=text \
    --eval_dataset.json_dataset.path="$out/data/eval.jsonl" \
    --eval_dataset.json_dataset.seq_length=512 \
    --eval_dataset.json_dataset.batch_size=4 \
    --checkpointer.float_dtype=fp32 \
    --logger.output_dir="$out/runs" \
    --logger.experiment_id=demo \
    --logger.append_uuid=False
run="$out/runs/demo"
"$python" - "$run/metrics.jsonl" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
first, last = records[0], records[-1]
print(f"\ntrain loss {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} (step {last['step']}); "
      f"held-out eval loss {last['eval_loss']:.3f}; {last['tokens_per_second']:.0f} tokens/s")
PY
echo "A greedy continuation from the trained model:"
"$python" -m lwm.chat --load_llama_config="json::configs/tiny_text.json" \
    --update_llama_config="dict(max_sequence_length=1024,scan_query_chunk_size=64,scan_key_chunk_size=64)" \
    --load_checkpoint="params::$run/streaming_params" --tokenizer=builtin --mesh_dim='1,1,1,8' \
    --temperature=0 --max_new_tokens=48 --prompt="What makes a startup succeed?"
echo "metrics: $run/metrics.jsonl; checkpoint: $run/streaming_params"
