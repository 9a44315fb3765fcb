#!/usr/bin/env bash
# Fetch the released DVA files: checkpoints, frozen pretrained networks, the CelebA-HQ classifier data, CLIP ViT-B/16,
# the dlib landmark predictor and the sample frames. Idempotent and resumable; the logic lives in tools/fetch.py.
#   bash download_requirements.sh                      # everything, into this folder
#   bash download_requirements.sh --only dva_ckpt,pretrained_models
#   bash download_requirements.sh --list | --dry-run | --help
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/tools/fetch.py" "$@"
