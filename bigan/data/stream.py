"""Reading shards into batches on each rank: deterministic, split by rank and worker, resumable.

The pipeline, per DataLoader worker:

    shard list -> this round's shards (by rank, role, round) -> tar -> samples (raw bytes)
      -> shuffle buffer (raw) -> skip what a resumed run already consumed -> decode -> augment
      -> batch (uint8 NHWC; labels, captions, flips as lists) -> main process: to device, float NCHW in [-1, 1]

Captions (a sample's ``txt``, UTF-8, as img2dataset and bigan-shards write them) travel beside
their images through every stage, as labels do. A horizontally flipped image gets its caption with
``left`` and ``right`` swapped (case kept; leftmost, leftward(s) too), so that "the sun on the left"
still says where the sun is in the image it describes. Nothing else is rewritten ("leftover"
stays); text that a mirror makes wrong in other ways (writing in the picture) wants data.flip=false.

Two modes:

* ``infinite``: each round, every reader draws shards with replacement, seeded by
  (seed, rank, worker role, round) — the usual large-scale setting.
* ``epoch``: all samples are laid out in a per-epoch shard order and every rank gets the same
  quota, ``floor(N / (world * batch)) * batch`` samples, cut into contiguous ranges (so fewer
  shards than readers is fine). The remainder, fewer than ``world * batch`` samples, is left
  out of that epoch; which samples fall there changes with the shard order each epoch. Every
  rank yields exactly the same number of batches, so a rank never waits on another.

Resuming: the DataLoader takes batches from its workers in turn, so batch ``i`` of a rank
always comes from worker *role* ``i % num_workers``. Each batch carries its role's position
(round, raw samples consumed); :class:`Loader` keeps the latest per role, and a restarted
loader rotates roles and fast-forwards each one over raw bytes (no decoding), so the batches
after a resume are exactly those an uninterrupted run would have produced. Corrupt samples
are skipped and counted; in epoch mode a role that comes up short refills from its own range
so that batch counts stay equal.
"""
from __future__ import annotations

import atexit
import functools
import io
import itertools
import json
import math
import random
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from bigan.data.images import check_pair_aspect, to_rgb

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SOURCE_KEYS = tuple(f"src.{k}" for k in IMAGE_KEYS)  # paired samples: KEY.src.jpg (input) beside KEY.jpg (target)
# Tags that keep the seeds of different random choices apart. Integers, not strings: hash() of a
# str changes from process to process (PYTHONHASHSEED), hash() of a tuple of ints does not.
_SHUFFLE, _SHARDS, _ORDER, _MIX = 1, 2, 3, 4


class DataError(Exception):
    """Bad data input; the message names what was wrong."""


# ---------------------------------------------------------------- shard lists


@dataclass
class ShardSet:
    urls: list[str]
    counts: list[int] | None = None       # samples per shard, from a manifest
    labels: list[str] | None = None       # class names, from a manifest
    resolution: int | None = None         # stored resolution, from a manifest
    paired: bool | None = None            # samples hold an input image too (src.*); None: no manifest says
    shuffled: bool = False                # written in shuffled order (bigan-shards' manifest says so)
    captions: bool | None = None          # samples carry a caption (txt); None: no manifest says
    label_counts: list[int] | None = None  # samples per class (index: label), from a manifest


def resolve_shards(spec: str | Path) -> ShardSet:
    """A manifest, a directory of shards, a brace pattern, a tar path or pipe: URL(s); "::" joins any of them."""
    parts = [part for part in str(spec).split("::") if part]
    if not parts:
        raise DataError(f"no shards named in {str(spec)!r}")
    sets = [_resolve_one(part) for part in parts]
    if len(sets) == 1:
        return sets[0]
    counts = None if any(s.counts is None for s in sets) else [c for s in sets for c in s.counts]
    labels = {tuple(s.labels) for s in sets if s.labels is not None}
    if len(labels) > 1:
        raise DataError(f"the sources joined by '::' in {str(spec)!r} name different classes; "
                        f"write them into one shard set with one label list")
    resolutions, paired, captions = {s.resolution for s in sets}, {s.paired for s in sets}, {s.captions for s in sets}
    return ShardSet([u for s in sets for u in s.urls], counts, list(labels.pop()) if labels else None,
                    resolutions.pop() if len(resolutions) == 1 else None, _all_of(paired),
                    all(s.shuffled for s in sets), _all_of(captions), _summed([s.label_counts for s in sets]))


def _summed(per_set: list) -> list[int] | None:
    """Per-class counts of joined sets, summed (None if a part has none)."""
    if any(c is None for c in per_set):
        return None
    width = max(len(c) for c in per_set)
    return [sum(c[i] for c in per_set if i < len(c)) for i in range(width)]


def _all_of(flags: set) -> bool | None:
    """Whether every part of a joined shard set has a property: False if one has not, None if one's unknown."""
    return False if False in flags else (True if flags == {True} else None)


def _manifest_path(spec: str) -> Path | None:
    """The manifest a shard spec names (itself, or manifest.json in the folder it names); None if none."""
    path = Path(spec)
    if path.is_dir() and (path / "manifest.json").exists():
        path = path / "manifest.json"
    if path.suffix != ".json":
        return None
    if not path.exists():
        raise DataError(f"shard manifest not found: {path}")
    return path


def _resolve_one(spec: str) -> ShardSet:
    import braceexpand

    path = _manifest_path(spec) or Path(spec)
    if path.suffix == ".json":
        manifest = json.loads(path.read_text())
        shards = [s for s in manifest["shards"] if s["samples"] > 0]
        if not shards:
            skipped = manifest.get("skipped") or []
            raise DataError(f"{path} lists no samples" + (
                f" ({len(skipped)} input{'s' if len(skipped) != 1 else ''} skipped, e.g. {skipped[0]['input']}: "
                f"{skipped[0]['reason']}); write the shards again" if skipped else ""))
        return ShardSet([str(path.parent / s["name"]) for s in shards], [s["samples"] for s in shards],
                        manifest.get("labels"), manifest.get("resolution"), bool(manifest.get("paired", False)),
                        manifest.get("shuffle_seed") is not None, bool(manifest.get("captions", False)),
                        manifest.get("label_counts") if sum(manifest.get("label_counts") or ()) else None)
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
        if not urls:
            raise DataError(f"no .tar shards in {path}")
        return ShardSet(urls)
    urls = list(braceexpand.braceexpand(spec))
    missing = [u for u in urls if not u.startswith(("pipe:", "http:", "https:")) and not Path(u).exists()]
    if missing:
        raise DataError(f"shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    directories = [u for u in urls if not u.startswith(("pipe:", "http:", "https:")) and Path(u).is_dir()]
    if directories:
        raise DataError(f"{directories[0]} is a folder without .tar shards or manifest.json")
    return ShardSet(urls)


def caption_vocabulary(shards_spec: str, demo_images: int = 10_000, resolution: int = 64) -> list[str] | None:
    """The caption words of a shard set (a data.shards value), most frequent first; None if it has no captions.

    From the manifests' vocabularies (bigan-shards keeps the 20,000 most frequent words); the sources
    of a "::" join are merged by summing their counts, and a source without a manifest is read through
    for its captions. "demo_captions" is the captioned demo set of `demo_images` images, rendered at
    `resolution` on first use (pass data.demo_images and data.resolution: the set training reads).
    """
    from collections import Counter

    counts, captioned = Counter(), False
    for part in (part for part in str(shards_spec).split("::") if part):
        if part == "demo_captions":
            from bigan.data.demo_captions import ensure_caption_shards

            part = str(ensure_caption_shards(demo_images, resolution, progress=False))
        manifest = _manifest_path(part)
        if manifest is None:
            captioned |= _count_caption_words(resolve_shards(part).urls, counts)
            continue
        vocabulary = json.loads(manifest.read_text()).get("vocabulary")
        if vocabulary is not None:
            captioned = True
            counts.update({word: count for word, count in vocabulary})
    if not captioned:
        return None
    return sorted(counts, key=lambda word: (-counts[word], word))


def _count_caption_words(urls, counts) -> bool:
    """Add the words of the captions in these shards to `counts`; whether any sample had a caption."""
    from bigan.models.text import words

    found = False
    for url in urls:
        for sample in _safe_read(url):
            if sample.get("txt") is not None:
                found = True
                counts.update(words(sample["txt"].decode("utf-8", errors="replace")))
    return found


def read_shard(url: str):
    """Raw samples (dicts of bytes keyed by extension) of one shard, in order. Raises on a broken tar."""
    from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

    yield from group_by_keys(tar_file_expander(url_opener([{"url": url}])))


def count_samples(urls) -> list[int]:
    """Samples per shard by reading them (for shard sets without a manifest)."""
    counts = []
    for url in urls:
        n = 0
        try:
            for _ in read_shard(url):
                n += 1
        except Exception:
            pass
        counts.append(n)
    return counts


# ---------------------------------------------------------------- decoding and augmentation


def _image_bytes(sample: dict, keys=IMAGE_KEYS):
    key = next((k for k in keys if k in sample), None)
    if key is None:
        what = "input image (src.jpg, src.png, ...)" if keys == SOURCE_KEYS else "image"
        raise ValueError(f"no {what} in sample {sample.get('__key__')} (keys {sorted(sample)})")
    return key, sample[key]


def decode_rgb(sample: dict, out: np.ndarray | None = None, keys=IMAGE_KEYS) -> np.ndarray:
    """uint8 HxWx3 from the first of `keys` in a sample (the target image; SOURCE_KEYS: a pair's
    input); raises on corrupt data.

    A JPEG whose size matches `out` is decoded straight into it (no copy into the batch later).
    """
    key, data = _image_bytes(sample, keys)
    if key.endswith(("jpg", "jpeg")):
        import simplejpeg

        try:
            if out is not None and simplejpeg.decode_jpeg_header(data)[:2] == out.shape[:2]:
                return simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:
            pass  # CMYK or an oddity simplejpeg refuses: let PIL try, it raises if really corrupt
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(to_rgb(image))  # 16-bit greyscale scaled, not clipped to white


def fit_square(image: np.ndarray, resolution: int, rng: random.Random, crop_scale: tuple | None) -> np.ndarray:
    """Resize/crop to resolution x resolution: random-resized crop if crop_scale, else center crop."""
    h, w = image.shape[:2]
    if crop_scale is None:
        if (h, w) == (resolution, resolution):
            return image
        return np.asarray(ImageOps.fit(Image.fromarray(image), (resolution, resolution), Image.Resampling.BICUBIC))
    for _ in range(10):  # torchvision's RandomResizedCrop sampling: area in crop_scale, ratio in [3/4, 4/3]
        area = h * w * rng.uniform(*crop_scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
            break
    else:
        ch = cw = min(h, w)
        top, left = (h - ch) // 2, (w - cw) // 2
    crop = Image.fromarray(image[top:top + ch, left:left + cw])
    return np.asarray(crop.resize((resolution, resolution), Image.Resampling.BICUBIC))


def fit_pair(target: np.ndarray, source: np.ndarray, resolution: int, rng: random.Random,
             crop_scale: tuple | None) -> tuple[np.ndarray, np.ndarray]:
    """Target and input cropped and resized identically: the input is first brought to the target's
    size, then both take the same crop (the same random draws). A pair whose aspect ratios differ beyond
    bigan.data.images.ASPECT_TOLERANCE raises (counted as unreadable): no crop would line it up."""
    check_pair_aspect(target.shape[1::-1], source.shape[1::-1])
    if source.shape != target.shape:
        source = np.asarray(Image.fromarray(source).resize(target.shape[1::-1], Image.Resampling.BICUBIC))
    state = rng.getstate()
    target = fit_square(target, resolution, rng, crop_scale)
    twin = random.Random()
    twin.setstate(state)
    return target, fit_square(source, resolution, twin, crop_scale)


def _label(sample: dict) -> int:
    value = sample.get("cls")
    return int(value) if value is not None else -1


def _caption(sample: dict) -> str | None:
    """A sample's caption (txt, UTF-8), or None; raises on text that is not UTF-8 (counted as corrupt)."""
    value = sample.get("txt")
    return value.decode("utf-8") if value is not None else None


_SIDES = re.compile(r"\b(left|right)(most|wards?)?\b", re.IGNORECASE)


def mirror_caption(text: str) -> str:
    """The caption of the mirrored image: left and right (leftmost, rightwards, ...) swapped, in the case
    they were written."""
    def swap(match):
        word = match.group(0)
        other = ("right" if match.group(1).lower() == "left" else "left") + (match.group(2) or "").lower()
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other

    return _SIDES.sub(swap, text)


# ---------------------------------------------------------------- the per-worker stream


@dataclass
class StreamSpec:
    """Everything a worker needs to produce its batches; identical on every rank but rank."""

    shards: ShardSet
    batch_size: int
    resolution: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    mode: str = "infinite"                # infinite | epoch
    epochs: int | None = None             # epoch mode: stop after this many (None: forever)
    shuffle_buffer: int = 1000            # raw samples held for shuffling
    shard_mix: int = 32                   # shards each reader reads at once, interleaved at random
    flip: bool = True                     # random horizontal flip
    crop_scale: tuple | None = None       # random-resized-crop area range, e.g. (0.8, 1.0); None: center crop
    paired: bool = False                  # also decode each sample's input image (src.*), cropped and flipped alike
    start: dict = field(default_factory=dict)  # resume state from Loader.state_dict()


class _Batch:
    """A uint8 PxNxHxWx3 batch filled in place, in one of a ring of ``slots`` buffers (P = 1 plane of
    images, or 2 for pairs: targets, then inputs).

    Inside DataLoader workers the buffers live in shared memory and each is sent to the main
    process once; after that a batch travels as its slot number (plus labels, flips and captions as
    Python lists, pickled inline: the DataLoader would turn numpy arrays into shared-memory tensors). A fresh shared-memory tensor per batch cost the main process
    ~2 ms per batch to receive (a socket round trip for its file descriptor, then mmap), which a
    small model on a GPU pays in every iteration (bench/RESULTS.md). A slot is written again
    ``slots`` batches later; :class:`Loader` has copied it out long before (see ``RING``).
    """

    def __init__(self, size: int, resolution: int, shared: bool, slots: int, planes: int = 1):
        self.size, self.resolution = size, resolution
        self.buffers = [torch.empty((planes, size, resolution, resolution, 3), dtype=torch.uint8) for _ in range(slots)]
        if shared:
            for buffer in self.buffers:
                buffer.share_memory_()
        self.sent = [False] * slots
        self.index = 0
        self._select(0)

    def _select(self, index):
        self.index, self.images = index, self.buffers[index]
        self.array, self.n, self.labels, self.flips, self.captions = self.images.numpy(), 0, [], [], []

    def slot(self, plane: int = 0) -> np.ndarray:
        return self.array[plane, self.n]

    def add(self, images: tuple, label: int, flip: bool, caption: str | None = None):
        for plane, image in enumerate(images):
            slot = self.array[plane, self.n]
            if image.ctypes.data != slot.ctypes.data:  # decoded elsewhere (resized, cropped, PIL): copy in
                slot[...] = image
        self.labels.append(label)
        self.flips.append(flip)
        self.captions.append(caption)
        self.n += 1

    def full(self) -> bool:
        return self.n == self.size

    def clear(self):
        self.n, self.labels, self.flips, self.captions = 0, [], [], []

    def take(self):
        """(the images on their first trip, else None; slot; labels or None; which to flip; captions or
        None, "" for a sample without one among samples with one), then the next slot. Flipping is left to the device: a CPU copy of a mirrored 3-byte-pixel image costs
        about as much as decoding it (bench/RESULTS.md)."""
        images = None if self.sent[self.index] else self.images
        self.sent[self.index] = True
        captions = [c or "" for c in self.captions] if any(c is not None for c in self.captions) else None
        out = (images, self.index, self.labels if any(label >= 0 for label in self.labels) else None, self.flips,
               captions)
        self._select((self.index + 1) % len(self.buffers))
        return out


class ShardStream(torch.utils.data.IterableDataset):
    """Yields ((uint8 images PxNxHxWx3 or None, slot, labels (list) or None, flips (list), captions (list) or
    None), position) from one worker; images is None when the slot's buffer was sent before (see _Batch)."""

    def __init__(self, spec: StreamSpec, slots: int = 1):
        super().__init__()
        self.spec, self.slots = spec, slots
        if spec.mode not in ("infinite", "epoch"):
            raise DataError(f"data mode must be 'infinite' or 'epoch', got {spec.mode!r}")
        if spec.mode == "epoch" and spec.shards.counts is None:
            spec.shards.counts = count_samples(spec.shards.urls)
        if spec.mode == "epoch":
            total = sum(spec.shards.counts)
            if total < spec.world_size * spec.batch_size:
                raise DataError(f"{total} samples cannot fill one batch of {spec.batch_size} "
                                f"on each of {spec.world_size} rank(s)")

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        start = self.spec.start
        role = (worker + start.get("batches", 0)) % workers   # batch i of this rank comes from role i % workers
        round_, pos, done, corrupt = start.get("roles", {}).get(str(role), (0, 0, 0, 0))
        empty_rounds = 0
        batch = _Batch(self.spec.batch_size, self.spec.resolution, shared=info is not None, slots=self.slots,
                       planes=2 if self.spec.paired else 1)
        while self.spec.epochs is None or round_ < self.spec.epochs:
            target = None if self.spec.mode == "infinite" else self._epoch_batches(role, workers, round_)
            good = 0
            # done == target: resumed right after this role's last batch of the epoch, so on to the next
            samples = self._raw_round(role, workers, round_, skip=pos) if target != 0 and done != target else ()
            for position, raw, refill in samples:
                if refill and good == 0 and done == 0:
                    raise DataError(f"no readable samples in rank {self.spec.rank}'s share of epoch {round_} "
                                    f"({corrupt} unreadable) of {', '.join(self.spec.shards.urls[:3])}"
                                    + (", ..." if len(self.spec.shards.urls) > 3 else ""))
                try:
                    rng = random.Random(hash((self.spec.seed, self.spec.rank, role, round_, position)))
                    images, caption = self._decode(raw, batch, rng), _caption(raw)
                except Exception:
                    corrupt += 1
                    continue
                good, empty_rounds = good + 1, -1
                flip = self.spec.flip and rng.random() < 0.5
                batch.add(images, _label(raw), flip, mirror_caption(caption) if flip and caption else caption)
                if batch.full():
                    done += 1
                    yield batch.take(), {"role": role, "round": round_, "pos": position + 1,
                                         "done": done, "corrupt": corrupt}
                    if done == target:
                        break
            if self.spec.mode == "epoch":
                batch.clear()  # only a refill's leftover can be here; epochs end on a full batch
            round_, pos, done = round_ + 1, 0, 0
            empty_rounds += 1
            if empty_rounds >= 100:  # resampling keeps drawing shards of which nothing decodes
                raise DataError(f"no sample could be decoded in 100 rounds of shards ({corrupt} unreadable), "
                                f"e.g. {', '.join(self.spec.shards.urls[:2])}")

    def _decode(self, raw: dict, batch: _Batch, rng: random.Random) -> tuple:
        """(image,) or (target, input) of one sample, cropped to the resolution; raises if unreadable."""
        crop, res = self.spec.crop_scale, self.spec.resolution
        image = decode_rgb(raw, None if crop else batch.slot(0))
        if not self.spec.paired:
            return (fit_square(image, res, rng, crop),)
        source = decode_rgb(raw, None if crop else batch.slot(1), keys=SOURCE_KEYS)
        return fit_pair(image, source, res, rng, crop)

    def _raw_round(self, role, workers, round_, skip):
        """(position, raw sample, is_refill) of one round for one role, shuffled, the first `skip` dropped.

        In epoch mode the role's range is repeated (reshuffled) for as long as the consumer asks,
        so samples lost to corruption are made up from the same range.
        """
        from webdataset.filters import _shuffle

        position = 0
        segments = (self._round_shards(role, workers, round_) if self.spec.mode == "infinite"
                    else self._epoch_segments(round_, *self.epoch_range(role, workers, round_)))
        for n in range(1 if self.spec.mode == "infinite" else 1 << 30):
            tags = (self.spec.seed, self.spec.rank, role, round_, n)
            raw_pass = _interleave(segments, self.spec.shard_mix, np.random.default_rng([*tags, _MIX]))
            rng = random.Random(hash((*tags, _SHUFFLE)))
            start = position
            for raw in _shuffle(raw_pass, self.spec.shuffle_buffer, self.spec.shuffle_buffer, rng=rng):
                if position >= skip:
                    yield position, raw, n > 0
                position += 1
            if position == start and self.spec.mode == "epoch":
                raise DataError(f"no samples could be read for rank {self.spec.rank} in round {round_} "
                                f"(shards unreadable: {self.spec.shards.urls[:3]}...)")

    def _round_shards(self, role, workers, round_) -> list:
        """This reader's part of an infinite-mode round, as segments (see _interleave).

        Every round draws one permutation of all shards (seeded by seed and round, the same on every
        reader). Reader k of R takes its k-th share of the shards, so that within a round the readers
        together read every shard once (with fewer shards than readers they wrap around). Where that
        share is under data.shard_mix and the shards are not known to be shuffled (no shuffle_seed in
        their manifest), a reader would see only a few of them, and from sorted shards its batches
        would hold a few classes: each reader then takes a 1/R slice of every shard instead (which
        slice turns with the round), and so mixes all of them, at the cost of reading through up to
        every shard for its slice.
        """
        urls, counts = self.spec.shards.urls, self.spec.shards.counts
        order = [int(i) for i in np.random.default_rng([self.spec.seed, round_, _SHARDS]).permutation(len(urls))]
        readers, reader = self.spec.world_size * workers, self.spec.rank * workers + role
        share = max(1, math.ceil(len(urls) / readers))
        if self.sliced(workers):
            part = (reader + round_) % readers
            slices = [(i, counts[i] * part // readers, counts[i] * (part + 1) // readers) for i in order]
            return [(urls[i], lo, hi - lo, hi - lo) for i, lo, hi in slices if hi > lo]
        first = reader * share
        picked = [order[(first + j) % len(urls)] for j in range(share)]
        return [(urls[i], 0, None, counts[i] if counts else None) for i in picked]

    def mixing_note(self, workers: int) -> str | None:
        """A line for the user when readers read slices, or when few unshuffled shards per reader cannot
        be mixed (epoch mode, or no manifest with sizes): rewriting them with bigan-shards helps either."""
        readers, shards = self.spec.world_size * max(workers, 1), self.spec.shards
        share = math.ceil(len(shards.urls) / readers)
        if self.sliced(workers):
            return (f"the {len(shards.urls)} shards are not known to be shuffled (no shuffle_seed in a bigan "
                    f"manifest) and would give each of the {readers} data readers {share} per round: each reads a "
                    f"slice of every shard instead, reading through more of them; bigan-shards writes shuffled ones")
        if shards.shuffled or readers == 1 or share >= self.spec.shard_mix:
            return None
        return (f"warning: each of the {readers} data readers mixes only {share} of the {len(shards.urls)} shards "
                f"per {'epoch' if self.spec.mode == 'epoch' else 'round'}: if they are sorted (by class, by folder), "
                f"batches hold a few classes; write them again with bigan-shards, which shuffles")

    def sliced(self, workers: int) -> bool:
        """Whether infinite-mode readers each read slices of every shard (see _round_shards)."""
        readers, shards = self.spec.world_size * max(workers, 1), self.spec.shards
        share = math.ceil(len(shards.urls) / readers)
        return (self.spec.mode == "infinite" and readers > 1 and share < self.spec.shard_mix
                and not shards.shuffled and shards.counts is not None)

    def _per_rank_batches(self):
        return sum(self.spec.shards.counts) // (self.spec.world_size * self.spec.batch_size)

    def _owned(self, workers, epoch):
        """Batches each role yields in an epoch: rank batch i (counted over all epochs) is role i % workers's."""
        per_rank = self._per_rank_batches()
        first = epoch * per_rank
        return [sum(1 for j in range(per_rank) if (first + j) % workers == r) for r in range(workers)]

    def _epoch_batches(self, role, workers, epoch):
        return self._owned(workers, epoch)[role]

    def epoch_range(self, role, workers, epoch):
        """[lo, hi) in the epoch's global sample order for this rank and role."""
        owned = self._owned(workers, epoch)
        lo = (self.spec.rank * self._per_rank_batches() + sum(owned[:role])) * self.spec.batch_size
        return lo, lo + owned[role] * self.spec.batch_size

    def _epoch_segments(self, epoch, lo, hi) -> list:
        """The parts of shards that fall in [lo, hi) of the epoch's sample order (shards in a seeded
        order per epoch), as segments (url, samples, skip)."""
        counts = self.spec.shards.counts
        order = list(range(len(counts)))
        random.Random(hash((self.spec.seed, epoch, _ORDER))).shuffle(order)
        segments, offset = [], 0
        for shard in order:
            start, end = max(lo, offset), min(hi, offset + counts[shard])
            if start < end:
                segments.append((self.spec.shards.urls[shard], start - offset, end - start, end - start))
            offset += counts[shard]
        return segments


def _interleave(segments: list, open_at_once: int, rng: np.random.Generator):
    """The raw samples of shard segments (url, samples to skip, samples to take or None for all, samples
    expected or None), interleaved at random.

    Shards written in sorted order (by class, by folder) would otherwise reach the shuffle buffer one
    after another, and a batch would hold the few classes of the last shard or two. Up to
    `open_at_once` segments are read at the same time. Where every segment's size is known, their
    order is a uniformly random merge (drawn at once with numpy, no Python draw per sample);
    otherwise each sample comes from an open segment picked with equal odds.
    """
    def read(url, skip, take):
        return itertools.islice(_safe_read(url), skip, None if take is None else skip + take)

    if len(segments) == 1:
        yield from read(*segments[0][:3])
        return
    for first in range(0, len(segments), open_at_once):
        group = segments[first:first + open_at_once]
        readers = [read(url, skip, take) for url, skip, take, _ in group]
        expected = [n for *_, n in group]
        if None not in expected:
            for pick in rng.permutation(np.repeat(np.arange(len(group)), expected)).tolist():
                sample = next(readers[pick], None)  # None: fewer samples than the manifest says
                if sample is not None:
                    yield sample
            for reader in readers:  # more than the manifest says: those too, in order
                yield from reader
            continue
        while readers:
            pick = int(rng.integers(len(readers)))
            sample = next(readers[pick], None)
            if sample is None:
                readers.pop(pick)
            else:
                yield sample


def _safe_read(url):
    """Samples of a shard; a broken or truncated tar ends it with one unreadable sample (counted as corrupt)."""
    try:
        yield from read_shard(url)
    except Exception as exc:
        yield {"__key__": None, "__error__": f"{url}: {type(exc).__name__}: {exc}"}


# ---------------------------------------------------------------- the loader a rank iterates


class Loader:
    """Batches for this rank: ``{"image": float NCHW in [-1, 1] on device, "label": int64 N or None,
    "source": the inputs of pairs (as "image"), or None, "caption": N str (mirrored with their flipped
    images, see the module's docstring), or None}``.

    Not meant for ``accelerator.prepare`` (which would read on rank 0 and scatter): each rank
    reads its own share. ``state_dict()`` is the position after the last batch handed out;
    a Loader built with ``start=state`` continues from there.
    """

    def __init__(self, spec: StreamSpec, workers: int = 2, device="cpu", prefetch: int = 4):
        if spec.start:
            check_resumable(spec.start, spec, workers)
        self.spec, self.workers, self.device = spec, workers, torch.device(device)
        self.batches = spec.start.get("batches", 0)
        self.roles = dict(spec.start.get("roles", {}))
        # A worker writes its batch k + slots into batch k's buffer. The DataLoader asks a worker
        # for a batch only after taking one from it, with at most `prefetch` asks outstanding, so
        # when batch k + prefetch + 1 is asked for, batch k has been taken and copied out here.
        self.dataset = ShardStream(spec, slots=prefetch + 2 if workers > 0 else 1)
        self.buffers: dict = {}  # (role, slot) -> a worker's shared buffer
        self._exit_hook = None  # kills the workers at exit if nothing closed this Loader
        self.staging = _PinnedStaging(self.device) if self.device.type == "cuda" else None
        # no pin_memory thread: batches arrive as slot numbers; _PinnedStaging copies them into
        # pinned memory for an asynchronous transfer
        self.loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=workers,
                                                  persistent_workers=workers > 0,
                                                  worker_init_fn=_worker_init,
                                                  prefetch_factor=prefetch if workers > 0 else None,
                                                  generator=torch.Generator())  # not the global RNG a resume restores

    def __iter__(self):
        # Workers are forked here. They inherit this block of the stop signals and ignore them
        # before unblocking (_worker_init), so a signal to the group cannot reach one in between.
        stop_signals = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        try:
            iterator = iter(self.loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        workers = list(getattr(iterator, "_workers", []))
        if workers and self._exit_hook is None:  # however this process ends (an exception the trainer never
            self._exit_hook = functools.partial(_kill_workers, workers)  # sees, too), not in a hang
            atexit.register(self._exit_hook)
        return self._batches(iterator)

    def _batches(self, iterator):
        try:
            yield from map(self._to_batch, iterator)
        except DataError as exc:  # raised in a worker: the DataLoader wraps it in a traceback
            raise DataError(_worker_message(exc)) from None

    def _to_batch(self, item) -> dict:
        (images, slot, labels, flips, captions), position = item
        self.batches += 1
        role = position["role"]
        self.roles[str(role)] = [position["round"], position["pos"], position["done"], position["corrupt"]]
        if images is None:
            images = self.buffers[role, slot]
        else:
            self.buffers[role, slot] = images
        planes = self._to_device(images).permute(0, 1, 4, 2, 3)  # PxNHWC bytes -> PxNCHW view
        planes = planes.float().div_(127.5).sub_(1.0)  # a copy: the worker may refill its buffer now
        flipped = np.flatnonzero(flips)  # chosen on the host: no device sync; a pair flips together
        if len(flipped):
            flipped = torch.from_numpy(flipped).to(self.device, non_blocking=True)
            planes[:, flipped] = planes[:, flipped].flip(-1)
        if labels is not None:
            labels = torch.tensor(labels, dtype=torch.int64).to(self.device, non_blocking=True)
        return {"image": planes[0], "label": labels, "source": planes[1] if len(planes) > 1 else None,
                "caption": captions, "round": position["round"]}

    def close(self):
        """Stop the workers now. They ignore SIGTERM (``_worker_init``), so the terminate() that
        multiprocessing sends its children at interpreter exit would not end them: they are told to
        finish (as the DataLoader does when it is dropped), and any still alive after that is killed."""
        if self._exit_hook is not None:  # closed here: nothing left to do at exit
            atexit.unregister(self._exit_hook)
            self._exit_hook = None
        iterator = getattr(self.loader, "_iterator", None)  # the persistent workers' iterator
        if iterator is None or not hasattr(iterator, "_shutdown_workers"):
            return
        iterator._shutdown_workers()
        for worker in getattr(iterator, "_workers", []):  # one blocked in a read (e.g. a stalled pipe:)
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        return images if self.staging is None else self.staging.to_device(images)

    @property
    def corrupt_samples(self) -> int:
        """Samples skipped as unreadable so far on this rank (over the whole run, resumes included)."""
        return sum(state[3] for state in self.roles.values())

    def state_dict(self) -> dict:
        spec = self.spec
        return {"batches": self.batches, "roles": dict(self.roles), "workers": max(self.workers, 1),
                "seed": spec.seed, "rank": spec.rank, "world_size": spec.world_size,
                "batch_size": spec.batch_size, "mode": spec.mode}


def _kill_workers(workers):
    """At interpreter exit: kill the workers still alive. multiprocessing ends its children there with
    terminate() (SIGTERM), which ours ignore (_worker_init), and then waits for them: forever, where
    nothing closed the Loader (an exception outside Trainer.fit). Registered after multiprocessing's
    own exit function, so it runs first. They hold nothing to save: what they read is re-read on resume."""
    alive = [worker for worker in workers if worker.is_alive()]
    if alive:  # torch's SIGCHLD handler would report each as a crash ("killed by signal")
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in alive:
        worker.kill()
    for worker in alive:
        worker.join(timeout=5)


def _worker_init(worker_id: int):
    """In each DataLoader worker: leave stopping to the trainer, and die with it.

    Slurm, supervisors and Ctrl-C signal the whole process group; the trainer catches SIGTERM,
    SIGUSR1 and SIGINT to checkpoint first, and a worker killed by them would crash it before it
    can ("DataLoader worker ... is killed by signal"). If the trainer itself is killed (SIGKILL),
    the kernel kills its workers too (Linux's PR_SET_PDEATHSIG) instead of leaving them running.
    """
    stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    for sig in stop_signals:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)  # blocked by Loader.__iter__ around the fork
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: workers still exit when the trainer closes its loader
        pass


def _worker_message(exc: DataError) -> str:
    """The original message of a DataError raised in a worker (torch prefixes where, appends the traceback)."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split("DataError: ", 1)[-1]


class _PinnedStaging:
    """Host-to-GPU copies through a few pinned buffers, so that they run asynchronously.

    A worker's shared buffer is pageable memory (a copy from it would block the host); the
    bytes are copied into a pinned buffer on the host, and from there to the GPU without
    waiting. A pinned buffer is reused only once its last transfer has finished (an event).
    """

    def __init__(self, device: torch.device, depth: int = 3):
        self.device, self.depth, self.next = device, depth, 0
        self.buffers: list = [None] * depth
        self.events = [torch.cuda.Event() for _ in range(depth)]

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        i, self.next = self.next, (self.next + 1) % self.depth
        buffer = self.buffers[i]
        if buffer is None or buffer.shape != images.shape:
            buffer = self.buffers[i] = torch.empty(images.shape, dtype=images.dtype, pin_memory=True)
        self.events[i].synchronize()  # its previous transfer (depth batches ago) is long done
        buffer.copy_(images)
        out = buffer.to(self.device, non_blocking=True)
        self.events[i].record()
        return out


def check_resumable(state: dict, spec: StreamSpec, workers: int):
    """Raise DataError unless `state` was saved by a stream laid out like this one."""
    now = {"seed": spec.seed, "rank": spec.rank, "world_size": spec.world_size, "batch_size": spec.batch_size,
           "mode": spec.mode, "workers": max(workers, 1)}
    names = {"seed": "train.seed", "rank": "process rank", "world_size": "number of processes",
             "batch_size": "train.batch_size", "mode": "data.mode", "workers": "data.workers"}
    changed = [f"{names[key]} {state.get(key)} -> {value}" for key, value in now.items() if state.get(key) != value]
    if changed:
        raise DataError("cannot continue the data stream exactly: " + ", ".join(changed)
                        + " since the checkpoint; resume with the same settings")
