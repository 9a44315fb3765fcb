#!/usr/bin/env bash
# Issue #6's GPU checks in ONE call of the device tool (device time is scarce): prepare with bench/device_prep.sh,
# then run there:  bash bench/device_run.sh [env] [tests] [unet] [compile] [edit] | all     (carry [".device"])
#   env      GPU, driver, torch build -> $OUT/env.txt
#   tests    tests/test_cuda.py + the CUDA tests of test_model / test_clip_edit -> $OUT/tests.log
#   unet     bench_unet.py, paper model, bf16, batch 1/4/16, channels_last -> $OUT/unet_bf16.json
#   compile  the same with torch.compile (default mode), batch 16 -> $OUT/unet_bf16_compile.json
#   edit     bench_edit.py, paper model, T=100, bf16, --batch_size auto, 32 aligned crops -> $OUT/edit_T100.json
# Every stage's output also goes to $OUT/log.txt. A dry run of the same plumbing on CPU with the tiny preset:
#   DEVICE=cpu TEMPLATE=tiny T=10 N=4 OUT=/tmp/dev_out bash bench/device_run.sh all
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda} TEMPLATE=${TEMPLATE:-diffusion_video_autoencoder} T=${T:-100} N=${N:-32}
PRECISION=${PRECISION:-bf16}
export PYTHONUNBUFFERED=1
if ls .device/whl/*.whl >/dev/null 2>&1 && ! python3 -c 'import av, open_clip' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dva_site \
    .device/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/dva_site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -d .device/fixtures ] && export DVA_PARITY_FIXTURES=$PWD/.device/fixtures
FRAMES=${FRAMES:-$(ls -d .device/data/test/* 2>/dev/null | head -1)}
[ -n "$FRAMES" ] && export DVA_ALIGNED_FRAMES=$PWD/$FRAMES
if [ "$DEVICE" = cpu ]; then export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296; fi
stages=("$@")
[ ${#stages[@]} -eq 0 ] || [ "${stages[0]}" = all ] && stages=(env tests unet compile edit)
status=0
for stage in "${stages[@]}"; do
  echo "=== $stage $(date -u +%H:%M:%S)" | tee -a "$OUT/log.txt"
  case $stage in
    env) { nvidia-smi 2>&1 || true
           python3 -c 'import torch, sys; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda,
"available", torch.cuda.is_available()); torch.cuda.is_available() and print(torch.cuda.get_device_name(0),
torch.cuda.mem_get_info(0))'; } 2>&1 | tee "$OUT/env.txt" ;;
    tests) python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_model.py tests/test_clip_edit.py \
             tests/test_speed.py 2>&1 | tee "$OUT/tests.log" ;;
    unet) python3 bench/bench_unet.py --template "$TEMPLATE" --device "$DEVICE" --precision "$PRECISION" \
            --batch_sizes 1,4,16 --channels_last --json "$OUT/unet_$PRECISION.json" ;;
    compile) python3 bench/bench_unet.py --template "$TEMPLATE" --device "$DEVICE" --precision "$PRECISION" \
               --batch_sizes 16 --channels_last --compile --compile_mode default \
               --json "$OUT/unet_${PRECISION}_compile.json" ;;
    edit) if [ -z "$FRAMES" ]; then echo "no aligned frames under .device/data: run bench/device_prep.sh"; false
          else python3 bench/bench_edit.py --template "$TEMPLATE" --device "$DEVICE" --precision "$PRECISION" --T "$T" \
                 --batch_size auto --video_path "$FRAMES" --aligned --max_num "$N" --json "$OUT/edit_T$T.json"; fi ;;
    *) echo "unknown stage $stage (env tests unet compile edit all)"; false ;;
  esac 2>&1 | tee -a "$OUT/log.txt"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "=== $stage failed ($rc)" | tee -a "$OUT/log.txt"; status=1; }
done
exit $status
