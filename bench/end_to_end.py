"""Where an end-to-end iteration's time goes: the data stream, the step, the whole fit, the yardstick.

    .venv/bin/python bench/end_to_end.py [--device cpu|cuda] [--case NAME ...] [--out FILE]

For each case, in one run and with one config:
  (a) loader       the Loader alone: shards -> batches on the device, with the run's workers
  (b) train_step   Trainer.train_step on in-memory batches (bench/train_step.py's loop)
  (c) fit          Trainer.fit from the shards, as `bigan.train` runs it: the time between
                   iterations, logging, sample grids and checkpoints included
  (d) yardstick    ../shared/bench/reference_gan.py at the same arch, batch and precision
                   (where it has that arch; it runs in memory)
Each figure is the median ms per iteration of the second half of its iterations. The part of
(c) that neither (a) nor (b) explains is c - max(a, b): with the loader's workers running
beside the step, an iteration should cost the larger of the two. One JSON line per case is
printed as soon as the case is measured (a crash loses nothing), with peak device memory.

Cases: on CPU, `tiny32` (dcgan, 32 px, 4 channels, batch 2, fp32: the model costs little, so
fixed costs show) with 0, 1 and 2 workers; on a GPU, `dcgan64` (the dcgan64-gpu.yaml preset on
the 64 px JPEG demo set, batch 256) and `dcgan32` (64 channels, batch 64, 32 px PNG shards with
labels), the two runs of the issue that found the fixed cost.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import ROOT, YARDSTICK, yardstick  # noqa: E402

CASES = {
    # name: (config overrides, yardstick case (arch, batch, precision, channels_last, ch) or None, shards)
    "tiny32": (["--data.resolution=32", "--model.g_channels=4", "--model.d_channels=4", "--train.batch_size=2"],
               None, ("jpg", 32)),
    "dcgan64": (["--config", str(ROOT / "launch_configs/experiments/dcgan64-gpu.yaml")],
                ("dcgan64", 256, "bf16", True, 64), ("jpg", 64)),
    "dcgan32": (["--data.resolution=32", "--model.g_channels=64", "--model.d_channels=64", "--train.precision=bf16",
                 "--train.channels_last=true", "--data.workers=6"], None, ("png", 32)),
}
# what may help launch-bound small models (issue 15): the same case with torch.compile
CASES["dcgan32_compile"] = (CASES["dcgan32"][0] + ["--train.compile=true"], None, ("png", 32))


def make_shards(fmt: str, resolution: int, n: int, root: Path) -> Path:
    """The demo landscapes as shards: JPEG (as the demo set) or PNG with a class label per image."""
    from bigan.data.demo import ensure_demo_shards, render_landscape
    from bigan.data.shards import ShardOptions, write_shards

    if fmt == "jpg":
        return ensure_demo_shards(n, resolution, root=root, progress=False)
    out = root / f"landscapes-png-{resolution}px-n{n}"
    if not (out / "manifest.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        options = ShardOptions(resolution=resolution, format="png", maxcount=max(n // 24, 1),
                               workers=os.cpu_count() or 1, progress=False)
        write_shards([(i, resolution) for i in range(n)], _png_item, out, options, source="bench: demo as PNG",
                     label_names=[str(k) for k in range(10)])
    return out / "manifest.json"


def _png_item(item):
    from bigan.data.demo import render_landscape

    index, resolution = item
    return render_landscape(0, index, resolution), index % 10, f"{index:08d}"


def second_half_median_ms(times: list) -> float:
    return statistics.median(times[len(times) // 2:]) * 1e3


def build(args_list, device, run_dir):
    from bigan.config import load_config
    from bigan.train import make_accelerator
    from bigan.trainer import Trainer

    config_file, overrides = None, list(args_list)
    if overrides[:1] == ["--config"]:
        config_file, overrides = overrides[1], overrides[2:]
    shutil.rmtree(run_dir, ignore_errors=True)
    # no R1 (bigan's default since this bench was written): the fixed cost per iteration stays comparable
    # no R1 and no packing (bigan's defaults since): the yardstick has neither
    config = load_config(config_file, ["--loss.r1=0", "--loss.pack=1", *overrides, f"--run.dir={run_dir}", "--run.progress=false"])
    return config, make_accelerator(config), Trainer  # as bigan.train builds it (TensorBoard on)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure_loader(config, accelerator, iterations: int) -> float:
    """(a) ms per batch of the Loader alone, batches on the device (median of the second half)."""
    from bigan import families
    from bigan.training.data import build_loader

    batches = iter(build_loader(families.build(config), accelerator))
    times, last = [], None
    for _ in range(iterations):
        next(batches)["image"].sum().item()  # waits for the batch's device work, as a step would
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
    return second_half_median_ms(times)


def measure_step(config, accelerator, trainer_class, iterations: int) -> float:
    """(b) ms per Trainer.train_step on in-memory batches (device synced around each)."""
    trainer = trainer_class(config, accelerator)
    t, res = config.train, config.data.resolution
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    reals = [{"image": (torch.rand(t.batch_size, 3, res, res, device=accelerator.device) * 2 - 1)
              .contiguous(memory_format=memory_format), "label": None} for _ in range(4)]

    def stream():
        while True:
            yield from reals

    batches, times = stream(), []
    for _ in range(iterations):
        start = time.perf_counter()
        trainer.train_step(batches)
        sync(accelerator.device.type)
        times.append(time.perf_counter() - start)
    return second_half_median_ms(times)


def measure_fit(config, accelerator, trainer_class, iterations: int) -> float:
    """(c) ms per iteration of Trainer.fit from shards: the time between successive train_steps."""
    t = config.train
    config.train.kimg = iterations * t.batch_size * t.grad_accum * config.loss.d_steps * accelerator.num_processes / 1000
    trainer = trainer_class(config, accelerator)
    stamps, train_step = [], trainer.train_step

    def timed_train_step(batches):
        train_step(batches)
        stamps.append(time.perf_counter())

    trainer.train_step = timed_train_step
    trainer.fit()
    return second_half_median_ms([b - a for a, b in zip(stamps, stamps[1:])])


def peak_memory_gib(device) -> float | None:
    if device != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 2)


def run_case(name, device, iterations, workers, shards_root, run_root, repeats):
    overrides, reference, (fmt, resolution) = CASES[name]
    shards = make_shards(fmt, resolution, 24_000 if fmt == "png" else 10_000, shards_root)
    overrides = overrides + [f"--data.shards={shards}"] + ([f"--data.workers={workers}"] if workers is not None else [])
    config = build(overrides, device, run_root / name)[0]
    row = {"case": name, "device": device, "workers": config.data.workers, "batch": config.train.batch_size,
           "resolution": config.data.resolution, "precision": config.train.precision}
    # (a), (b) and (c) in turns, `repeats` times: this machine's speed drifts between minutes,
    # so each figure is the median over the turns of its per-turn medians
    turns = {"loader": [], "train_step": [], "fit": []}
    for _ in range(repeats):
        config, accelerator, trainer_class = build(overrides, device, run_root / name)
        turns["loader"].append(measure_loader(config, accelerator, iterations))
        turns["train_step"].append(measure_step(config, accelerator, trainer_class, iterations))
        row["train_step_peak_gib"] = peak_memory_gib(device)
        config, accelerator, trainer_class = build(overrides, device, run_root / name)
        turns["fit"].append(measure_fit(config, accelerator, trainer_class, iterations))
        row["fit_peak_gib"] = peak_memory_gib(device)
    for key, values in turns.items():
        row[f"{key}_ms"] = round(statistics.median(values), 3)
        row[f"{key}_ms_turns"] = [round(v, 3) for v in values]
    row["unexplained_ms"] = round(row["fit_ms"] - max(row["loader_ms"], row["train_step_ms"]), 3)
    row["fit_over_train_step"] = round(row["fit_ms"] / row["train_step_ms"], 3)
    if reference is not None and YARDSTICK.exists():
        arch, batch, precision, channels_last, ch = reference
        yard = yardstick(arch, batch, precision, channels_last, ch, max(iterations // 2, 10), 10, device)
        row["yardstick_ms"] = yard["ms_per_iter"]
        row["train_step_over_yardstick_speed"] = round(yard["ms_per_iter"] / row["train_step_ms"], 3)
        row["fit_over_yardstick_speed"] = round(yard["ms_per_iter"] / row["fit_ms"], 3)
    row["img_per_s"] = {k: round(row["batch"] / row[f"{k}_ms"] * 1e3, 1) for k in ("loader", "train_step", "fit")}
    print(json.dumps(row), flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="default: tiny32 on CPU, "
                        "dcgan64 and dcgan32 on a GPU")
    parser.add_argument("--workers", type=int, action="append", help="data.workers to try (default: the case's)")
    parser.add_argument("--iterations", type=int, default=None, help="per measurement (default 400 CPU, 300 GPU)")
    parser.add_argument("--repeats", type=int, default=3, help="turns of (a), (b), (c) per case")
    parser.add_argument("--shards", type=Path, default=Path(os.environ.get("BIGAN_CACHE", "/tmp/bigan-bench-cache")))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cases = args.case or (["tiny32"] if args.device == "cpu" else ["dcgan64", "dcgan32"])
    workers = args.workers or ([0, 1, 2] if args.device == "cpu" and cases == ["tiny32"] else [None])
    iterations = args.iterations or (400 if args.device == "cpu" else 300)
    rows = [run_case(name, args.device, iterations, w, args.shards, Path("/tmp/bigan-bench-e2e"), args.repeats)
            for name in cases for w in workers]
    if args.out:
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
