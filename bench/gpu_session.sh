#!/usr/bin/env bash
# One GPU session's checks and benchmarks, in one command (about 6 minutes on one H100/H200).
# Here first:   bash bench/gpu_wheels.sh           (fills .gpu/: wheels + the yardstick)
# Then, with the device tool:  run  command="bash bench/gpu_session.sh"  carry=[".gpu"]  timeout_s=540
# Results land in $OUT (machine.txt, *.json, *.log): copy the figures into bench/RESULTS.md.
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
  echo "exit $? after $SECONDS s"; grep -v "^\[20\|FutureWarning\|return func" "$OUT/$name.log" | tail -25
}
step zero_overhead 240 "$PYTHON" bench/zero_overhead.py --device "$DEVICE" --out "$OUT/zero_overhead.json"
step train_step 120 "$PYTHON" bench/train_step.py --device "$DEVICE" --out "$OUT/train_step.json"
step zero_profile 60 "$PYTHON" bench/zero_profile.py --device "$DEVICE" --top 15
