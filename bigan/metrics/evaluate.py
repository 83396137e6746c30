"""bigan-eval: FID, KID, IS and precision/recall of a generator against a shard set; mode coverage;
L1, PSNR and FID of an image-to-image (pix2pix) generator on held-out pairs.

    bigan-eval --checkpoint runs/demo --data shards/ --n 10000                  # Inception (local file)
    bigan-eval --checkpoint runs/demo --data shards/ --extractor my_net.pt --out metrics.json
    bigan-eval --checkpoint runs/modes --modes classifier.pt --n 26000         # modes reached, KL to uniform
    bigan-eval --samples samples.npz --modes classifier.pt                      # images bigan-sample wrote
    bigan-eval --checkpoint runs/layout2painting --data held_out_pairs/ --metrics l1,psnr,fid   # pix2pix
    accelerate launch -m bigan.metrics.evaluate --checkpoint ... --data ...    # spread over GPUs

Reference statistics of a shard set are computed once per (shards, resolution, extractor, n)
and cached as npz under $BIGAN_CACHE/eval/. Each rank generates and embeds its share of the
samples (the same samples whatever the number of ranks); statistics are summed across ranks.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from bigan import families
from bigan.cli import Parser
from bigan.metrics import metrics
from bigan.metrics.features import Extractor, ExtractorError, FeatureStats, ModeClassifier, ModeCounts
from bigan.tracking import to_uint8

METRICS = ("fid", "kid", "is", "pr")  # of images, whatever made them


def _cache_file(shard_set, resolution, extractor, n) -> Path:
    from bigan.data.demo import cache_dir

    key = json.dumps([shard_set.urls, shard_set.counts, resolution, extractor.name, n])
    return cache_dir() / "eval" / f"ref-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"


def _counted(shards):
    from bigan.data.stream import count_samples, resolve_shards

    shard_set = resolve_shards(shards)
    if shard_set.counts is None:
        shard_set.counts = count_samples(shard_set.urls)
    return shard_set


def _usable(total: int, n: int | None, world: int) -> int:
    """Samples read of `total`: n (default all), every one on one process; < world left out on several."""
    return min(n or total, (total // world) * world)


def _in_order(shard_set, resolution: int, accelerator, n: int, paired: bool = False):
    """This rank's share of the first n samples, as batches of one (no shuffle, flip or crop).

    One reader, batches of one image (so no partial batch is dropped): rank r reads samples
    [r * per_rank, (r + 1) * per_rank) of the epoch-0 layout, so what is read and summed does not
    depend on the number of ranks."""
    from bigan.data.stream import Loader, StreamSpec

    spec = StreamSpec(shard_set, 1, resolution, rank=accelerator.process_index, world_size=accelerator.num_processes,
                      mode="epoch", epochs=1, shuffle_buffer=1, shard_mix=1, flip=False, paired=paired)
    return zip(range(n // accelerator.num_processes), Loader(spec, workers=0, device=accelerator.device))


def reference_stats(shards, resolution: int, extractor: Extractor, accelerator, n: int | None = None,
                    keep: int = 10_000, batch: int = 64) -> dict:
    """mu, sigma and kept features of real images; computed on first use, then read from the cache. Rank 0
    decides whether the cache holds them and reads it (others may not see its cache folder); every rank
    gets the same statistics."""
    from bigan.training.ranks import on_rank_zero

    shard_set = _counted(shards)
    world = accelerator.num_processes
    n = _usable(sum(shard_set.counts), n, world)
    cached = _cache_file(shard_set, resolution, extractor, n)
    ref = on_rank_zero(accelerator, lambda: dict(np.load(cached)) if cached.exists() else None)
    if ref is not None:
        return ref
    per_rank = n // world
    # images are gathered into batches for the extractor
    stats, seen, pending = FeatureStats(extractor.dim, keep), 0, []

    def add(images):
        nonlocal seen
        features, _ = extractor(to_uint8(torch.cat(images)))
        stats.update(features, torch.arange(len(features)) + accelerator.process_index * per_rank + seen)
        seen += len(features)

    for _, data in _in_order(shard_set, resolution, accelerator, n):
        pending.append(data["image"])
        if len(pending) == batch:
            add(pending)
            pending = []
    if pending:
        add(pending)
    stats.reduce(accelerator)
    refuse_nonfinite(extractor, stats.nonfinite, None, 0, stats.n)  # never into the cache
    if accelerator.is_main_process:
        stats.save(cached)
    mu, sigma = stats.mean_cov()  # the sums are reduced on every rank: no need to read the cache back
    return {"mu": mu, "sigma": sigma, "n": stats.n, "kept": stats.kept_features()}


def load_samples(path: Path) -> np.ndarray:
    """The uint8 NHWC images of a .npz that bigan-sample --out wrote (key 'images')."""
    try:
        with np.load(path) as data:
            images = data["images"]
    except (OSError, ValueError, KeyError) as exc:
        raise ExtractorError(f"--samples: {path} is not a .npz with an 'images' array as bigan-sample writes "
                             f"({type(exc).__name__}: {exc})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
        raise ExtractorError(f"--samples: {path}: expected uint8 images of shape (N, H, H, 3), "
                             f"got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise ExtractorError(f"--samples: {path} holds no images (shape {images.shape}): nothing to score")
    return images


def generated_labels(indices: torch.Tensor, n: int, num_classes: int, label_counts=None) -> torch.Tensor:
    """The classes of samples `indices` of n: round robin, or with the reference set's label_counts, each
    class in proportion to its count, so that FID compares fakes and reals of the same class mix. Sample i
    takes the class at quantile (j + 1/2) / n of the counts, j = a i mod n with a the first integer from
    0.618 n coprime to n (a bijection): every stretch of indices holds the classes mixed as the whole does
    (IS scores ten stretches apart; KID and pr keep the first 10,000)."""
    if label_counts is None:
        return indices % num_classes
    import math

    stride = max(int(n * 0.6180339887), 1)
    while math.gcd(stride, n) != 1:
        stride += 1
    j = (indices.long() * stride) % n
    ends = torch.tensor(label_counts, dtype=torch.float64).cumsum(0)
    return torch.searchsorted(ends, (j.double() + 0.5) * (float(ends[-1]) / n), right=True)


def generated_images(g, z_dim: int, num_classes: int, accelerator, n: int, seed: int = 0, batch: int = 64,
                     label_counts=None):
    """This rank's share of n samples of g as (indices, uint8 NCHW): block b of `batch` samples,
    seeded by (seed, b), is generated by rank b % world, so the samples do not depend on the ranks; their
    classes as generated_labels gives them."""
    device = accelerator.device
    for block in range(accelerator.process_index, (n + batch - 1) // batch, accelerator.num_processes):
        indices = torch.arange(block * batch, min(n, (block + 1) * batch))
        z = torch.randn(len(indices), z_dim, generator=torch.Generator().manual_seed(seed * 1_000_003 + block))
        y = generated_labels(indices, n, num_classes, label_counts).to(device) if num_classes else None
        yield indices, to_uint8(g(z.to(device), y))


def held_out_pairs(shards, resolution: int, n: int, device="cpu") -> tuple:
    """(inputs, targets) of the first n pairs of a shard set, float NCHW in [-1, 1] (one process)."""
    from types import SimpleNamespace

    one = SimpleNamespace(process_index=0, num_processes=1, device=torch.device(device))
    shard_set = _counted(shards)
    pairs = [data for _, data in _in_order(shard_set, resolution, one, min(n, sum(shard_set.counts)), paired=True)]
    return torch.cat([p["source"] for p in pairs]), torch.cat([p["image"] for p in pairs])


@torch.no_grad()
def evaluate_pairs(g, shards, resolution: int, extractor: Extractor | None, accelerator, n: int,
                   wanted=("l1", "psnr", "fid", "kid"), batch: int = 64, keep: int = 10_000) -> dict:
    """An image-to-image generator on the first n held-out pairs of `shards`: l1 (mean |output - target|
    in [-1, 1] units, as the training term), psnr (dB, on 8-bit pixels, per image then averaged) and
    fid/kid of the outputs against the targets of the same pairs. The same dict on every rank."""
    from bigan.data.stream import DataError

    shard_set = _counted(shards)
    if shard_set.paired is False:
        raise DataError(f"--data: {shards} holds single images; an image-to-image generator is scored on "
                        f"held-out pairs (bigan-shards TARGETS OUT --src-dir INPUTS)")
    n = _usable(sum(shard_set.counts), n, accelerator.num_processes)
    sums = torch.zeros(3, dtype=torch.float64)  # |error| per image, PSNR per image, images

    def translated():
        pending, first = [], accelerator.process_index * (n // accelerator.num_processes)
        for i, data in _in_order(shard_set, resolution, accelerator, n, paired=True):
            pending.append(data)
            if len(pending) == batch or i == n // accelerator.num_processes - 1:
                sources, targets = torch.cat([p["source"] for p in pending]), torch.cat([p["image"] for p in pending])
                outputs = to_uint8(g(sources, sources))
                error = outputs.double() - to_uint8(targets).double()
                sums[0] += error.abs().mean((1, 2, 3)).sum().cpu() / 127.5
                mse = error.square().mean((1, 2, 3)).clamp_min(1e-10)
                sums[1] += (10 * torch.log10(255.0**2 / mse)).sum().cpu()
                sums[2] += len(outputs)
                yield torch.arange(first, first + len(outputs)), outputs
                first, pending = first + len(outputs), []

    features = [m for m in wanted if m in ("fid", "kid")]
    fake, _ = sample_stats(translated(), resolution, extractor if features else None, accelerator, n, keep)
    total = accelerator.reduce(sums.to(accelerator.device), "sum").cpu() if accelerator.num_processes > 1 else sums
    result = {"n": n}
    if "l1" in wanted:
        result["l1"] = float(total[0] / total[2])
    if "psnr" in wanted:
        result["psnr"] = float(total[1] / total[2])
    if features:  # the targets of the same pairs are the reference
        ref = reference_stats(shards, resolution, extractor, accelerator, n=n, keep=keep, batch=batch)
        result.update(feature_metrics(ref, fake, n, wanted, extractor))
    return result


def array_images(images: np.ndarray, accelerator, batch: int = 64):
    """This rank's share of a uint8 NHWC array (what `bigan-sample --out x.npz` writes) as (indices, uint8 NCHW)."""
    for block in range(accelerator.process_index, (len(images) + batch - 1) // batch, accelerator.num_processes):
        indices = torch.arange(block * batch, min(len(images), (block + 1) * batch))
        yield indices, torch.from_numpy(images[block * batch:(block + 1) * batch]).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def sample_stats(blocks, resolution: int, extractor: Extractor | None, accelerator, n: int, keep: int = 10_000,
                 want_probs: bool = False, classifier: ModeClassifier | None = None):
    """(FeatureStats, ModeCounts) of the images `blocks` yields on this rank, summed over ranks (None where
    no extractor or classifier is given). Every rank calls this, also one that was given no images. Rows
    the networks give non-finite values for are refused after the sum, on every rank alike."""
    stats = modes = None
    if extractor is not None:
        stats = FeatureStats(extractor.dim, keep, classes=extractor.classes if want_probs else 0, total=n)
    if classifier is not None:
        modes = ModeCounts(classifier.classes)
    for indices, images in blocks:
        if stats is not None:
            features, probs = extractor(images, want_probs=want_probs)
            stats.update(features, indices, probs)
        if modes is not None:
            modes.update(classifier(images))
    stats = stats.reduce(accelerator) if stats is not None else None
    modes = modes.reduce(accelerator) if modes is not None else None
    refuse_nonfinite(extractor, stats.nonfinite if stats else 0, classifier, modes.unscored if modes else 0, n)
    return stats, modes


def refuse_nonfinite(extractor, bad_features: int, classifier, bad_logits: int, n: int):
    for net, bad, what in ((extractor, bad_features, "features"), (classifier, bad_logits, "class logits")):
        if bad:
            raise ExtractorError(f"{net.path} gave non-finite {what} (NaN or inf) for {bad} of {n} images; "
                                 f"nothing was scored")


def feature_metrics(ref: dict, fake, n: int, wanted, extractor: Extractor) -> dict:
    """fid, kid, pr and is (those in `wanted`) of streamed sample statistics against reference statistics."""
    result = {"n_ref": int(ref["n"]), "extractor": extractor.name}
    if "fid" in wanted:
        result["fid"] = metrics.fid_from_stats(ref["mu"], ref["sigma"], *fake.mean_cov())
    if "kid" in wanted:
        result["kid"], result["kid_std"] = metrics.kid(ref["kept"], fake.kept_features(),
                                                       subset_size=min(1000, n, int(ref["n"])))
    if "pr" in wanted:
        result["precision"], result["recall"] = metrics.precision_recall(ref["kept"], fake.kept_features())
    if "is" in wanted:
        if fake.p_sums is None:
            raise ExtractorError(f"--metrics is needs class probabilities; extractor {extractor.name} gives none")
        result["is"], result["is_std"] = metrics.inception_score(fake.p_sums, fake.plogp, fake.counts)
    return result


def evaluate(blocks, data, resolution: int, extractor: Extractor | None, accelerator, n: int,
             wanted=("fid", "kid", "pr"), batch: int = 64, keep: int = 10_000,
             classifier: ModeClassifier | None = None) -> dict:
    """Metrics of n images (`blocks`: this rank's share, as generated_images or array_images yield
    them) against shard set `data`, and their mode coverage under `classifier`; the same dict on
    every rank. `wanted` may be empty (modes only: no extractor or reference data needed)."""
    fake, modes = sample_stats(blocks, resolution, extractor if wanted else None, accelerator, n, keep,
                               want_probs="is" in wanted, classifier=classifier)
    result = {"n": n}
    if wanted:
        ref = reference_stats(data, resolution, extractor, accelerator, keep=keep, batch=batch)
        result.update(feature_metrics(ref, fake, n, wanted, extractor))
    if modes is not None:
        result["modes"], result["kl_modes"] = metrics.mode_coverage(modes.classes)
        result.update(modes_of=len(modes.classes), classifier=classifier.name)
    return result


def _refuse_idle_flags(parser, args, wanted):
    """Flags that would do nothing with the others given are refused (exit 2), not silently ignored."""
    scores_features = bool(set(wanted) & set(METRICS)) if wanted else bool(args.data)
    idle = [("--seed", args.seed is not None and args.samples is not None, "--samples are scored as they are"),
            ("--no-ema", args.no_ema and args.samples is not None, "--samples are scored as they are"),
            ("--extractor", args.extractor is not None and not scores_features, "no fid, kid, is or pr is computed"),
            ("--inception", args.inception is not None and args.extractor not in (None, "inception"),
             f"--extractor {args.extractor} is not Inception"),
            ("--inception", args.inception is not None and not scores_features, "no fid, kid, is or pr is computed"),
            ("--clip", args.clip is not None and "clip" not in wanted, "--metrics names no clip")]
    for flag, given, why in idle:
        if given:
            parser.error(f"{flag} would do nothing: {why}")


def main(argv=None):
    parser = Parser(prog="bigan-eval", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="run dir, checkpoint dir or exported .safetensors")
    source.add_argument("--samples", type=Path, help="score these images instead: a .npz as bigan-sample --out writes")
    parser.add_argument("--data", default=None, help="reference shards: manifest, folder, pattern, pipe: URLs "
                        "(needed for fid, kid, is, pr)")
    parser.add_argument("--n", type=int, default=None, help="generated samples (default 10000; with --samples: all)")
    parser.add_argument("--extractor", default=None, help="'inception' (default) or a TorchScript/pickled module path")
    parser.add_argument("--inception", default=None, help="path of inception-2015-12-05.pkl (default: "
                        "$BIGAN_INCEPTION or $BIGAN_CACHE/inception-2015-12-05.pkl)")
    parser.add_argument("--metrics", default=None, help=f"comma-separated subset of {','.join(METRICS)}, or of "
                        f"what the generator's family measures (pix2pix: l1, psnr, fid, kid, with --data naming held-out "
                        "pairs (default: all of them with --data, none without)")
    parser.add_argument("--modes", default=None, metavar="CLASSIFIER",
                        help="mode coverage: a TorchScript/pickled classifier of uint8 NCHW images to K class "
                             "logits; reports modes reached of K and KL(samples || uniform)")
    parser.add_argument("--clip", default=None, metavar="FOLDER", help="a local CLIP model folder (save_pretrained "
                        "of CLIPModel and CLIPProcessor) for --metrics clip (model.arch=dfgan)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=None, help="seed of the generated samples' latents (default 0)")
    parser.add_argument("--no-ema", action="store_true", help="the raw generator instead of its EMA")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if (args.n is not None and args.n < 1) or args.batch < 1:
        parser.error("--n must be at least 1" if args.batch >= 1 else "--batch must be at least 1")
    if args.out is not None and not args.out.parent.is_dir():  # not after computing everything
        parser.error(f"--out: folder {args.out.parent} does not exist")
    wanted = [m.strip() for m in (args.metrics or "").split(",") if m.strip()]
    known = families.known_metrics()
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        parser.error(f"--metrics: unknown {', '.join(unknown)} (choose from {', '.join(known)})")
    if set(wanted) - families.data_free_metrics() and not args.data:
        parser.error(f"--data: reference shards are needed for --metrics {','.join(wanted)}")
    if not wanted and not args.modes and not args.data:
        parser.error("nothing to compute: give --data (fid, kid, is, pr) and/or --modes CLASSIFIER")
    if "clip" in wanted and args.clip is None:
        parser.error("--clip: --metrics clip needs a local CLIP model folder (--clip FOLDER)")
    _refuse_idle_flags(parser, args, wanted)
    args.extractor = args.extractor or "inception"
    from accelerate import Accelerator

    from bigan.data.stream import DataError
    from bigan.sample import SampleError, family_of, load_generator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    try:  # the networks' files, the generator or samples, then the networks tried at their resolution:
        # a missing or broken file fails before anything is generated
        features = set(wanted) & set(METRICS) if wanted else args.data  # (fid is in every default set)
        extractor = Extractor(args.extractor, accelerator.device, args.inception) if features else None
        classifier = ModeClassifier(args.modes, accelerator.device) if args.modes else None
        g, model = load_generator(args.checkpoint, ema=not args.no_ema) if args.checkpoint else (None, {})
        family = family_of(model) if g is not None else None
        images = load_samples(args.samples)[:args.n] if args.samples is not None else None
        resolution = images.shape[1] if images is not None else model["resolution"]
        for network in (extractor, classifier):
            if network is not None:
                network.probe(resolution)
        takes = family.metrics if family is not None else METRICS
        wanted = wanted or ([m for m in takes if m != "clip"] if args.data else [])  # (clip needs --clip)
        wrong = sorted(set(wanted) - set(takes)) or (["modes"] if args.modes and family and not family.modes else [])
        if wrong:
            arch = f"model.arch={family.name}" if family is not None else "--samples"
            raise ExtractorError(f"--metrics: {', '.join(wrong)} cannot score {arch} (it takes {', '.join(takes)}"
                                 f"{', modes' if family is None or family.modes else ''})")
        if args.clip is not None:  # (loaded now, so that a folder that is no CLIP model fails before generating)
            from bigan.families.text2image_metrics import clip_model

            clip_model(args.clip, "--clip")
            family.config.family_options.clip = args.clip
        if images is not None:
            result = evaluate(array_images(images, accelerator, args.batch), args.data, resolution, extractor,
                              accelerator, len(images), wanted, args.batch, classifier=classifier)
        else:
            result = family.evaluate(g.to(accelerator.device), args.data, extractor, classifier, accelerator,
                                     args.n or 10_000, wanted, args.seed or 0, args.batch)
    except (ExtractorError, SampleError, DataError) as exc:
        print(f"bigan-eval: error: {exc}", file=sys.stderr)
        return 2
    if accelerator.is_main_process:
        print(json.dumps(result))
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
