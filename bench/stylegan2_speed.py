"""StyleGAN2's training speed and memory: img/s and s/kimg of bigan's whole iteration, per resolution.

    python bench/stylegan2_speed.py [--device cuda] [--res 64 --res 128 --res 256] [--compile both] [--out FILE]
    .venv/bin/python bench/stylegan2_speed.py --device cpu --tiny --iterations 32      # rehearsal on a CPU

Each case builds bigan's Trainer as `bigan.train` does (one process) with model.arch=stylegan2 and runs
Trainer.train_step on in-memory batches (the data stream is measured apart, in end_to_end.py), so all
four phases count at their intervals (Gmain, Greg every 4 on half the batch, D, Dreg every 16): the
figure is the mean over whole multiples of 16 iterations after a warm-up of 16 (and of the compiles).
Cases, at each resolution:
  paper   channel_base 16384 (the official 'paper256' and the FFHQ-U 256 rate of 2.19 s/kimg on 8 A100s,
          about 57 img/s per A100), an 8-layer mapping, batch 64 on the one GPU, R1 gamma 1, path length
  auto    the 'auto' rule for one GPU (stylegan2.auto: batch min(4096 / res, 32), 2-layer mapping)
with train.precision bf16, with and without train.compile. One JSON line per case as soon as it is measured:
img/s (real images D sees per second), s/kimg, ms per iteration, peak GPU memory.
"""
import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {
    "paper": ["--stylegan2.channel_base=16384", "--stylegan2.mapping_layers=8", "--train.batch_size=64", "--loss.r1=1"],
    "auto": ["--stylegan2.auto=true"],
}
TINY = ["--stylegan2.channel_base=256", "--stylegan2.channel_max=16", "--stylegan2.w_dim=32", "--model.z_dim=32",
        "--train.batch_size=8"]


def measure(overrides, device, iterations, run_dir):
    from bigan.config import load_config
    from bigan.train import make_accelerator
    from bigan.trainer import Trainer

    shutil.rmtree(run_dir, ignore_errors=True)
    config = load_config(None, ["--model.arch=stylegan2", "--loss.name=bce", "--loss.pack=1", "--train.g_lr=0.0025",
                                "--train.d_lr=0.0025", "--train.g_betas=[0, 0.99]", "--train.d_betas=[0, 0.99]",
                                *overrides, f"--run.dir={run_dir}", "--run.progress=false"])
    trainer = Trainer(config, make_accelerator(config))
    t, res = config.train, config.data.resolution
    reals = [{"image": torch.rand(t.batch_size, 3, res, res, device=trainer.accelerator.device) * 2 - 1,
              "label": None} for _ in range(4)]

    def stream():
        while True:
            yield from reals

    batches, sync = stream(), (torch.cuda.synchronize if device == "cuda" else (lambda: None))
    for _ in range(16):  # warm-up: every phase (and its compiles) at least once
        trainer.train_step(batches)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iterations):
        trainer.train_step(batches)
    sync()
    ms = (time.perf_counter() - start) / iterations * 1e3
    images = t.batch_size * t.grad_accum * config.loss.d_steps
    return {"batch": t.batch_size, "ms_per_iter": round(ms, 2), "img_per_s": round(images / ms * 1e3, 1),
            "s_per_kimg": round(ms / images, 2),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
            "g_params_m": round(sum(p.numel() for p in trainer.networks["g"].module.parameters()) / 1e6, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--res", type=int, action="append", help="default 64, 128, 256")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="default: paper, auto")
    parser.add_argument("--compile", choices=("no", "yes", "both"), default="both")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--iterations", type=int, default=64, help="measured, a multiple of 16")
    parser.add_argument("--tiny", action="store_true", help="narrow networks (a CPU rehearsal)")
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bigan-sg2-speed-"))
    compiles = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    for compiled in compiles:  # (uncompiled first: each figure is written as soon as it exists)
        for res in args.res or [64, 128, 256]:
            for case in args.case or ["paper", "auto"]:
                overrides = [*CASES[case], *(TINY if args.tiny else []), f"--data.resolution={res}",
                             f"--train.precision={args.precision}", f"--train.compile={str(compiled).lower()}"]
                row = {"case": case, "resolution": res, "precision": args.precision, "compile": compiled,
                       "device": args.device, "date": time.strftime("%Y-%m-%d")}
                try:
                    row.update(measure(overrides, args.device, args.iterations, work / f"{case}{res}"))
                except Exception as exc:  # noqa: BLE001 (the next case may still fit: out of memory, compile errors)
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
