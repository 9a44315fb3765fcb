#!/usr/bin/env bash
# Run HERE (with internet to PyPI) before a GPU session: fills .device/ (git-ignored) with what bench/device_run.sh
# needs on the lent GPU machine, which has PyTorch, Lightning, pytest and OpenCV but cannot download anything:
#   .device/whl/       wheels for its Python 3.12 that it lacks (PyAV for the video writer, open_clip for CLIP tests)
#   .device/fixtures/  the parity fixtures (tests/test_cuda.py checks the GPU's fp32 noise prediction against them)
#   .device/data/      32 FFHQ-aligned 256-px crops of ../shared/sample_video made by prepare_data.py, edited there
#                      with --aligned (the GPU machine has no dlib landmark model; alignment is CPU work anyway)
# About 45 MB, under the device tool's 64 MiB limit for the working tree. Then call the device tool with
#   command "bash bench/device_run.sh all", carry [".device"].
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${DVA_SHARED:-../shared}
rm -rf .device && mkdir -p .device/whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .device/whl 'av==18.1.0' 'open_clip_torch==3.3.0' 'ftfy==6.3.1' 'wcwidth==0.7.0'
cp -r "$SHARED/fixtures/official" .device/fixtures
python3 prepare_data.py "$SHARED/sample_video" --out .device/data --split test --max_frames 32 --format jpg \
  --no_progress
du -sh .device
