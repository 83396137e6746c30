#!/usr/bin/env bash
# bigan on Slurm: one task per node, accelerate launch on each, preemption-safe and requeueing.
#
#   sbatch slurm/train.sh                                          # defaults below
#   sbatch --nodes=4 --gres=gpu:8 -p gpu -A myproject --time=24:00:00 slurm/train.sh --train.kimg=25000
#   sbatch --export=ALL,RUN_DIR=runs/big,CONFIG=launch_configs/experiments/landscapes-256.yaml slurm/train.sh
#
# Anything after the script name is passed to bigan/train.py (--section.key=value overrides).
# #SBATCH lines are defaults that sbatch's own options override; the knobs below are
# environment variables (sbatch --export=ALL,NAME=value,...).
#
#SBATCH --job-name=bigan
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

# ---- knobs ----------------------------------------------------------------------------
: "${BIGAN_ENV:=.venv/bin/activate}"        # file sourced to get python/accelerate ('' = already set up)
: "${CONFIG:=launch_configs/experiments/dcgan64-gpu.yaml}"
: "${RUN_DIR:=runs/${SLURM_JOB_NAME:-bigan}}" # one run dir per run: resubmitting the same RUN_DIR resumes it
: "${ACCELERATE_CONFIG:=launch_configs/accelerate/multi_node.yaml}"
: "${PROCS_PER_NODE:=${SLURM_GPUS_ON_NODE:-}}" # processes per node; default: GPUs on the node, else 1
: "${MAIN_PORT:=29500}"                      # rendezvous port on the head node
: "${BIGAN_SRUN_ARGS:=}"                     # extra srun options
# NCCL knobs that often matter (uncomment as your fabric needs):
#   export NCCL_SOCKET_IFNAME=ib0        # interface for bootstrap traffic
#   export NCCL_IB_HCA=mlx5              # InfiniBand adapters to use
#   export NCCL_DEBUG=WARN               # INFO to debug hangs
#   export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# ---------------------------------------------------------------------------------------

set -uo pipefail
[ -n "${SLURM_SUBMIT_DIR:-}" ] && cd "$SLURM_SUBMIT_DIR"
[ -n "$BIGAN_ENV" ] && source "$BIGAN_ENV"
if [ -z "$PROCS_PER_NODE" ]; then
  PROCS_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l)
  [ "$PROCS_PER_NODE" -gt 0 ] || PROCS_PER_NODE=1
fi
NNODES=${SLURM_NNODES:-1}
HEAD=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
# The head node's address as Slurm knows it (NodeAddr), falling back to its name.
HEAD_ADDR=$(scontrol show node "$HEAD" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
HEAD_ADDR=${HEAD_ADDR:-$HEAD}
mkdir -p "$RUN_DIR/slurm-logs"
rm -f "$RUN_DIR/STOP"
echo "bigan: job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on $NNODES node(s) x $PROCS_PER_NODE process(es); head $HEAD ($HEAD_ADDR:$MAIN_PORT); run dir $RUN_DIR"

# Preemption or time limit: Slurm sends USR1 to this shell 120 s ahead. bigan checkpoints and
# exits 0 when RUN_DIR/STOP appears (every rank sees it on the shared file system); then requeue.
preempted=0
on_usr1() {
  echo "bigan: USR1 received: asking the trainer to checkpoint and stop"
  preempted=1
  touch "$RUN_DIR/STOP"
}
trap on_usr1 USR1

# One task per node; each runs accelerate launch for its local processes. machine_rank comes
# from SLURM_NODEID inside the task. Each node logs to its own file.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 $BIGAN_SRUN_ARGS \
  --output="$RUN_DIR/slurm-logs/%j-node%n.log" \
  bash -c 'exec accelerate launch --config_file "$0" \
      --num_machines "$1" --num_processes "$(( $1 * $2 ))" --machine_rank "$SLURM_NODEID" \
      --main_process_ip "$3" --main_process_port "$4" \
      bigan/train.py --config "$5" --run.dir="$6" --run.resume=latest "${@:7}"' \
  "$ACCELERATE_CONFIG" "$NNODES" "$PROCS_PER_NODE" "$HEAD_ADDR" "$MAIN_PORT" "$CONFIG" "$RUN_DIR" "$@" &
srun_pid=$!
# `wait` returns early when a trapped signal arrives; keep waiting for srun itself.
while true; do
  wait "$srun_pid"
  status=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done
# bigan deletes STOP when it stopped because of it; if STOP is still there the run ended on its own.
if [ "$preempted" = 1 ] && [ "$status" = 0 ] && [ ! -e "$RUN_DIR/STOP" ]; then
  echo "bigan: checkpointed after USR1; requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "$SLURM_JOB_ID"
fi
rm -f "$RUN_DIR/STOP"
echo "bigan: training exited with status $status"
exit "$status"
