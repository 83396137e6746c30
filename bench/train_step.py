"""bigan's training iteration beside the plain-PyTorch yardstick, same batch and precision, one run.

    .venv/bin/python bench/train_step.py [--device cpu|cuda] [--out bench/train_step.json]

For each case the yardstick (../shared/bench/reference_gan.py, hinge loss, Adam (0, 0.999),
synthetic in-memory images) runs in a subprocess before and after bigan, and bigan runs the
same iteration (one D step, one G step) in-process through Trainer.train_step on in-memory
batches, so only the loop differs. Two ways:
  * yardstick modules   the yardstick's own G and D driven by bigan's loop
  * bigan models        bigan's dcgan / resnet at the yardstick's sizes
bigan's EMA is off (the yardstick has none); a third row per case has it on.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# the yardstick beside the checkout; BIGAN_YARDSTICK names a copy (bench/gpu_session.sh carries one)
YARDSTICK = Path(os.environ.get("BIGAN_YARDSTICK", ROOT.parent / "shared" / "bench" / "reference_gan.py"))
sys.path.insert(0, str(YARDSTICK.parent))


class TakesLabels(torch.nn.Module):
    """Lets an unconditional G or D be called as m(x, y) like bigan's models."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x, y=None):
        return self.module(x)


def yardstick(arch, batch, precision, channels_last, ch, steps, warmup, device):
    cmd = [sys.executable, str(YARDSTICK), "--arch", arch, "--batch", str(batch), "--precision", precision,
           "--ch", str(ch), "--steps", str(steps), "--warmup", str(warmup), "--device", device]
    out = subprocess.run(cmd + (["--channels-last"] if channels_last else []), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bigan_loop(arch, batch, precision, channels_last, ch, steps, warmup, use_yardstick_modules, ema, device,
               extra=()):
    """Median ms, img/s and peak device memory of Trainer.train_step; `extra` are more config
    overrides (e.g. a DeepSpeed JSON)."""
    from accelerate import Accelerator
    from reference_gan import ARCHS

    from bigan.config import load_config
    from bigan.trainer import Trainer

    resolution = 64 if arch == "dcgan64" else 128
    overrides = [f"--model.arch={'dcgan' if arch == 'dcgan64' else 'resnet'}", f"--data.resolution={resolution}",
                 f"--model.g_channels={ch}", f"--model.d_channels={ch}", "--model.z_dim=128", "--loss.name=hinge",
                 "--loss.r1=0", "--loss.pack=1", "--model.d_norm=batch",  # the yardstick: hinge, no R1, BatchNorm in DCGAN's D
                 f"--train.batch_size={batch}", f"--train.precision={'no' if precision == 'fp32' else precision}",
                 "--train.g_betas=[0.0,0.999]", "--train.d_betas=[0.0,0.999]", f"--train.ema_kimg={10 if ema else 0}",
                 f"--train.channels_last={str(channels_last).lower()}", "--run.dir=/tmp/bigan-bench-run", *extra]
    config = load_config(None, overrides)
    accelerator = Accelerator(cpu=device == "cpu")
    if accelerator.device.type == "cuda":  # peak memory of this run alone
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    family = None
    if use_yardstick_modules:  # the family of model.arch, with the yardstick's own G and D
        from bigan import families

        class Yardstick(families.get(config.model.arch)):
            dcgan_init = False

            def build_pair(self):
                g, d, _ = ARCHS[arch](128, ch)
                return TakesLabels(g), TakesLabels(d)

        family = Yardstick(config)
    trainer = Trainer(config, accelerator, family=family)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    reals = [{"image": (torch.rand(batch, 3, resolution, resolution, device=accelerator.device) * 2 - 1)
              .contiguous(memory_format=memory_format), "label": None} for _ in range(4)]

    def batches():
        while True:
            yield from reals

    ms = median_step_ms(trainer, batches(), steps, warmup)
    peak = torch.cuda.max_memory_allocated() / 2**30 if accelerator.device.type == "cuda" else None
    return {"ms_per_iter": round(ms, 3), "images_per_s": round(batch / ms * 1e3, 1),
            "peak_mem_gib": round(peak, 2) if peak is not None else None}


def median_step_ms(trainer, stream, steps: int, warmup: int) -> float:
    """Median wall time of Trainer.train_step in ms, after warmup steps (device synced around each)."""
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        trainer.train_step(stream)
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step(stream)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def compare(case, device, runs: dict) -> dict:
    """One result row: the yardstick before and after the runs (name -> callable giving bigan_loop's dict).

    Each run's own JSON line is printed as soon as it is measured (against the yardstick's first
    figure), so a crash in a later run loses nothing; the row, against the mean of both, follows.
    """
    before = yardstick(*case, device)
    head = {"arch": case[0], "batch": case[1], "precision": case[2], "channels_last": case[3], "ch": case[4],
            "device": before["device"]}
    print(json.dumps({**head, "run": "yardstick", **before}), flush=True)
    results = {}
    for name, run in runs.items():
        try:
            results[name] = run()
        except Exception as exc:  # noqa: BLE001 - report it and go on with the next backend
            print(json.dumps({**head, "run": name, "error": f"{type(exc).__name__}: {exc}"[:500]}), flush=True)
            continue
        print(json.dumps({**head, "run": name, **results[name],
                          "ratio": round(results[name]["images_per_s"] / before["images_per_s"], 3)}), flush=True)
    after = yardstick(*case, device)
    reference = (before["images_per_s"] + after["images_per_s"]) / 2
    row = {**head, "yardstick_img_per_s": [before["images_per_s"], after["images_per_s"]],
           "yardstick_peak_mem_gib": before["peak_mem_gib"],
           **{f"{k}_img_per_s": v["images_per_s"] for k, v in results.items()},
           **{f"{k}_ratio": round(v["images_per_s"] / reference, 3) for k, v in results.items()},
           **{f"{k}_peak_mem_gib": v["peak_mem_gib"] for k, v in results.items()}}
    print(json.dumps(row), flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cuda":  # the yardstick's sizes
        cases = [("dcgan64", 256, "bf16", True, 64, 30, 10), ("resnet128", 64, "bf16", True, 64, 30, 10)]
    else:  # CPU: fp32, narrower/smaller so the run takes minutes, not hours
        cases = [("dcgan64", 64, "fp32", False, 64, 10, 3), ("resnet128", 8, "fp32", False, 16, 6, 2)]
    rows = []
    for case in cases:
        runs = {"yardstick_modules": lambda: bigan_loop(*case, True, False, args.device),
                "bigan_models": lambda: bigan_loop(*case, False, False, args.device),
                "bigan_models_with_ema": lambda: bigan_loop(*case, False, True, args.device)}
        rows.append(compare(case, args.device, runs))
    if args.out:
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
