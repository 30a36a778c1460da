#!/usr/bin/env bash
# LWM-Text stage I at 512K tokens (its numbers: scripts/run_lwm_text_stage.sh, docs/train.md).
set -euo pipefail
stage=512k exec bash "$(dirname "${BASH_SOURCE[0]}")/run_lwm_text_stage.sh" "$@"
