"""Where a ZeRO engine's step spends its time, beyond the math: tiny models, so fixed per-step cost shows.

    .venv/bin/python bench/zero_profile.py [--device cpu|cuda] [--arch resnet|dcgan] [--top 12]

One process. For the plain backend and ZeRO-1/2/3 it times Trainer.train_step on a model so
small that the arithmetic is negligible (per-step bookkeeping, hooks, host syncs, allocations),
then profiles ZeRO-3's steps with cProfile and prints the functions with the most time of their
own (tottime), how many Tensor.item() calls (host reads) a step makes, and whether each
engine's ZeRO-3 module trace is complete (only then does DeepSpeed prefetch parameters; while
it is not, every top-level forward re-records it and checks it across ranks).
"""
import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import ROOT, median_step_ms  # noqa: E402
from zero_overhead import single_process_group  # noqa: E402


def make_trainer(arch, device, extra):
    from accelerate import Accelerator

    from bigan.config import load_config
    from bigan.trainer import Trainer

    config = load_config(None, [f"--model.arch={arch}", "--data.resolution=32", "--model.g_channels=4",
                                "--model.d_channels=4", "--model.z_dim=8", "--train.batch_size=2",
                                "--train.ema_kimg=10", "--loss.r1=0", "--loss.pack=1", "--run.dir=/tmp/bigan-bench-profile", *extra])
    trainer = Trainer(config, Accelerator(cpu=device == "cpu"))
    reals = {"image": torch.rand(2, 3, 32, 32, device=trainer.device) * 2 - 1, "label": None}

    def batches():
        while True:
            yield reals

    return trainer, batches()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet", choices=["resnet", "dcgan"])
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    backends = {"plain": []} | {f"zero{n}": [f"--train.deepspeed={ROOT}/launch_configs/deepspeed/zero{n}.json"]
                                for n in (1, 2, 3)}
    trainers = {}
    for name, extra in backends.items():
        if extra:
            single_process_group()
        trainers[name] = make_trainer(args.arch, args.device, extra)
        print(f"{name:6s} {median_step_ms(*trainers[name], steps=60, warmup=10):7.2f} ms per train_step ({args.arch}, tiny)", flush=True)

    trainer, stream = trainers["zero3"]
    syncs = {"n": 0}
    original_item = torch.Tensor.item

    def counted_item(self):
        syncs["n"] += 1
        return original_item(self)

    torch.Tensor.item = counted_item
    profile, steps = cProfile.Profile(), 20
    profile.enable()
    for _ in range(steps):
        trainer.train_step(stream)
    profile.disable()
    torch.Tensor.item = original_item
    print(f"\nZeRO-3: {syncs['n'] / steps:.1f} Tensor.item() calls per train_step (G and D steps, EMA)")
    for which in "gd":
        coordinator = trainer.backend.engines[which].optimizer.parameter_offload.get_param_coordinator()
        state = "complete" if coordinator.is_complete_trace() else "not complete (re-recorded every forward)"
        print(f"ZeRO-3 module trace of {which.upper()}: {state}")
    stats = pstats.Stats(profile).sort_stats("tottime")
    stats.print_stats(args.top)


if __name__ == "__main__":
    main()
