"""Mode coverage: bigan's own Stacked-MNIST-style benchmark (1000 modes at 32 px), through its real tools.

    .venv/bin/python bench/modes.py --kimg 100 --channels 32 --out bench/modes.jsonl default packed   # CPU, small
    python bench/modes.py --kimg 2000 --seconds 420 --parallel --eval-every 250 --precision bf16 \
        --out "$OUT/modes.jsonl" default packed ...                                          # the full run (GPU)

1. Data: ten procedural glyph classes (bigan/data/glyphs.py: varied stroke, position, scale,
   rotation, shear; no handwriting data set), three stacked on R, G, B per image, so 1000 modes;
   `--n` images written by bigan's shard writer (PNG: JPEG's chroma subsampling would mix the
   channels) once into WORK/data/.
2. A glyph classifier (a small CNN) trained on freshly rendered single glyphs; its held-out
   accuracy is printed. It is saved as TorchScript (WORK/classifier.pt) that maps uint8 NCHW
   images to 1000 mode logits (the sum of the three channels' class log-probabilities), the
   format `bigan-eval --modes` and `eval.modes` take.
3. The real data's own score: 26,000 held-back images (another seed) as a .npz, scored by
   `bigan-eval --samples real.npz --modes classifier.pt`.
4. Per candidate (a set of overrides): `accelerate launch bigan/train.py --data.shards=WORK/data
   --data.resolution=32 --data.flip=false ...` (`--resolution 64`: the same stacks upsampled as they
   load, and samples area-downsampled to 32 px by the classifier: the same 1000 modes at 64 px), then `bigan-sample --n 26000 --out samples.npz`
   (EMA-G), then `bigan-eval --samples samples.npz --modes classifier.pt`.

With --parallel the candidates train side by side on the one device (a 32 px model leaves most of
a GPU idle); --seconds stops each one through its run dir's STOP file (checkpoint, exit 0, as on
preemption) and the row records how far it got; --eval-every also scores EMA-G in the loop
(`eval.modes`), one row per evaluation, read from the run's log: the learning curve.

One JSON line per candidate (modes reached of 1000, KL(generated || uniform), images seen,
seconds), printed as soon as it exists. WORK (default ~/.cache/bigan/modes) keeps the data and
the classifier between runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bigan.data import glyphs  # noqa: E402

def _cifar(channel_base, channel_max, w_dim, g_lr=0.002, d_lr=0.0025, more=()):
    """StyleGAN2 with the official 'cifar' config's settings (gamma 0.01, no path length, a 2-layer mapping, no
    style mixing, minibatch-std groups of 32, G's Adam as its lazy interval leaves it: 0.002, beta2 0.99^0.8),
    at a width of its own."""
    return ["--model.arch=stylegan2", "--loss.pack=1", "--loss.name=bce", "--loss.r1=0.01", "--stylegan2.pl_weight=0",
            "--stylegan2.mapping_layers=2", f"--stylegan2.w_dim={w_dim}", f"--stylegan2.channel_base={channel_base}",
            f"--stylegan2.channel_max={channel_max}", "--stylegan2.style_mixing=0", "--stylegan2.mbstd_group=32",
            f"--train.g_lr={g_lr}", "--train.g_betas=[0, 0.9919919678]", f"--train.d_lr={d_lr}", *more]


SAMPLES = 26_000
CANDIDATES = {  # overrides on top of bigan's defaults (since the H200 run of 2026-11-27: packs of 4)
    "default": [],
    "unpacked": ["--loss.pack=1"],  # the default before that run ("default" in its rows)
    "sn_hinge": ["--model.d_norm=spectral", "--loss.name=hinge", "--loss.r1=0", "--loss.pack=1",  # before 2026-11-27
                 "--train.g_betas=[0.5, 0.999]", "--train.d_betas=[0.5, 0.999]"],
    "sn_hinge_packed": ["--model.d_norm=spectral", "--loss.name=hinge", "--loss.r1=0", "--loss.pack=2",
                        "--train.g_betas=[0.5, 0.999]", "--train.d_betas=[0.5, 0.999]"],
    "packed": ["--loss.pack=2"],
    "packed4": ["--loss.pack=4"],
    "r1_1": ["--loss.r1=1.0"],
    "r1_0.05": ["--loss.r1=0.05"],
    "d2": ["--loss.d_steps=2"],
    "ema_2kimg": ["--train.ema_kimg=2"],
    "no_ema_rampup": ["--train.ema_rampup=0"],
    "batch128": ["--train.batch_size=128"],
    "lr1e-4": ["--train.g_lr=1e-4", "--train.d_lr=1e-4"],
    "ttur": ["--train.g_lr=1e-4", "--train.d_lr=4e-4"],
    "betas0.5": ["--train.g_betas=[0.5, 0.999]", "--train.d_betas=[0.5, 0.999]"],
    "dbatch": ["--model.d_norm=batch", "--loss.r1=0"],  # DCGAN's D: what gave the demo its suns (2026-11-28)
    # StyleGAN2 with some of its official 'cifar' config (32 px: gamma 0.01, no path length, a 2-layer mapping,
    # lr 0.0025), but bigan's style mixing 0.9 and minibatch-std groups of 4 (the official cifar: 0 and 32) and
    # G's Adam uncorrected (the official: 0.002, beta2 0.99^0.8), narrowed: channels min(2048 / res, 128), so 64
    # at 32 px, w 128 (--channels does not apply)
    "stylegan2": ["--model.arch=stylegan2", "--loss.pack=1", "--loss.name=bce", "--loss.r1=0.01", "--stylegan2.pl_weight=0",
                  "--stylegan2.mapping_layers=2", "--stylegan2.w_dim=128", "--stylegan2.channel_base=2048",
                  "--stylegan2.channel_max=128", "--train.g_lr=0.0025", "--train.d_lr=0.0025"],
    "stylegan2_r1_1": ["--model.arch=stylegan2", "--loss.pack=1", "--loss.name=bce", "--loss.r1=1.0",
                       "--stylegan2.pl_weight=0", "--stylegan2.mapping_layers=2", "--stylegan2.w_dim=128",
                       "--stylegan2.channel_base=2048", "--stylegan2.channel_max=128", "--train.g_lr=0.0025",
                       "--train.d_lr=0.0025"],  # (gamma 1 peaked at 3x the modes of 0.01 at the CPU width)
    # the same with the official cifar config's remaining settings (no style mixing, minibatch-std groups of 32,
    # G's Adam 0.002 with beta2 0.99^0.8): what its CPU-width twin stylegan2_cpu_cifar did best with
    "stylegan2_cifar": _cifar(2048, 128, 128),
    # and at a quarter of its learning rates (what kept the CPU-width model climbing, stylegan2_cpu_cifar_lr0.0005)
    "stylegan2_cifar_lr0.0005": _cifar(2048, 128, 128, g_lr=0.0005, d_lr=0.000625),
    "stylegan2_ada": ["--model.arch=stylegan2", "--loss.pack=1", "--loss.name=bce", "--loss.r1=0.01",
                      "--stylegan2.pl_weight=0", "--stylegan2.mapping_layers=2", "--stylegan2.w_dim=128",
                      "--stylegan2.channel_base=2048", "--stylegan2.channel_max=128", "--train.g_lr=0.0025",
                      "--train.d_lr=0.0025", "--augment.kind=ada"],
    # the same at the width of --channels 32 (32 channels at every resolution), for a CPU's budget
    "stylegan2_cpu": ["--model.arch=stylegan2", "--loss.pack=1", "--loss.name=bce", "--loss.r1=0.01",
                      "--stylegan2.pl_weight=0", "--stylegan2.mapping_layers=2", "--stylegan2.w_dim=64",
                      "--stylegan2.channel_base=1024", "--stylegan2.channel_max=32", "--train.g_lr=0.0025",
                      "--train.d_lr=0.0025"],
    # the same with a stronger R1 (the cpu width collapsed to 15-30 modes from 100 kimg on at gamma 0.01)
    "stylegan2_cpu_r1_0.1": ["--model.arch=stylegan2", "--loss.pack=1", "--loss.name=bce", "--loss.r1=0.1",
                             "--stylegan2.pl_weight=0", "--stylegan2.mapping_layers=2", "--stylegan2.w_dim=64",
                             "--stylegan2.channel_base=1024", "--stylegan2.channel_max=32", "--train.g_lr=0.0025",
                             "--train.d_lr=0.0025"],
    "stylegan2_cpu_r1_1": ["--model.arch=stylegan2", "--loss.pack=1", "--loss.name=bce", "--loss.r1=1.0",
                           "--stylegan2.pl_weight=0", "--stylegan2.mapping_layers=2", "--stylegan2.w_dim=64",
                           "--stylegan2.channel_base=1024", "--stylegan2.channel_max=32", "--train.g_lr=0.0025",
                           "--train.d_lr=0.0025"],
    # the official cifar config's remaining settings at the CPU width: no style mixing, minibatch-std groups of
    # 32, G's Adam as its lazy interval leaves it (0.002, beta2 0.99^0.8)
    "stylegan2_cpu_cifar": _cifar(1024, 32, 64),
    # and with ADA, p moving 5 times as fast as its default (augment.kimg 100: a short CPU run)
    "stylegan2_cpu_cifar_ada": _cifar(1024, 32, 64, more=("--augment.kind=ada", "--augment.kimg=100")),
    # and twice as wide (64 channels at every resolution)
    "stylegan2_cpu64_cifar": _cifar(2048, 64, 64),
    # and at a quarter and two fifths of its learning rates (equalized lr: a narrow layer's weights move
    # more per step)
    "stylegan2_cpu_cifar_lr0.0005": _cifar(1024, 32, 64, g_lr=0.0005, d_lr=0.000625),
    "stylegan2_cpu_cifar_lr0.001": _cifar(1024, 32, 64, g_lr=0.0008, d_lr=0.001),
    # with D judging packs of 4 (PacGAN, what held packed DCGAN's modes; not in the official StyleGAN2):
    # minibatch std then groups min(32, 64 / 4) = 16 packs
    "stylegan2_cpu_cifar_pack4": _cifar(1024, 32, 64, more=("--loss.pack=4",)),
    "stylegan2_cpu_cifar_lr0.0005_pack4": _cifar(1024, 32, 64, g_lr=0.0005, d_lr=0.000625, more=("--loss.pack=4",)),
    "stylegan2_cpu64_cifar_pack4": _cifar(2048, 64, 64, more=("--loss.pack=4",)),
    "stylegan2_cifar_pack4": _cifar(2048, 128, 128, more=("--loss.pack=4",)),
    # packed, with a stronger R1 (unpacked, gamma 1 gave the CPU width its highest early peak: 328 modes at 25 kimg)
    "stylegan2_cpu_cifar_pack4_r1_0.1": _cifar(1024, 32, 64, more=("--loss.pack=4", "--loss.r1=0.1")),
    "stylegan2_cpu_cifar_pack4_r1_1": _cifar(1024, 32, 64, more=("--loss.pack=4", "--loss.r1=1.0")),
    "stylegan2_cpu_cifar_pack4_r1_10": _cifar(1024, 32, 64, more=("--loss.pack=4", "--loss.r1=10.0")),
    "stylegan2_cpu_cifar_pack8_r1_1": _cifar(1024, 32, 64, more=("--loss.pack=8", "--loss.r1=1.0")),
    # its GPU-width twin (the best packed setting at the CPU width, 2026-12-03)
    "stylegan2_cifar_pack4_r1_1": _cifar(2048, 128, 128, more=("--loss.pack=4", "--loss.r1=1.0")),
}


class GlyphNet(nn.Module):
    """One 32 px glyph (1 channel, [0, 1]) -> 10 class logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, glyphs.CLASSES))

    def forward(self, x):
        return self.body(x)


class StackedClassifier(nn.Module):
    """uint8 NCHW RGB images -> 1000 mode logits: log p(c0 | R) + log p(c1 | G) + log p(c2 | B),
    ordered as mode = 100 * c0 + 10 * c1 + c2."""

    def __init__(self, net: GlyphNet):
        super().__init__()
        self.net = net

    def forward(self, images):
        x = images.float() / 255
        if x.shape[-1] != glyphs.SIZE:
            x = nn.functional.interpolate(x, size=(glyphs.SIZE, glyphs.SIZE), mode="area")
        n = x.shape[0]
        lp = torch.log_softmax(self.net(x.reshape(n * 3, 1, glyphs.SIZE, glyphs.SIZE)), 1).reshape(n, 3, 10)
        return (lp[:, 0, :, None, None] + lp[:, 1, None, :, None] + lp[:, 2, None, None, :]).reshape(n, -1)


def train_classifier(path: Path, n_train: int = 20_000, n_test: int = 5_000, epochs: int = 3) -> float:
    """Train GlyphNet on fresh glyphs, save the stacked classifier as TorchScript; the held-out accuracy."""
    torch.manual_seed(0)
    batch = min(128, n_train)
    x, y = parallel_glyphs(seed=7, n=n_train)
    xt, yt = parallel_glyphs(seed=8, n=n_test)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, y, xt, yt = (torch.from_numpy(a).to(device) for a in (x[:, None], y, xt[:, None], yt))
    net = GlyphNet().to(device)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    steps = epochs * (n_train // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    for epoch in range(epochs):
        order = torch.randperm(n_train, device=device)
        for i in range(n_train // batch):
            idx = order[i * batch:(i + 1) * batch]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((torch.cat([net(xt[i:i + 1000]).argmax(1) for i in range(0, n_test, 1000)]) == yt)
                         .float().mean())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(StackedClassifier(net.cpu())).save(str(path))
    return accuracy


def _glyph_chunk(args):
    seed, start, n = args
    return glyphs.glyph_batch(seed=seed, start=start, n=n)


def _stacked_chunk(args):
    seed, start, n = args
    return np.stack([glyphs.stacked(seed=seed, index=i)[0] for i in range(start, start + n)])


def _chunked(fn, seed: int, n: int, chunk: int = 1000) -> list:
    """fn over [start, start + chunk) pieces of n, on every core (the same arrays as one call over all n)."""
    import multiprocessing

    pieces = [(seed, start, min(chunk, n - start)) for start in range(0, n, chunk)]
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        return pool.map(fn, pieces)


def parallel_glyphs(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    parts = _chunked(_glyph_chunk, seed, n)
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def _load_stacked(item):
    seed, index = item
    image, _ = glyphs.stacked(seed, index)
    return image, None, f"{index:08d}"


def write_data(out: Path, n: int, seed: int = 0) -> Path:
    """n stacked-glyph images as PNG shards (bigan's shard writer); the manifest path."""
    from bigan.data.shards import ShardOptions, write_shards

    manifest = out / "manifest.json"
    if not manifest.exists():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # a run that was stopped while writing
        tmp.mkdir(parents=True)
        options = ShardOptions(resolution=glyphs.SIZE, format="png", maxcount=10_000, workers=os.cpu_count() or 1)
        write_shards([(seed, i) for i in range(n)], _load_stacked, tmp, options, source=f"stacked glyphs (seed {seed})")
        tmp.rename(out)
    return manifest


def score(npz: Path, classifier: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "bigan.metrics.evaluate", "--samples", str(npz), "--modes", str(classifier)],
                            check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(result.stdout.strip().splitlines()[-1])


def emit(row: dict, out: Path | None):
    row = {**row, "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidates", nargs="*", default=["default", "packed"], help=f"of {', '.join(CANDIDATES)}")
    parser.add_argument("--kimg", type=float, default=100, help="training length per candidate")
    parser.add_argument("--n", type=int, default=60_000, help="training images")
    parser.add_argument("--precision", default="no", help="train.precision")
    parser.add_argument("--samples", type=int, default=SAMPLES, help="samples scored per candidate (and real images)")
    parser.add_argument("--glyphs", type=int, default=20_000, help="glyphs the classifier trains on")
    parser.add_argument("--resolution", type=int, default=32, choices=(32, 64),
                        help="training resolution: 64 trains on the 32 px stacks upsampled (bicubic) as they load; "
                             "the classifier scores samples area-downsampled to 32 px")
    parser.add_argument("--channels", type=int, default=64, help="G and D base width (64: as the issue's H200 run)")
    parser.add_argument("--work", type=Path, default=None, help="data, classifier and runs (default $BIGAN_CACHE/modes)")
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    parser.add_argument("--seconds", type=float, default=0, help="stop each candidate after this long (its "
                        "checkpoint is scored; the row says how far it got); 0 = run to --kimg")
    parser.add_argument("--parallel", action="store_true", help="train the candidates at the same time, on one device")
    parser.add_argument("--eval-every", type=float, default=0, help="also score EMA-G in the loop every N kimg "
                        "(eval.modes; one row each: the learning curve)")
    parser.add_argument("--launch-config", default=None, help="Accelerate YAML (default: cpu.yaml without CUDA, "
                        "single_gpu.yaml with)")
    args = parser.parse_args()
    unknown = [c for c in args.candidates if c not in CANDIDATES]
    if unknown:
        parser.error(f"unknown candidates {', '.join(unknown)} (choose from {', '.join(CANDIDATES)})")
    from bigan.data.demo import cache_dir

    work = args.work or cache_dir() / "modes"
    classifier = work / "classifier.pt"
    start = time.time()  # the data first: its worker processes fork before this one touches CUDA
    manifest = write_data(work / f"data-n{args.n}", args.n)
    real = work / f"real-{args.samples}.npz"
    if not real.exists():
        np.savez(real, images=np.concatenate(_chunked(_stacked_chunk, seed=1, n=args.samples)))
    data_seconds = time.time() - start
    if not classifier.exists():
        start = time.time()
        accuracy = train_classifier(classifier, n_train=args.glyphs)
        emit({"step": "classifier", "held_out_accuracy": round(accuracy, 4), "seconds": round(time.time() - start)},
             args.out)
    start = time.time()
    real_score = score(real, classifier)
    emit({"step": "real data", **real_score, "seconds": round(data_seconds + time.time() - start)}, args.out)
    launch = args.launch_config or ("launch_configs/accelerate/single_gpu.yaml" if torch.cuda.is_available()
                                    else "launch_configs/accelerate/cpu.yaml")
    batches = [args.candidates] if args.parallel else [[name] for name in args.candidates]
    for names in batches:  # one candidate at a time, or all at once (--parallel: one device, shared)
        runs = {name: start_candidate(name, args, manifest, classifier, work, launch) for name in names}
        deadline = time.time() + args.seconds if args.seconds else None
        ended = {}
        while len(ended) < len(runs):
            for name, (p, _, start) in runs.items():
                if name not in ended and p.poll() is not None:
                    ended[name] = time.time() - start
            if deadline and time.time() > deadline:  # the STOP file: checkpoint and exit 0, as on preemption
                for name, (p, run_dir, _) in runs.items():
                    if p.poll() is None:
                        (run_dir / "STOP").touch()
                deadline = None
            time.sleep(0.5)
        with ThreadPoolExecutor(len(runs)) as pool:  # sampling and scoring side by side too
            list(pool.map(lambda name: finish_candidate(name, runs[name][0], runs[name][1], ended[name], args,
                                                        classifier), runs))


def _log_path(run_dir: Path) -> Path:
    """RUN.log beside the run dir (not with_suffix: a name such as lr0.0005-32px has a dot of its own, and
    two candidates would share one log)."""
    return run_dir.parent / (run_dir.name + ".log")


def start_candidate(name, args, manifest, classifier, work, launch):
    """`accelerate launch bigan/train.py` for one candidate, its output in RUN.log; (process, run dir, start)."""
    run_dir = work / "runs" / f"{name}-{args.resolution}px-{args.channels}ch-{args.kimg:g}kimg"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time (bigan refuses a used run dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    overrides = [f"--model.g_channels={args.channels}", f"--model.d_channels={args.channels}", *CANDIDATES[name]]
    evaluation = ([f"--eval.every_kimg={args.eval_every}", f"--eval.modes={classifier}", "--eval.metrics=",
                   f"--eval.n={args.samples}"] if args.eval_every else [])
    log = open(_log_path(run_dir), "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launch, "bigan/train.py",
         f"--data.shards={manifest}", f"--data.resolution={args.resolution}", "--data.flip=false", f"--train.kimg={args.kimg}",
         f"--train.precision={args.precision}", f"--run.dir={run_dir}", "--run.progress=false",
         "--run.image_every_kimg=50", *evaluation, *overrides],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return process, run_dir, time.time()


def finish_candidate(name, process, run_dir, seconds, args, classifier):
    """Score EMA-G's 26,000 samples (bigan-sample, bigan-eval); one row, plus one per in-loop evaluation."""
    log = _log_path(run_dir).read_text()
    if process.returncode != 0:
        emit({"candidate": name, "error": f"exit {process.returncode}", "log_tail": log[-1500:]}, args.out)
        return
    kimg = args.kimg
    for line in log.splitlines():  # "bigan: done at 1200.0 kimg after ..." or "stopped on request ... at 812.4 kimg ..."
        if line.startswith("bigan: ") and "; generator in " in line:
            kimg = float(line.split(" at ")[-1].split(" kimg")[0])
    for line in log.splitlines():  # the learning curve: "bigan: evaluation at 250.0 kimg: modes 990, kl_modes 0.1"
        if line.startswith("bigan: evaluation at "):
            at, values = line[len("bigan: evaluation at "):].split(" kimg: ")
            row = {k: float(v) for k, v in (item.split(" ") for item in values.split(", "))}
            emit({"candidate": name, "at_kimg": float(at), "modes": row.get("modes"), "kl_modes": row.get("kl_modes"),
                  "resolution": args.resolution, "n": args.samples, "in_loop": True}, args.out)
    samples = run_dir / "samples.npz"
    subprocess.run([sys.executable, "-m", "bigan.sample", "--checkpoint", str(run_dir), "--n", str(args.samples),
                    "--out", str(samples)], check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    result = score(samples, classifier)
    emit({"candidate": name, "overrides": CANDIDATES[name], "resolution": args.resolution, "channels": args.channels, "modes": result["modes"],
          "kl_modes": round(result["kl_modes"], 3), "kimg": kimg, "kimg_asked": args.kimg, "precision": args.precision,
          "train_s": round(seconds, 1), "img_per_s": round(kimg * 1000 / seconds), "parallel": args.parallel}, args.out)

if __name__ == "__main__":
    main()
