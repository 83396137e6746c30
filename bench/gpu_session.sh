#!/usr/bin/env bash
# GPU checks and benchmarks, each part one device call that prints results as they exist.
# Here first:   bash bench/gpu_wheels.sh           (fills .gpu/: wheels + the yardstick)
# Then, with the device tool:  run  command="bash bench/gpu_session.sh PART"  carry=[".gpu"]  timeout_s=590
# PART:
#   first   (~8 min; 492 s on an H200) the mode-coverage run (issue 12) in the background, with the DeepSpeed/CUDA
#           checks in the foreground meanwhile: the first call of a session, when the budget holds
#           one long call and one short one
#   modes   the mode-coverage run alone: bench/modes.py at 32 px, 64 channels, bf16, candidates
#           MODES_CANDIDATES trained side by side on the one GPU up to MODES_KIMG (2000, the
#           issue's 2 million images) or MODES_SECONDS (420) of training, whichever comes first,
#           EMA-G scored in the loop every 250 kimg (the learning curve) and at the end by
#           bigan-sample + bigan-eval; by default the next ablation on top of packs of 4 (ttur, d2,
#           batch128); the packing run of 2026-11-27 was "default packed packed4 sn_hinge";
#           MODES_RESOLUTION=64 runs the same 1000 modes at 64 px (issue 12 asks for both)
#   checks  DeepSpeed ZeRO-2 bf16, ZeRO-3 fp16 and pix2pix ZeRO-3 bf16 from shards, as users launch them
#   speed   (~6 min; stops where the call's limit cuts it, each figure already written) where an
#           iteration's time goes, ZeRO beside the yardstick, the step alone
#   sg2     (~6 min) StyleGAN2 (issue 26): bench/stylegan2_speed.py (img/s, s/kimg, peak memory at 64, 128, 256 px,
#           bf16, with and without compile: the 'paper' case is the issue's FFHQ-U 256 reference, goal >= 170 img/s),
#           then StyleGAN2 with ADA on DeepSpeed ZeRO-2 and on ZeRO-3 (path length and R1 on partitioned weights),
#           bf16, from shards as users launch it
#   all     checks, then speed, then sg2 (what the next session should run first: speed is still unmeasured)
# Results land in $OUT (machine.txt, *.json, *.jsonl, *.log; at most 8 files come back per call):
# copy the figures into bench/RESULTS.md. DEVICE=cpu PYTHON=.venv/bin/python rehearses on a CPU.
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
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1  # -k: a trainer takes SIGTERM as "checkpoint and stop"
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
modes() {
  # shellcheck disable=SC2086
  "$PYTHON" bench/modes.py --kimg "${MODES_KIMG:-2000}" --seconds "${MODES_SECONDS:-420}" --parallel \
    --eval-every "${MODES_EVAL_EVERY:-250}" --precision "${MODES_PRECISION:-bf16}" --channels "${MODES_CHANNELS:-64}" \
    --resolution "${MODES_RESOLUTION:-32}" --n "${MODES_N:-60000}" --samples "${MODES_SAMPLES:-26000}" --work /tmp/bigan-modes --out "$OUT/modes.jsonl" \
    ${MODES_CANDIDATES:-default ttur d2 batch128} > "$OUT/modes.log" 2>&1
  echo "modes: exit $? after $SECONDS s"
  "$PYTHON" - "$OUT/modes_grids.png" /tmp/bigan-modes/runs/*/ <<'PY' || true  # each candidate's last EMA-G grid
import sys
from pathlib import Path
import numpy as np
from PIL import Image
grids = [sorted(Path(d).glob("samples/*G_ema*kimg.png"))[-1:] for d in sys.argv[2:]]
rows = [np.asarray(Image.open(g[0]).convert("RGB")) for g in grids if g]
if rows:
    Image.fromarray(np.concatenate([np.pad(r, ((0, 0), (0, 8), (0, 0))) for r in rows], 1)).save(sys.argv[1])
    print("grids, left to right:", ", ".join(Path(g[0]).parts[-3] for g in grids if g))
PY
  cat /tmp/bigan-modes/runs/*.log 2>/dev/null | grep -v "FutureWarning\|warn" | tail -c 200000 > "$OUT/modes_runs.log"
}
checks() {
  step deepspeed_zero2_bf16 90 bash -c "ds_run 2 bf16"
  step deepspeed_zero3_fp16 75 bash -c "ds_run 3 fp16"
  # pix2pix (issue 13) on ZeRO-3 in bf16: the U-Net's skips and the PatchGAN's (image, input) pairs
  # inside the engines, from the paired demo shards (5-D batches through the pinned staging), with
  # held-out L1/PSNR in the loop.
  step pix2pix_zero3_bf16 90 "$PYTHON" -m accelerate.commands.launch \
    --config_file launch_configs/accelerate/deepspeed_zero3.yaml --num_processes 1 bigan/train.py \
    --config launch_configs/experiments/layout2painting.yaml --data.demo_images=1000 --train.batch_size=32 \
    --train.kimg=4 --train.precision=bf16 --data.workers=4 --eval.every_kimg=2 --eval.n=256 \
    --run.dir=/tmp/pix2pix-run --run.progress=false --run.log_every=10
}
speed() {
  # 2. Where an end-to-end iteration's time goes (issue 15): loader, train_step, fit, yardstick.
  step end_to_end 150 "$PYTHON" bench/end_to_end.py --device "$DEVICE" --repeats 1 --out "$OUT/end_to_end.json"
  # 3. ZeRO and the plain path beside the yardstick (issue 10's targets).
  step zero_overhead 110 "$PYTHON" bench/zero_overhead.py --device "$DEVICE" --out "$OUT/zero_overhead.json"
  step end_to_end_compile 70 "$PYTHON" bench/end_to_end.py --device "$DEVICE" --repeats 1 --case dcgan32_compile \
    --out "$OUT/end_to_end.json"
  step train_step 40 "$PYTHON" bench/train_step.py --device "$DEVICE" --out "$OUT/train_step.json"
}
sg2() {
  # the 'paper' case (FFHQ-U 256's channels and batch) at 64/128/256 px, uncompiled then compiled
  step stylegan2_speed 300 "$PYTHON" bench/stylegan2_speed.py --device "$DEVICE" --iterations "${SG2_ITERATIONS:-32}" \
    --case paper ${SG2_TINY:+--tiny} --out "$OUT/stylegan2_speed.jsonl"
  # then from shards as users launch it, on ZeRO-2 and with both networks on ZeRO-3 (their large weights
  # partitioned: the path length (Greg) and R1 (Dreg) hold them whole for their phase, Phase.whole; measured on 2
  # CPU ranks only so far)
  for stage in 2 3; do
    step "stylegan2_zero${stage}_bf16" 80 "$PYTHON" -m accelerate.commands.launch \
      --config_file "launch_configs/accelerate/deepspeed_zero$stage.yaml" --num_processes 1 bigan/train.py \
      --config launch_configs/experiments/stylegan2-auto.yaml --data.shards=demo --data.demo_images=2000 \
      --data.resolution=64 --train.kimg="${DS_KIMG:-6}" --data.workers=4 ${SG2_TINY:+--stylegan2.channel_base=256 --stylegan2.channel_max=16 --train.batch_size=8} \
      --run.dir="/tmp/sg2-run-zero$stage" --run.progress=false --run.log_every=10
  done
}
case "${1:-all}" in
  first)
    modes & pid=$!
    checks
    wait $pid
    cat "$OUT/modes.jsonl" 2>/dev/null; grep -v "^{" "$OUT/modes.log" | tail -5;;
  modes) modes; cat "$OUT/modes.jsonl" 2>/dev/null; grep -v "^{" "$OUT/modes.log" | tail -5;;
  checks) checks;;
  speed) speed;;
  sg2) sg2;;
  all) checks; speed; sg2;;
  *) echo "unknown part '$1' (first, modes, checks, speed, sg2, all)"; exit 2;;
esac
