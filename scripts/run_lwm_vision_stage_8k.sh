#!/usr/bin/env bash
# LWM vision-language stage 8K (its numbers: scripts/run_lwm_vision_stage.sh, docs/train.md).
set -euo pipefail
stage=8k exec bash "$(dirname "${BASH_SOURCE[0]}")/run_lwm_vision_stage.sh" "$@"
