#!/usr/bin/env bash
# One GPU session's checks and benchmarks, in one command (about 9 minutes on one H100/H200; each
# step has its own limit and prints its JSON lines as it measures them).
# Here first:   bash bench/gpu_wheels.sh           (fills .gpu/: wheels + the yardstick)
# Then, with the device tool:  run  command="bash bench/gpu_session.sh"  carry=[".gpu"]  timeout_s=590
# Results land in $OUT (machine.txt, *.json, *.log): copy the figures into bench/RESULTS.md.
# `bash bench/gpu_session.sh modes` is a session of its own: the full mode-coverage run (issue 12),
# bench/modes.py at 32 px, 64 channels, bf16, MODES_KIMG (default 1200) per candidate in
# MODES_CANDIDATES (default "packed"): at the 3.1k img/s measured on an H200, 1200 kimg is about
# 6.5 minutes after ~1.5 minutes of data and classifier, the most one call's 560 s holds.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bigan-gpu-out}
DEVICE=${DEVICE:-cuda}     # DEVICE=cpu PYTHON=.venv/bin/python rehearses the flow on a CPU machine
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if [ "$PYTHON" = python3 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 BIGAN_YARDSTICK="$PWD/.gpu/reference_gan.py"
{
  date -u; nvidia-smi -L
  "$PYTHON" -c "import torch, deepspeed, accelerate; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'accelerate', accelerate.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
step() {  # name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "exit $? after $SECONDS s"; grep -v "^\[20\|FutureWarning\|return func\|warn" "$OUT/$name.log" | tail -25
}
export BIGAN_CACHE=/tmp/bigan-cache OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# 1. The crash the first GPU run found (issue 10): DeepSpeed with bf16 and fp16, as users start it, from shards.
ds_run() {  # stage, precision
  "$PYTHON" -m accelerate.commands.launch --config_file "launch_configs/accelerate/deepspeed_zero$1.yaml" \
    --num_processes 1 bigan/train.py --data.demo_images=2000 --data.resolution=32 --model.g_channels=32 \
    --model.d_channels=32 --train.batch_size=64 --train.kimg="${DS_KIMG:-6}" --train.precision="$2" --data.workers=4 \
    --run.dir="/tmp/ds-run-$1-$2" --run.progress=false --run.log_every=10
}
export -f ds_run; export PYTHON
if [ "${1:-}" = modes ]; then
  # shellcheck disable=SC2086
  step modes 560 "$PYTHON" bench/modes.py --kimg "${MODES_KIMG:-1200}" --precision bf16 --out "$OUT/modes.jsonl" \
    ${MODES_CANDIDATES:-packed}
  exit 0
fi
step deepspeed_zero2_bf16 70 bash -c "ds_run 2 bf16"
step deepspeed_zero3_fp16 50 bash -c "ds_run 3 fp16"
# pix2pix (issue 13) on ZeRO-3 in bf16: the U-Net's skips and the PatchGAN's (image, input) pairs
# inside the engines, from the paired demo shards, with held-out L1/PSNR in the loop.
step pix2pix_zero3_bf16 60 "$PYTHON" -m accelerate.commands.launch \
  --config_file launch_configs/accelerate/deepspeed_zero3.yaml --num_processes 1 bigan/train.py \
  --config launch_configs/experiments/layout2painting.yaml --data.demo_images=1000 --train.batch_size=32 \
  --train.kimg=4 --train.precision=bf16 --data.workers=4 --eval.every_kimg=2 --eval.n=256 \
  --run.dir=/tmp/pix2pix-run --run.progress=false --run.log_every=10
# 2. Where an end-to-end iteration's time goes (issue 15): loader, train_step, fit, yardstick.
step end_to_end 130 "$PYTHON" bench/end_to_end.py --device "$DEVICE" --repeats 2 --out "$OUT/end_to_end.json"
step end_to_end_compile 70 "$PYTHON" bench/end_to_end.py --device "$DEVICE" --repeats 1 --case dcgan32_compile
# 3. ZeRO and the plain path beside the yardstick (issue 10's targets), then the step alone.
step zero_overhead 110 "$PYTHON" bench/zero_overhead.py --device "$DEVICE" --out "$OUT/zero_overhead.json"
step train_step 40 "$PYTHON" bench/train_step.py --device "$DEVICE" --out "$OUT/train_step.json"
