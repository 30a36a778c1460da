#!/usr/bin/env bash
# LWM-Text stage I at 1M tokens (its numbers: scripts/run_lwm_text_stage.sh, docs/train.md).
set -euo pipefail
stage=1m exec bash "$(dirname "${BASH_SOURCE[0]}")/run_lwm_text_stage.sh" "$@"
