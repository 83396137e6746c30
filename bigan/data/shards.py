"""bigan-shards: turn a folder of images or a Hugging Face dataset into WebDataset shards.

    bigan-shards ~/paintings shards/ --resolution 256 --workers 8
    bigan-shards hf_saved_dataset/ shards/ --image-column image --label-column label
    bigan-shards paintings/ pairs/ --src-dir layouts/ --resolution 256     # pix2pix: input -> target pairs
    bigan-shards hf_saved_dataset/ pairs/ --image-column painting --src-column sketch
    bigan-shards captioned/ shards/ --resolution 64           # captions from NAME.txt sidecars or metadata.jsonl
    bigan-shards hf_saved_dataset/ shards/ --caption-column text

The inputs are shuffled (`--seed`, recorded in the manifest), so that every shard holds a mix
of classes and folders; then each of `--workers` processes writes its own range of them into its own shards
(`data-WWW-NNNNNN.tar`, one sample per image: `KEY.jpg` and, with labels, `KEY.cls`; a pair
adds its input image as `KEY.src.jpg`; with captions, `KEY.txt`, UTF-8, as img2dataset and LAION
write them), and `manifest.json` lists them with their sample counts (and, with captions, the
most frequent caption words). Pairs are matched by path relative to each folder, without the
extension. A folder's captions are read when it has any: `NAME.txt` beside `NAME.jpg`, or a
Hugging Face ImageFolder `metadata.jsonl` (lines {"file_name": ..., "text": ...}; a sidecar wins);
a dataset's with `--caption-column`; `--no-captions` ignores them. Inputs that cannot be read
are skipped, counted and listed at the end, and so are the images of a captioned source
without a caption (or with an empty one); one bad file never stops the run.
"""
from __future__ import annotations

import collections
import datetime
import io
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigan.cli import Parser
from bigan.data.images import align_pair, to_rgb
from PIL import Image, ImageOps

import bigan

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
TABLE_SUFFIXES = (".parquet", ".arrow")
MANIFEST = "manifest.json"
CAPTION_SUFFIX = ".txt"     # NAME.txt beside NAME.jpg: the image's caption
METADATA = "metadata.jsonl"  # Hugging Face ImageFolder: a line per image, {"file_name": ..., "text": ...}
VOCABULARY_SIZE = 20_000    # most frequent caption words kept in the manifest


class ShardError(Exception):
    """Bad input for bigan-shards; the message is meant for the user as it is."""


@dataclass
class ShardOptions:
    resolution: int | None = None   # shorter side resized to this, then center-cropped square; None keeps originals
    format: str = "jpg"             # jpg | png | webp
    quality: int = 95               # jpg/webp quality, 1-100
    maxcount: int = 10_000          # samples per shard at most
    maxsize: int = 1_000_000_000    # bytes per shard at most
    workers: int = 1                # processes, each writing its own shard range
    progress: bool = True           # show a progress bar


# ---------------------------------------------------------------- sources


def folder_items(root: Path, labels_from_dirs: bool):
    """(path, label) for every image under root, sorted; labels are the first-level sub-folder."""
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ShardError(f"no images found in {root} (looked for {', '.join(IMAGE_SUFFIXES)})")
    if not labels_from_dirs:
        return [(p, None) for p in paths], None
    names = sorted({p.relative_to(root).parts[0] for p in paths if len(p.relative_to(root).parts) > 1})
    if not names:
        raise ShardError(f"--labels-from-dirs: {root} has no sub-folders with images")
    index = {name: i for i, name in enumerate(names)}
    items = [(p, index[p.relative_to(root).parts[0]]) for p in paths if len(p.relative_to(root).parts) > 1]
    return items, names


def paired_folder_items(root: Path, src_root: Path):
    """(target path, input path) for every image under root with a match under src_root (same relative
    path without extension), and a list of (path, reason) for the images of either side without one."""
    ambiguous = []

    def index(folder):
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not paths:
            raise ShardError(f"no images found in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
        found = {}
        for p in paths:
            found.setdefault(p.relative_to(folder).with_suffix("").as_posix(), []).append(p)
        for key, same in found.items():  # a.jpg beside a.png: which one pairs is anyone's guess
            if len(same) > 1:
                ambiguous.extend((str(p), f"{', '.join(q.name for q in same)} share the name {key}: which one "
                                          f"pairs is ambiguous (rename all but one)") for p in same)
        return {key: same[0] for key, same in found.items() if len(same) == 1}

    if not src_root.is_dir():
        raise ShardError(f"--src-dir: {src_root} is not a folder")
    targets, sources = index(root), index(src_root)
    items = [(targets[k], sources[k]) for k in sorted(targets) if k in sources]
    if not items:
        raise ShardError(f"no file names in {root} match those in {src_root} (pairs are matched by path "
                         f"without extension, e.g. a/001.jpg with a/001.png)")
    unmatched = [(str(targets[k]), f"no input image {k}.* in {src_root}") for k in sorted(set(targets) - set(sources))]
    unmatched += [(str(sources[k]), f"no target image {k}.* in {root}") for k in sorted(set(sources) - set(targets))]
    return items, ambiguous + unmatched


def _metadata_captions(root: Path, field: str) -> tuple[dict, list]:
    """{image path: caption or None} from every metadata.jsonl under root (file_name is relative to the
    file's folder), and (line, reason) for the lines that name no image."""
    found, orphans = {}, []
    for metadata in sorted(root.rglob(METADATA)):
        for number, line in enumerate(metadata.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ShardError(f"{metadata}:{number}: not JSON ({exc.msg}); each line must be an object "
                                 f"like {{\"file_name\": \"a.jpg\", \"{field}\": \"a caption\"}}") from None
            if not isinstance(entry, dict) or "file_name" not in entry:
                raise ShardError(f"{metadata}:{number}: no \"file_name\"; each line must be an object "
                                 f"like {{\"file_name\": \"a.jpg\", \"{field}\": \"a caption\"}}")
            path = metadata.parent / str(entry["file_name"])
            if not path.is_file():
                orphans.append((f"{metadata}:{number}", f"names {entry['file_name']}, which is not in {metadata.parent}"))
            found[path] = entry.get(field)
    return found, orphans


def _caption_text(value, where: str) -> str:
    """A caption as stored: the text without surrounding white space; raises ValueError (the reason an
    image is skipped) when there is none."""
    if value is None:
        raise ValueError(f"no caption ({where})")
    if not isinstance(value, str):
        raise ValueError(f"caption is {type(value).__name__}, not text ({where})")
    if not value.strip():
        raise ValueError(f"empty caption ({where})")
    return value.strip()


def captioned_folder_items(root: Path, items, field: str = "text"):
    """(path, label, caption) for the items of a folder with captions (sidecars, metadata.jsonl), a list
    of (input, reason) for the images without one, and where the captions came from; (items, [], None)
    for a folder without captions."""
    from_metadata, orphans = _metadata_captions(root, field)
    sidecars = {path: path.with_suffix(CAPTION_SUFFIX) for path, _ in items}
    sidecars = {path: sidecar for path, sidecar in sidecars.items() if sidecar.is_file()}
    if not from_metadata and not sidecars:
        return items, [], None
    if from_metadata and not any(value is not None for value in from_metadata.values()):
        raise ShardError(f"no line of {root}'s {METADATA} has a {field!r} field; name the caption field "
                         f"with --caption-column, or pass --no-captions")
    captioned, skipped = [], list(orphans)
    for path, label in items:
        try:
            if path in sidecars:
                caption = _caption_text(sidecars[path].read_bytes().decode("utf-8-sig"), sidecars[path].name)
            else:
                where = (f"no {field!r} in its {METADATA} line" if path in from_metadata
                         else f"no {path.stem}{CAPTION_SUFFIX}, no {METADATA} line")
                caption = _caption_text(from_metadata.get(path), where)
        except (ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
            skipped.append((str(path), str(exc)))
            continue
        captioned.append((path, label, caption))
    if not captioned:
        raise ShardError(_none_captioned(len(items), root, skipped))
    kinds = [what for what, used in ((f"NAME{CAPTION_SUFFIX} sidecars", sidecars), (METADATA, from_metadata)) if used]
    return captioned, skipped, " and ".join(kinds)


def captioned_rows(rows: _HFRows, column: str):
    """(rows, index, caption) for the rows with a caption in `column`, and (row, reason) for the others."""
    captioned, skipped = [], []
    for index, value in enumerate(rows.ds[column]):
        try:
            captioned.append((rows, index, _caption_text(value, f"column {column!r}")))
        except ValueError as exc:
            skipped.append((f"row {index}", str(exc)))
    if not captioned:
        raise ShardError(_none_captioned(len(rows), "the dataset", skipped))
    return captioned, skipped


def _none_captioned(n: int, where, skipped) -> str:
    what, why = skipped[-1]  # (orphaned metadata lines come first)
    return f"none of the {n} images in {where} has a caption; e.g. {what}: {why} (--no-captions ignores captions)"


def open_hf_dataset(source: Path, split: str):
    """A `datasets.Dataset` from a save_to_disk folder or from local parquet/arrow files."""
    import datasets

    if source.is_dir() and any((source / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(source))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ShardError(f"{source}: no split {split!r} (has {', '.join(ds)}); pick one with --split")
            ds = ds[split]
        return ds
    files = sorted(source.rglob("*")) if source.is_dir() else [source]
    files = [f for f in files if f.suffix in TABLE_SUFFIXES]
    if any(f.suffix == ".parquet" for f in files):
        return datasets.Dataset.from_parquet([str(f) for f in files if f.suffix == ".parquet"])
    return datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])


def hf_items(ds, source: Path, image_column: str, label_column: str | None, src_column: str | None = None,
             caption_column: str | None = None):
    import datasets

    for column in (image_column, label_column, src_column, caption_column):
        if column is not None and column not in ds.column_names:
            raise ShardError(f"{source}: no column {column!r} (has {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise ShardError(f"{source}: the dataset is empty")
    for column in (image_column, src_column):
        if column is not None and isinstance(ds.features[column], datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))  # raw bytes: bad images fail per item
    names = None
    if label_column is not None and isinstance(ds.features[label_column], datasets.ClassLabel):
        names = list(ds.features[label_column].names)
    columns = [image_column] + [c for c in (label_column, src_column, caption_column) if c]
    return _HFRows(ds.select_columns(columns), image_column, label_column, src_column), names


class _HFRows:
    """Indexable rows of a dataset, so workers can each take a range without copying it."""

    def __init__(self, ds, image_column, label_column, src_column=None):
        self.ds, self.image_column, self.label_column, self.src_column = ds, image_column, label_column, src_column

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [(self, i) for i in range(*index.indices(len(self)))]
        return (self, index)


# ---------------------------------------------------------------- per-item work


def _hf_image(value):
    if isinstance(value, dict):  # datasets.Image(decode=False)
        value = value["bytes"] if value.get("bytes") is not None else Path(value["path"]).read_bytes()
    return value if isinstance(value, Image.Image) else Image.open(io.BytesIO(value))


def load_item(item):
    """(image, label, key, input image or None, caption or None) for a folder path, a pair of paths or a
    dataset row, each with its caption where it has one; raises on unreadable input."""
    source, index, *caption = item
    caption = caption[0] if caption else None
    if isinstance(source, _HFRows):
        row = source.ds[index]
        label = row[source.label_column] if source.label_column else None
        src = _hf_image(row[source.src_column]) if source.src_column else None
        return _hf_image(row[source.image_column]), label, f"{index:09d}", src, caption
    if isinstance(index, Path):  # a pair: (target path, input path)
        return Image.open(source), None, None, Image.open(index), None
    return Image.open(source), index, None, None, caption


def _fit(image: Image.Image, resolution: int | None) -> Image.Image:
    if resolution is not None:
        image.draft("RGB", (resolution, resolution))  # JPEG: decode at a reduced scale when possible
    image = to_rgb(image)
    if resolution is None or image.size == (resolution, resolution):
        return image
    return ImageOps.fit(image, (resolution, resolution), method=Image.Resampling.BICUBIC)


def encode_image(image, options: ShardOptions) -> bytes:
    """Encoded bytes of a PIL image or a uint8 HxWx3 array, resized and cropped per options."""
    if isinstance(image, np.ndarray):
        if options.format == "jpg" and options.resolution in (None, image.shape[0]) and image.shape[0] == image.shape[1]:
            import simplejpeg

            return simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=options.quality, colorspace="RGB")
        image = Image.fromarray(image)
    image = _fit(image, options.resolution)
    buffer = io.BytesIO()
    pil_format = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[options.format]
    kwargs = {} if options.format == "png" else {"quality": options.quality}
    image.save(buffer, format=pil_format, **kwargs)
    return buffer.getvalue()


def _describe(item) -> str:
    source, index = item[:2] if isinstance(item, tuple) and len(item) >= 2 else (item, None)
    return f"row {index}" if isinstance(source, _HFRows) else str(source)


# ---------------------------------------------------------------- writing


def _write_range(worker: int, items, load, out_dir: Path, options: ShardOptions, tick) -> tuple[dict, list, dict, dict]:
    """Write items into out_dir/data-WORKER-NNNNNN.tar; return ({shard: count}, [(input, reason)], {caption word:
    count}, {label: count}). `load(item)` gives (image, label, key), optionally followed by an input image and a
    caption."""
    import webdataset as wds

    counts, failures, vocabulary, classes = {}, [], collections.Counter(), collections.Counter()
    ext = options.format
    # An integer mtime keeps members plain ustar: a float one makes tarfile add a PAX header to
    # every member, which costs readers more than decoding a 64 px JPEG.
    with wds.ShardWriter(str(out_dir / f"data-{worker:03d}-%06d.tar"), maxcount=options.maxcount,
                         maxsize=options.maxsize, verbose=0, mtime=int(time.time())) as sink:
        for n, item in enumerate(items):
            try:
                image, label, key, *more = load(item)
                src, caption = (*more, None, None)[:2]
                if src is not None:  # one size first, so that the crop to the resolution cuts both alike
                    image, src = align_pair(image, src)
                data = encode_image(image, options)
                src_data = encode_image(src, options) if src is not None else None
            except Exception as exc:  # one bad input never stops the run
                failures.append((_describe(item), f"{type(exc).__name__}: {exc}"))
                tick(1)
                continue
            sample = {"__key__": key or f"{worker:03d}{n:09d}", ext: data}
            if src_data is not None:
                sample[f"src.{ext}"] = src_data
            if label is not None:
                sample["cls"] = int(label)
                if int(label) >= 0:  # (-1: a datasets ClassLabel's "no label")
                    classes[int(label)] += 1
            if caption is not None:
                from bigan.models.text import words

                sample["txt"] = caption
                vocabulary.update(words(caption))
            sink.write(sample)
            counts[Path(sink.fname).name] = sink.count
            tick(1)
    return counts, failures, dict(vocabulary), dict(classes)


_counter = None


def _init_worker(counter):
    global _counter
    _counter = counter


def _tick_shared(n):
    with _counter.get_lock():
        _counter.value += n


def _pool_job(args):
    worker, items, load, out_dir, options = args
    return _write_range(worker, items, load, out_dir, options, _tick_shared)


def _run_workers(items, load, out_dir: Path, options: ShardOptions, bar):
    workers = max(1, min(options.workers, len(items)))
    if workers == 1:
        return [_write_range(0, items, load, out_dir, options, bar.update)]
    bounds = np.linspace(0, len(items), workers + 1).astype(int)
    jobs = [(w, items[bounds[w]:bounds[w + 1]], load, out_dir, options) for w in range(workers)]
    ctx = mp.get_context("fork")
    counter = ctx.Value("q", 0)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(counter,)) as pool:
        pending = pool.map_async(_pool_job, jobs)
        while not pending.ready():
            pending.wait(0.2)
            bar.update(counter.value - bar.n)
        results = pending.get()
    bar.update(counter.value - bar.n)
    return results


def prepare_output(out_dir: Path, overwrite: bool):
    """Create out_dir, refuse a non-empty one unless overwrite (then remove its old shards)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ShardError(f"output {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise ShardError(f"output dir {out_dir} is not empty; pass --overwrite to replace its shards")
        for old in list(out_dir.glob("*.tar")) + [out_dir / MANIFEST]:
            old.unlink(missing_ok=True)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".bigan-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ShardError(f"cannot write to output dir {out_dir}: {exc.strerror or exc}") from None


def write_shards(items, load, out_dir: Path, options: ShardOptions, source: str, label_names=None,
                 paired: bool = False, skipped=(), shuffle_seed: int | None = None,
                 captions_from: str | None = None) -> dict:
    """Write all items as shards plus manifest.json into out_dir (which must exist); return the manifest.

    captions_from: where the items' captions come from (every item has one, `load` gives it), recorded
    in the manifest with the captions' most frequent words (`vocabulary`: [word, count], at most
    VOCABULARY_SIZE, words as bigan.models.text.words splits them); None: no captions.

    With a shuffle_seed the items are shuffled first (seeded, recorded in the manifest): each worker
    writes a contiguous range into its shards, so inputs in sorted order (class folders, a sorted
    dataset) would otherwise give shards of one class each, and batches of a few classes."""
    from tqdm import tqdm

    start = time.time()
    if shuffle_seed is not None:
        items = [items[i] for i in np.random.default_rng(shuffle_seed).permutation(len(items))]
    with tqdm(total=len(items), unit="img", desc="shards", disable=None if options.progress else True) as bar:
        results = _run_workers(items, load, Path(out_dir), options, bar)
    shards, failures, vocabulary, classes = [], list(skipped), collections.Counter(), collections.Counter()
    for counts, failed, words, labels in results:
        shards += [{"name": name, "samples": count} for name, count in counts.items()]
        failures += failed
        vocabulary.update(words)
        classes.update(labels)
    if items and not any(s["samples"] for s in shards):  # no manifest of nothing: training would find no data
        for shard in Path(out_dir).glob("data-*.tar"):  # (the writers open their first shard before any sample)
            shard.unlink(missing_ok=True)
        what, why = failures[0] if failures else ("?", "no sample was written")
        raise ShardError(f"none of the {len(items)} inputs could be read; first: {what}: {why}")
    manifest = {
        "format_version": 1,
        "bigan_version": bigan.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "resolution": options.resolution,
        "image_format": options.format,
        "labels": label_names,
        # samples per class (index i: label i): conditional training draws its fakes' classes as these
        "label_counts": ([classes.get(i, 0) for i in range(max(len(label_names or ()), max(classes) + 1))]
                         if classes else None),
        "paired": paired,
        "captions": captions_from is not None,
        "caption_source": captions_from,
        "vocabulary": ([[word, count] for word, count in sorted(vocabulary.items(), key=lambda wc: (-wc[1], wc[0]))
                        [:VOCABULARY_SIZE]] if captions_from is not None else None),
        "shuffle_seed": shuffle_seed,
        "total": sum(s["samples"] for s in shards),
        "shards": sorted(shards, key=lambda s: s["name"]),
        "skipped": [{"input": what, "reason": why} for what, why in failures],
        "seconds": round(time.time() - start, 2),
    }
    tmp = Path(out_dir) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.rename(Path(out_dir) / MANIFEST)
    return manifest


def make_shards(source: Path, out_dir: Path, options: ShardOptions, labels_from_dirs=False,
                image_column=None, label_column=None, split=None, overwrite=False,
                src_dir: Path | None = None, src_column: str | None = None, seed: int = 0,
                caption_column: str | None = None, captions: bool = True) -> dict:
    """Everything bigan-shards does, callable from Python; `seed` shuffles the inputs before they are
    split into shards. A folder's captions are read where it has any (captions=False: never); a
    dataset's from `caption_column`, which for a folder names the metadata.jsonl field (default text).
    Pairs carry no captions."""
    source = Path(source)
    if not source.exists():
        raise ShardError(f"source not found: {source}")
    if (src_dir or src_column) and (labels_from_dirs or label_column):
        raise ShardError("pairs (--src-dir/--src-column) carry no class labels; drop --labels-from-dirs/--label-column")
    if caption_column is not None and not captions:
        raise ShardError("--caption-column names the captions and --no-captions ignores them: pass one of them")
    if (src_dir or src_column) and caption_column:
        raise ShardError("pairs (--src-dir/--src-column) carry no captions; drop --caption-column")
    is_folder = source.is_dir() and not (
        any((source / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))
        or any(p.suffix in TABLE_SUFFIXES for p in source.iterdir()))
    unmatched, captions_from = [], None
    if not captions and not is_folder:
        raise ShardError(f"--no-captions is for folders (NAME.txt, {METADATA}); {source} is a dataset, whose "
                         f"captions are read only with --caption-column")
    if src_column and is_folder:
        raise ShardError(f"--src-column is for datasets; {source} is a folder of images (pair it with --src-dir)")
    for flag, value in (("--image-column", image_column), ("--label-column", label_column), ("--split", split)):
        if value is not None and is_folder:
            raise ShardError(f"{flag} is for datasets; {source} is a folder of images"
                             + (" (class labels from sub-folders: --labels-from-dirs)" if flag == "--label-column" else ""))
    if labels_from_dirs and not is_folder:
        raise ShardError(f"--labels-from-dirs is for folders of images; {source} is a dataset (name its label "
                         f"column with --label-column)")
    if src_dir and not is_folder:
        raise ShardError(f"--src-dir pairs two folders; {source} is a dataset (name its input column with --src-column)")
    if is_folder and src_dir:
        items, unmatched = paired_folder_items(source, Path(src_dir))
        names = None
    elif is_folder:
        items, names = folder_items(source, labels_from_dirs)
        if caption_column is not None and not any(source.rglob(METADATA)):
            raise ShardError(f"--caption-column names a dataset column or a {METADATA} field; {source} is a "
                             f"folder without {METADATA} (captions beside images, NAME.txt, are read anyway)")
        if captions:
            items, unmatched, captions_from = captioned_folder_items(source, items, caption_column or "text")
    elif source.is_file() and source.suffix not in TABLE_SUFFIXES:
        raise ShardError(f"source {source} is a file; give a folder of images, a save_to_disk folder, "
                         f"or {'/'.join(TABLE_SUFFIXES)} files")
    else:
        rows, names = hf_items(open_hf_dataset(source, split or "train"), source, image_column or "image",
                               label_column, src_column, caption_column)
        if caption_column is not None:
            items, unmatched = captioned_rows(rows, caption_column)
            captions_from = f"column {caption_column!r}"
        else:
            items = rows[:]
    created = not Path(out_dir).exists()
    prepare_output(Path(out_dir), overwrite)
    try:
        return write_shards(items, load_item, Path(out_dir), options, source=str(source), label_names=names,
                            paired=bool(src_dir or src_column), skipped=unmatched, shuffle_seed=seed,
                            captions_from=captions_from)
    except ShardError:
        if created:  # a refused command leaves no trace
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def main(argv=None):
    parser = Parser(prog="bigan-shards", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="image folder, save_to_disk folder, or parquet/arrow file(s)")
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--resolution", type=int, default=None,
                        help="resize the shorter side to R and center-crop to RxR (default: keep originals)")
    parser.add_argument("--format", choices=["jpg", "png", "webp"], default="jpg")
    parser.add_argument("--quality", type=int, default=None, help="jpg/webp quality 1-100 (default 95)")
    parser.add_argument("--maxcount", type=int, default=10_000, help="samples per shard at most")
    parser.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard at most")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes, each with its own shards")
    parser.add_argument("--overwrite", action="store_true", help="replace shards in a non-empty output dir")
    parser.add_argument("--labels-from-dirs", action="store_true", help="class labels from first-level sub-folders")
    parser.add_argument("--image-column", default=None, help="datasets: column with the images (default image)")
    parser.add_argument("--label-column", default=None, help="datasets: column with integer class labels")
    parser.add_argument("--split", default=None, help="datasets: split of a saved DatasetDict (default train)")
    parser.add_argument("--src-dir", type=Path, default=None, help="pairs (pix2pix): folder of input images, "
                        "matched to SOURCE's target images by path without extension")
    parser.add_argument("--src-column", default=None, help="pairs (pix2pix), datasets: column with the input images")
    parser.add_argument("--caption-column", default=None, help="datasets: column with the captions (folders: the "
                        f"{METADATA} field, default text; NAME.txt beside NAME.jpg is read without this flag)")
    parser.add_argument("--no-captions", action="store_true", help="ignore a folder's captions (NAME.txt, "
                        f"{METADATA}): images only")
    parser.add_argument("--seed", type=int, default=0, help="inputs are shuffled with this seed before they are "
                        "split into shards, so that every shard holds a mix (recorded in manifest.json)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.resolution is not None and args.resolution < 1:
        parser.error(f"--resolution must be positive, got {args.resolution}")
    if args.quality is not None and not 1 <= args.quality <= 100:
        parser.error(f"--quality must be in 1..100, got {args.quality}")
    if args.quality is not None and args.format == "png":  # worth going on for: a warning, not an error
        print("bigan-shards: warning: --quality does nothing with --format png (lossless)", file=sys.stderr)
    for flag, value in (("--maxcount", args.maxcount), ("--maxsize", args.maxsize), ("--workers", args.workers)):
        if not value >= 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    options = ShardOptions(resolution=args.resolution, format=args.format, quality=args.quality or 95,
                           maxcount=args.maxcount, maxsize=int(args.maxsize), workers=args.workers,
                           progress=not args.no_progress and sys.stderr.isatty())
    try:
        manifest = make_shards(args.source, args.output_dir, options, args.labels_from_dirs,
                               args.image_column, args.label_column, args.split, args.overwrite,
                               args.src_dir, args.src_column, args.seed, args.caption_column,
                               captions=not args.no_captions)
    except ShardError as exc:
        print(f"bigan-shards: error: {exc}", file=sys.stderr)
        return 2
    captioned = f" with captions from {manifest['caption_source']}" if manifest["captions"] else ""
    print(f"wrote {manifest['total']} {'pairs' if manifest['paired'] else 'images'}{captioned} in "
          f"{len(manifest['shards'])} shards to {args.output_dir} ({manifest['seconds']:.1f} s)")
    skipped = manifest["skipped"]
    if skipped:
        print(f"skipped {len(skipped)} unreadable, unmatched or uncaptioned input(s):", file=sys.stderr)
        for entry in skipped[:50]:
            print(f"  {entry['input']}: {entry['reason']}", file=sys.stderr)
        if len(skipped) > 50:
            print(f"  … and {len(skipped) - 50} more (all listed in {MANIFEST})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
