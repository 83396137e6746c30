"""bigan on the plain path and on DeepSpeed ZeRO-1/2/3 beside the plain-PyTorch yardstick, one run.

    .venv/bin/python bench/zero_overhead.py [--device cuda|cpu] [--out bench/zero_overhead.json]

One process (a single GPU, or the CPU): the yardstick runs before and after; bigan's own
models at the yardstick's sizes run through Trainer.train_step with the plain backend and
with G and D in ZeRO-1, 2 and 3 engines. GPU cases: dcgan64 batch 256 and resnet128 batch 64,
bf16, channels_last (the yardstick and the plain path; ZeRO keeps weights contiguous, so the
DeepSpeed cases run without it). CPU cases: fp32 and smaller, as in bench/train_step.py.
"""
import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import ROOT, bigan_loop, compare  # noqa: E402


def single_process_group():
    """DeepSpeed needs torch.distributed even for one process: the environment it initializes from."""
    if "MASTER_PORT" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")


def warm_deepspeed(device):
    """Build and run DeepSpeed's ops once (a JIT build can take minutes) before anything is timed."""
    single_process_group()
    start = time.perf_counter()
    bigan_loop("dcgan64", 2, "fp32", False, 4, 1, 1, False, False, device,
               (f"--train.deepspeed={ROOT}/launch_configs/deepspeed/zero1.json",))
    print(json.dumps({"run": "warm_deepspeed", "seconds": round(time.perf_counter() - start, 1)}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cuda":
        cases = [("dcgan64", 256, "bf16", True, 64, 30, 10), ("resnet128", 64, "bf16", True, 64, 30, 10)]
    else:
        cases = [("dcgan64", 64, "fp32", False, 64, 8, 3), ("resnet128", 8, "fp32", False, 16, 5, 2)]
    backends = {"plain": ()} | {f"zero{n}": (f"--train.deepspeed={ROOT}/launch_configs/deepspeed/zero{n}.json",)
                                for n in (1, 2, 3)}
    def measure(case, extra):
        return bigan_loop(*case, False, False, args.device, extra)

    warm_deepspeed(args.device)
    rows = [compare(case, args.device, {name: (lambda extra=extra, case=case: measure(case, extra))
                                        for name, extra in backends.items()}) for case in cases]
    if args.out:
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
