"""How good the default demo gets, and how fast: the measurement behind launch_configs/experiments/demo.yaml.

    .venv/bin/python bench/demo_quality.py --kimg 60 --out bench/demo_quality.jsonl [CANDIDATE ...]

Each candidate is a set of overrides on top of the demo preset. It is trained the way `make train`
trains (`accelerate launch --config_file launch_configs/accelerate/cpu.yaml bigan/train.py`),
timed, then scored with bigan's own tools on EMA-G:

- `bigan-eval --metrics fid` against the demo set at the candidate's resolution, with 8x8 colour
  thumbnails as the features (no download; it ranks colour and layout, what makes a sample
  read as a landscape at a glance; not comparable with Inception FIDs);
- the same with 16x16 thumbnails (768 numbers: a sun or moon is a pixel or two there, a ridgeline a
  step between rows), which 8x8 thumbnails average away;
- the pixel spread (std of every pixel value across 1000 samples, 0-255), which a run that draws
  grey bands keeps low: real demo images have about 47 at 64 px;
- detail: the mean absolute Laplacian of the samples' luma over the real images' (1.0 = as much
  edge as the data: sun discs, ridgelines, trees, shorelines; a blurred sample scores well below 1);
- sun: each image's brightest spot over its surroundings (luma minus its mean over a window an eighth
  of the image wide, the maximum over the image), averaged over images, samples over real (1.0 = as
  bright and compact a sun or moon as the data draws; a sky without one, or a smeared glow, scores low).

One JSON line per candidate, printed as soon as it is measured.

    .venv/bin/python bench/demo_quality.py --probe-d RUN/checkpoints/ckpt-N

instead trains a fresh D (the run's architecture, optimizer settings and batch) to tell real demo
images from 2,000 samples of that checkpoint's G, and prints its held-out accuracy as it goes: a
D that could keep up, against the D of the run, whose loss (TensorBoard `Loss/D`) says how well it
does inside the game (2 ln 2 = 1.386 is chance).
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
import yaml

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "launch_configs" / "experiments" / "demo.yaml"

SN_HINGE = ["--model.d_norm=spectral", "--loss.name=hinge", "--loss.r1=0"]  # the defaults before 2026-11-27
CANDIDATES = {  # overrides on top of the demo preset, launch_configs/experiments/demo.yaml. Since 2026-11-28 that is
    # BatchNorm D without R1 at 32 px, batch 32, 80 kimg (dbatch and r1_0 change nothing on it); the rows of
    # bench/RESULTS.md dated before were measured on the preset of their day (64 px, D without norm + lazy R1 0.2).
    "sn_hinge": [*SN_HINGE, "--train.g_betas=[0.5, 0.999]", "--train.d_betas=[0.5, 0.999]"],
    "sn_hinge_betas0": SN_HINGE,
    "sn_hinge_lr4e-4": [*SN_HINGE, "--train.g_lr=4e-4", "--train.d_lr=4e-4"],
    "sn_hinge_32px": [*SN_HINGE, "--data.resolution=32"],
    "default": [],
    "32px": ["--data.resolution=32"],
    "lsgan": ["--loss.name=lsgan"],
    "lr4e-4": ["--train.g_lr=4e-4", "--train.d_lr=4e-4"],
    "batch64": ["--train.batch_size=64"],
    "batch32": ["--train.batch_size=32"],
    "batch16": ["--train.batch_size=16"],
    "batch8": ["--train.batch_size=8"],  # on CPU the step costs about as much per image at 8 as at 64: 8x the steps
    "r1_0.05": ["--loss.r1=0.05"],
    "pack4": ["--loss.pack=4"],  # what covered all 1000 modes of bench/modes.py on a GPU
    "pack2": ["--loss.pack=2"],
    "nopack": ["--loss.pack=1"],
    "resize": ["--model.g_upsample=resize"],  # no transposed convs in G: no checkerboard
    "transposed": ["--model.g_upsample=transposed"],
    "ch16": ["--model.g_channels=16", "--model.d_channels=16"],
    "ch32": ["--model.g_channels=32", "--model.d_channels=32"],
    "ch64": ["--model.g_channels=64", "--model.d_channels=64"],
    "ch48": ["--model.g_channels=48", "--model.d_channels=48"],
    "dbatch": ["--model.d_norm=batch", "--loss.r1=0"],  # DCGAN's D: BatchNorm, no R1
    "d64": ["--model.d_channels=64"],  # a wider D than G
    "resnet": ["--model.arch=resnet"],
    "lr2e-4": ["--train.g_lr=2e-4", "--train.d_lr=2e-4"],
    "ema_short": ["--train.ema_kimg=2"],
    "ttur": ["--train.g_lr=1e-4", "--train.d_lr=4e-4"],
    "d2": ["--loss.d_steps=2"],
    "betas0.5": ["--train.g_lr=2e-4", "--train.d_lr=2e-4", "--train.g_betas=[0.5, 0.999]", "--train.d_betas=[0.5, 0.999]"],
    "r1_1": ["--loss.r1=1"],
    "r1_0.01": ["--loss.r1=0.01"],  # StyleGAN2-ADA's heuristic 0.0002 * res^2 / batch: 0.013 at 64 px, batch 64
    "r1_0": ["--loss.r1=0"],
    "seed1": ["--train.seed=1"],  # the same settings from other initial weights and latents
    "lr8e-4": ["--train.g_lr=8e-4", "--train.d_lr=8e-4"],
    # DCGAN as published (Radford et al. 2016): BatchNorm in D, no R1, Adam 2e-4 (0.5, 0.999), transposed convs, 64 channels
    "classic": ["--model.d_norm=batch", "--loss.r1=0", "--train.g_lr=2e-4", "--train.d_lr=2e-4",
                "--train.g_betas=[0.5, 0.999]", "--train.d_betas=[0.5, 0.999]", "--model.g_upsample=transposed",
                "--model.g_channels=64", "--model.d_channels=64"],
    # StyleGAN2 as its official 'auto' config on one process (lr 0.0025, betas (0, 0.99), R1 gamma
    # 0.0002 res^2 / batch = 0.0256 at 64 px and batch 32, a 2-layer mapping, path length), narrowed to a CPU's
    # budget: channels min(4096 / res, 128) (4 to 32 px: 128, 64 px: 64), w 128
    "stylegan2": ["--model.arch=stylegan2", "--loss.r1=0.0256", "--train.g_lr=0.0025", "--train.d_lr=0.0025",
                  "--stylegan2.mapping_layers=2", "--stylegan2.w_dim=128", "--stylegan2.channel_base=4096",
                  "--stylegan2.channel_max=128"],
    # the same, narrowed to the DCGAN demo's width (channels min(1024 / res, 32): 32 to 32 px, 16 at 64 px): at 4096
    # it trains at about 2 img/s on one CPU thread, against 27 for the DCGAN preset at 64 px
    "narrow": ["--stylegan2.channel_base=1024", "--stylegan2.channel_max=32", "--stylegan2.w_dim=64"],
    "ada": ["--augment.kind=ada"],  # join with +: stylegan2+ada (target 0.6, ada_kimg 500 as the official;
    "ada_fast": ["--augment.kind=ada", "--augment.kimg=20"],  # p moves 25x faster, for runs of tens of kimg)
    "diffaugment": ["--augment.kind=diffaugment"],  # color, translation, cutout
    "64px": ["--data.resolution=64"],
    "limited2000": ["--data.demo_images=2000"],  # 2,000 training images (scored against the full 10,000)
}


def overrides_of(candidate: str) -> list[str]:
    """A named candidate, or several joined by '+' (e.g. 32px+batch32): their overrides in order."""
    unknown = [name for name in candidate.split("+") if name not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown candidate {unknown[0]!r}; known: {', '.join(CANDIDATES)}")
    return [o for name in candidate.split("+") for o in CANDIDATES[name]]


class Thumbnails(torch.nn.Module):
    """uint8 NCHW at any size -> the size x size colour thumbnail (3 size^2 numbers in [-1, 1])."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x.float() / 127.5 - 1, self.size).flatten(1)


def spread(images: np.ndarray) -> float:
    """Std over samples of each pixel value, averaged over pixels (0-255 scale)."""
    return float(images.astype(np.float32).std(axis=0).mean())


def edge_energy(images: np.ndarray) -> float:
    """Mean absolute 4-neighbour Laplacian of the luma of uint8 NxHxWx3 images (0-255 scale)."""
    luma = images.astype(np.float32).mean(axis=-1)
    lap = 4 * luma[:, 1:-1, 1:-1] - luma[:, :-2, 1:-1] - luma[:, 2:, 1:-1] - luma[:, 1:-1, :-2] - luma[:, 1:-1, 2:]
    return float(np.abs(lap).mean())


def sun_contrasts(images: np.ndarray) -> np.ndarray:
    """Per uint8 HxWx3 image of N: the largest excess of its luma over the local mean (module docstring)."""
    luma = torch.from_numpy(images.astype(np.float32)).mean(-1)[:, None]
    k = max(images.shape[1] // 8, 3) | 1
    local = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(luma, (k // 2,) * 4, mode="reflect"), k, 1)
    return (luma - local).flatten(1).max(1).values.numpy()


def sun_contrast(images: np.ndarray) -> float:
    """The mean of sun_contrasts."""
    return float(sun_contrasts(images).mean())


def thumbnail_fid(checkpoint: Path, manifest: Path, extractor: Path) -> float:
    scored = subprocess.run([sys.executable, "-m", "bigan.metrics.evaluate", "--checkpoint", str(checkpoint), "--data", str(manifest),
                             "--extractor", str(extractor), "--metrics", "fid", "--n", "2000"],
                            check=True, capture_output=True, text=True)
    return json.loads(scored.stdout.strip().splitlines()[-1])["fid"]


def probe_discriminator(checkpoint: Path, steps: int = 300, n: int = 2000):
    """Held-out accuracy of a fresh D trained on real images vs the checkpoint's G samples (module docstring)."""
    from bigan import losses
    from bigan.data.demo import render_landscape
    from bigan.models import build_models
    from bigan.sample import generate, latents, load_generator

    config = yaml.safe_load((checkpoint.parent.parent / "config.yaml").read_text())
    g, model = load_generator(checkpoint, ema=False)  # the G that the run's D was playing against
    fake = generate(g, model, latents(n, model["z_dim"], seed=1, truncation=None))
    res = model["resolution"]
    real = torch.from_numpy(np.stack([render_landscape(0, i, res) for i in range(n)])).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.manual_seed(0)
    _, d = build_models(model["arch"], res, model["z_dim"], model["g_channels"], model["d_channels"],
                        d_norm=model.get("d_norm", "batch"), pack=config["loss"]["pack"])
    t = config["train"]
    opt = torch.optim.Adam(d.parameters(), t["d_lr"], betas=tuple(float(b) for b in t["d_betas"]))
    train, held_out, batch = slice(0, n * 4 // 5), slice(n * 4 // 5, n), t["batch_size"]
    for step in range(steps + 1):
        if step % 50 == 0:
            with torch.no_grad():
                accuracy = ((d(real[held_out]) > 0).float().mean() + (d(fake[held_out]) < 0).float().mean()) / 2
            print(json.dumps({"probe_d": str(checkpoint), "step": step, "held_out_accuracy": round(float(accuracy), 3)}),
                  flush=True)
        pick = torch.randint(0, n * 4 // 5, (batch,))
        loss, _ = losses.d_loss("bce", d(real[train][pick]), d(fake[train][pick]))  # bigan's own D loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidates", nargs="*", default=list(CANDIDATES), help=f"any of (or several joined by +) {', '.join(CANDIDATES)}")
    parser.add_argument("--kimg", type=float, default=60)
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    parser.add_argument("--keep", type=Path, default=None, help="keep run folders under this folder")
    parser.add_argument("--score-every", type=float, default=0, metavar="KIMG",
                        help="checkpoint every KIMG and score each checkpoint (a learning curve), not only the end")
    parser.add_argument("--probe-d", type=Path, default=None, metavar="CHECKPOINT",
                        help="instead: how well a fresh D tells this checkpoint's samples from real images")
    args = parser.parse_args()
    if args.probe_d:
        return probe_discriminator(args.probe_d)
    work = Path(args.keep or tempfile.mkdtemp(prefix="bigan-demo-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    extractors = {size: work / f"thumbnails{size}.pt" for size in (8, 16)}
    for size, path in extractors.items():
        torch.jit.script(Thumbnails(size)).save(str(path))
    from bigan.checkpoint import checkpoints
    from bigan.config import load_config
    from bigan.data.demo import ensure_demo_shards, render_landscape

    for name in args.candidates:
        overrides = overrides_of(name) + [f"--train.kimg={args.kimg}", f"--run.dir={work / name}"]
        if args.score_every:
            overrides += [f"--run.ckpt_every_kimg={args.score_every}", "--run.ckpt_limit=1000"]
        # the resolution the run trains at, as bigan resolves it (preset + overrides), to score against
        resolution = load_config(PRESET, overrides).data.resolution
        manifest = ensure_demo_shards(10_000, resolution)
        real = np.stack([render_landscape(0, i, resolution) for i in range(1000)])
        shutil.rmtree(work / name, ignore_errors=True)  # a fresh run (bigan refuses a used run dir)
        start = time.time()
        subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch_configs/accelerate/cpu.yaml",
                        "bigan/train.py", "--config", str(PRESET), "--run.progress=false",
                        *overrides], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        seconds = time.time() - start
        config = yaml.safe_load((work / name / "config.yaml").read_text())
        # real images D sees per optimizer step (one process): what kimg counts
        per_step = config["train"]["batch_size"] * config["train"]["grad_accum"] * config["loss"]["d_steps"]
        targets = checkpoints(work / name) if args.score_every else [work / name]
        for target in targets:
            kimg = int(target.name.split("-")[1]) * per_step / 1000 if target.name.startswith("ckpt-") else args.kimg
            row = {"candidate": name, "overrides": overrides_of(name), "kimg": kimg, "resolution": resolution,
                   **score(target, manifest, extractors, real),
                   "train_s": round(seconds, 1), "img_per_s": round(args.kimg * 1000 / seconds, 1),
                   "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


def score(checkpoint: Path, manifest: Path, extractors: dict, real: np.ndarray) -> dict:
    """EMA-G of a run folder or checkpoint: thumbnail FIDs, pixel spread and detail (module docstring)."""
    samples = checkpoint.with_name(checkpoint.name + "-samples.npz")  # beside it, not inside a checkpoint
    subprocess.run([sys.executable, "-m", "bigan.sample", "--checkpoint", str(checkpoint), "--n", "1000",
                    "--out", str(samples)], check=True, stdout=subprocess.DEVNULL)
    fakes = np.load(samples)["images"]
    fids = {size: thumbnail_fid(checkpoint, manifest, path) for size, path in extractors.items()}
    return {"fid_thumb8": round(fids[8], 2), "fid_thumb16": round(fids[16], 2),
            "pixel_spread": round(spread(fakes), 1), "real_pixel_spread": round(spread(real), 1),
            "detail": round(edge_energy(fakes) / edge_energy(real), 2),
            "sun": round(sun_contrast(fakes) / sun_contrast(real), 2),
            # samples with a spot as bright as the real images' median sun (real: 0.5 by definition)
            "sun_over_real_median": round(float((sun_contrasts(fakes) > np.median(sun_contrasts(real))).mean()), 2)}


if __name__ == "__main__":
    main()
