"""How good the default demo gets, and how fast: the measurement behind launch_configs/experiments/demo.yaml.

    .venv/bin/python bench/demo_quality.py --kimg 60 --out bench/demo_quality.jsonl [CANDIDATE ...]

Each candidate is a set of overrides on top of the demo preset. It is trained the way `make train`
trains (`accelerate launch --config_file launch_configs/accelerate/cpu.yaml bigan/train.py`),
timed, then scored with bigan's own tools on EMA-G:

- `bigan-eval --metrics fid` against the demo set at the candidate's resolution, with 8x8 colour
  thumbnails as the features (no download; it ranks colour and layout, what makes a sample
  read as a landscape at a glance; not comparable with Inception FIDs);
- the pixel spread (std of every pixel value across 1000 samples, 0-255), which a run that draws
  grey bands keeps low: real demo images have about 47 at 64 px.

One JSON line per candidate, printed as soon as it is measured.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

SN_HINGE = ["--model.d_norm=spectral", "--loss.name=hinge", "--loss.r1=0"]  # the defaults before 2026-11-27
CANDIDATES = {  # overrides on top of bigan's defaults (D without normalization, BCE, lazy R1 0.2, betas (0, 0.99))
    "sn_hinge": [*SN_HINGE, "--train.g_betas=[0.5, 0.999]", "--train.d_betas=[0.5, 0.999]"],
    "sn_hinge_betas0": SN_HINGE,
    "sn_hinge_lr4e-4": [*SN_HINGE, "--train.g_lr=4e-4", "--train.d_lr=4e-4"],
    "sn_hinge_32px": [*SN_HINGE, "--data.resolution=32"],
    "default": [],
    "32px": ["--data.resolution=32"],
    "lsgan": ["--loss.name=lsgan"],
    "lr4e-4": ["--train.g_lr=4e-4", "--train.d_lr=4e-4"],
    "batch32": ["--train.batch_size=32"],
    "batch16": ["--train.batch_size=16"],
    "r1_0.05": ["--loss.r1=0.05"],
    "pack4": ["--loss.pack=4"],  # what covered all 1000 modes of bench/modes.py on a GPU
    "pack2": ["--loss.pack=2"],
    "nopack": ["--loss.pack=1"],
    "resize": ["--model.g_upsample=resize"],  # no transposed convs in G: no checkerboard
}


class Thumbnails(torch.nn.Module):
    """uint8 NCHW at any size -> the 8x8 colour thumbnail (192 numbers in [-1, 1]): colour and layout."""

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x.float() / 127.5 - 1, 8).flatten(1)


def spread(images: np.ndarray) -> float:
    """Std over samples of each pixel value, averaged over pixels (0-255 scale)."""
    return float(images.astype(np.float32).std(axis=0).mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidates", nargs="*", default=list(CANDIDATES), help=f"any of {', '.join(CANDIDATES)}")
    parser.add_argument("--kimg", type=float, default=60)
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    parser.add_argument("--keep", type=Path, default=None, help="keep run folders under this folder")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="bigan-demo-quality-"))
    extractor = work / "thumbnails.pt"
    work.mkdir(parents=True, exist_ok=True)
    torch.jit.script(Thumbnails()).save(str(extractor))
    from bigan.data.demo import ensure_demo_shards, render_landscape

    for name in args.candidates:
        overrides = CANDIDATES[name] + [f"--train.kimg={args.kimg}", f"--run.dir={work / name}"]
        resolution = int(next((o.split("=")[1] for o in overrides if o.startswith("--data.resolution=")), 64))
        manifest = ensure_demo_shards(10_000, resolution)
        shutil.rmtree(work / name, ignore_errors=True)  # a fresh run (bigan refuses a used run dir)
        start = time.time()
        subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch_configs/accelerate/cpu.yaml",
                        "bigan/train.py", "--config", "launch_configs/experiments/demo.yaml", "--run.progress=false",
                        *overrides], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        seconds = time.time() - start
        samples = work / name / "samples.npz"
        subprocess.run([sys.executable, "-m", "bigan.sample", "--checkpoint", str(work / name), "--n", "1000",
                        "--out", str(samples)], check=True, stdout=subprocess.DEVNULL)
        scored = subprocess.run([sys.executable, "-m", "bigan.metrics.evaluate", "--checkpoint", str(work / name), "--data", str(manifest),
                                 "--extractor", str(extractor), "--metrics", "fid", "--n", "2000"],
                                check=True, capture_output=True, text=True)
        fid = json.loads(scored.stdout.strip().splitlines()[-1])["fid"]
        real = np.stack([render_landscape(0, i, resolution) for i in range(1000)])
        row = {"candidate": name, "overrides": CANDIDATES[name], "kimg": args.kimg, "resolution": resolution,
               "train_s": round(seconds, 1), "img_per_s": round(args.kimg * 1000 / seconds, 1),
               "fid_thumb8": round(fid, 2), "pixel_spread": round(spread(np.load(samples)["images"]), 1),
               "real_pixel_spread": round(spread(real), 1), "cores": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d")}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
