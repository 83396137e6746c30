"""Images/s of one data worker: bigan's stream beside two baselines, in one run.

    .venv/bin/python bench/data_throughput.py [--images 20000] [--out bench/data_throughput.json]

For 64 px and 256 px JPEG shards of the demo landscapes, on one core (OMP threads 1):
  * bigan      ShardStream in-process (= one DataLoader worker): tar read, shuffle buffer,
               decode straight into a uint8 batch of 256, flip decisions (the Loader flips
               on the device)
  * ceiling    decode alone over the same JPEG bytes already in memory (simplejpeg and PIL)
  * by hand    a plain tarfile + PIL loop with flip and batching, what a user writes by hand
"""
import argparse
import io
import json
import os
import platform
import random
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import Image

from bigan.data.demo import ensure_demo_shards
from bigan.data.stream import ShardStream, StreamSpec, resolve_shards

BATCH = 256


def timed(fn, images):
    start = time.perf_counter()
    done = fn(images)
    return done / (time.perf_counter() - start)


def jpeg_bytes(manifest):
    out = []
    for url in resolve_shards(manifest).urls:
        with tarfile.open(url) as tar:
            out += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    return out


def decode_simplejpeg(blobs, images):
    for i in range(images):
        simplejpeg.decode_jpeg(blobs[i % len(blobs)], colorspace="RGB")
    return images


def decode_pil(blobs, images):
    for i in range(images):
        np.asarray(Image.open(io.BytesIO(blobs[i % len(blobs)])).convert("RGB"))
    return images


def by_hand(urls, images):
    """tarfile + PIL + flip + batch: the loop a user writes without a data library."""
    done, batch, rng = 0, [], random.Random(0)
    while done < images:
        for url in urls:
            with tarfile.open(url) as tar:
                for member in tar:
                    if not member.name.endswith(".jpg"):
                        continue
                    image = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
                    batch.append(image[:, ::-1] if rng.random() < 0.5 else image)
                    if len(batch) == BATCH:
                        torch.from_numpy(np.stack(batch))
                        batch, done = [], done + BATCH
                        if done >= images:
                            return done
    return done


def bigan_stream(manifest, resolution, images):
    spec = StreamSpec(resolve_shards(manifest), BATCH, resolution, shuffle_buffer=1000, flip=True)
    done = 0
    for (_, _, _, flips, _), _ in ShardStream(spec):  # the images stay in the stream's buffer
        done += len(flips)
        if done >= images:
            return done
    return done


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000, help="images per measurement at 64 px (256 px: /8)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(os.environ.get("BIGAN_BENCH_CACHE", Path(tempfile.gettempdir()) / "bigan-bench"))
    rows = []
    for resolution, n, images in ((64, 4000, args.images), (256, 1000, args.images // 8)):
        manifest = ensure_demo_shards(n=n, resolution=resolution, root=root, progress=False)
        blobs, urls = jpeg_bytes(manifest), resolve_shards(manifest).urls
        results = {
            "bigan": timed(lambda k: bigan_stream(manifest, resolution, k), images),
            "decode_simplejpeg": timed(lambda k: decode_simplejpeg(blobs, k), images),
            "decode_pil": timed(lambda k: decode_pil(blobs, k), images),
            "tarfile_pil_by_hand": timed(lambda k: by_hand(urls, k), images),
        }
        rows.append({"resolution": resolution, "images": images, "mean_jpeg_bytes": int(np.mean([len(b) for b in blobs])),
                     **{k: round(v) for k, v in results.items()},
                     "bigan_vs_decode_ceiling": round(results["bigan"] / results["decode_simplejpeg"], 3),
                     "bigan_vs_by_hand": round(results["bigan"] / results["tarfile_pil_by_hand"], 3)})
        print(json.dumps(rows[-1]), flush=True)
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "rows": rows,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
