"""Shards, the demo set and the streamer: what users feed bigan and what each rank gets back."""
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bigan.data import shards as shards_mod
from bigan.data.demo import ensure_demo_shards, render_landscape
from bigan.data.stream import DataError, Loader, StreamSpec, resolve_shards


def _solid(color, size=(40, 30)):
    return Image.new("RGB", size, color)


def _png_shard(path: Path, values):
    """A shard whose sample i is a solid PNG with red channel = values[i] (so images identify themselves)."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for v in values:
            buffer = io.BytesIO()
            _solid((int(v), 0, 0), (8, 8)).save(buffer, format="PNG")
            sink.write({"__key__": f"s{v:05d}", "png": buffer.getvalue(), "cls": int(v) % 3})


def _ids(batch):
    """Recover each sample's id from its red channel ([-1, 1] back to 0..255)."""
    return ((batch["image"][:, 0].mean(dim=(1, 2)) + 1) * 127.5).round().long().tolist()


def _loader(source, batch=2, resolution=8, workers=0, **spec):
    spec.setdefault("flip", False)
    return Loader(StreamSpec(resolve_shards(source), batch, resolution, **spec), workers=workers)


# ---------------------------------------------------------------- bigan-shards


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "paintings"
    for name, color in (("dawn", (250, 10, 10)), ("dusk", (10, 10, 250))):
        (root / name / "nested").mkdir(parents=True)
        for i, ext in enumerate(["jpg", "png", "webp", "bmp", "jpeg"]):
            _solid(color, (40 + i, 30)).save(root / name / f"img{i}.{ext}")
        _solid(color).save(root / name / "nested" / "deep.png")
    return root


def test_folder_to_shards_to_stream_round_trip(image_folder, tmp_path):
    out = tmp_path / "shards"
    code = shards_mod.main([str(image_folder), str(out), "--resolution", "16", "--labels-from-dirs",
                            "--maxcount", "4", "--workers", "2", "--format", "png"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total"] == 12 and manifest["labels"] == ["dawn", "dusk"] and manifest["label_counts"] == [6, 6]
    assert manifest["resolution"] == 16 and manifest["image_format"] == "png"
    assert manifest["source"] == str(image_folder) and manifest["bigan_version"]
    assert sum(s["samples"] for s in manifest["shards"]) == 12 and len(manifest["shards"]) == 4
    assert all((out / s["name"]).exists() and s["samples"] <= 4 for s in manifest["shards"])

    seen = []
    for batch in _loader(out, batch=3, resolution=16, mode="epoch", epochs=1):
        images, labels = batch["image"], batch["label"]
        assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
        assert images.min() >= -1 and images.max() <= 1
        red = images[:, 0].mean(dim=(1, 2))
        assert torch.all((red > 0.8) == (labels == 0)), "dawn (red) images must carry label 0"
        seen += labels.tolist()
    assert sorted(seen) == [0] * 6 + [1] * 6


def test_hf_dataset_saved_to_disk_to_shards(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"picture": datasets.Image(), "kind": datasets.ClassLabel(names=["lake", "peak"])})
    rows = {"picture": [_solid((i * 20, 0, 0)) for i in range(7)], "kind": [i % 2 for i in range(7)]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    manifest = shards_mod.make_shards(tmp_path / "saved", tmp_path / "out", shards_mod.ShardOptions(resolution=8, progress=False),
                                      image_column="picture", label_column="kind")
    assert manifest["total"] == 7 and manifest["labels"] == ["lake", "peak"] and manifest["label_counts"] == [4, 3]
    joined = resolve_shards(f"{tmp_path / 'out'}::{tmp_path / 'out' / 'manifest.json'}")
    assert joined.label_counts == [8, 6], "the classes of joined sets are summed"
    # a test split: ClassLabel's -1 ("no label") is no class, and counts of no class are none
    unlabeled = {"picture": rows["picture"][:3], "kind": [-1, -1, -1]}
    datasets.Dataset.from_dict(unlabeled, features=features).save_to_disk(str(tmp_path / "test_split"))
    manifest = shards_mod.make_shards(tmp_path / "test_split", tmp_path / "test_out",
                                      shards_mod.ShardOptions(resolution=8, progress=False),
                                      image_column="picture", label_column="kind")
    assert manifest["total"] == 3 and manifest["label_counts"] is None
    assert resolve_shards(tmp_path / "test_out").label_counts is None
    labels = [b["label"] for b in _loader(tmp_path / "out", batch=7, mode="epoch", epochs=1)]
    assert sorted(labels[0].tolist()) == [0, 0, 0, 0, 1, 1, 1]

    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "rows.parquet"))
    manifest = shards_mod.make_shards(tmp_path / "rows.parquet", tmp_path / "out2", shards_mod.ShardOptions(progress=False),
                                      image_column="picture", label_column="kind")
    assert manifest["total"] == 7


def test_unreadable_inputs_are_skipped_and_listed(image_folder, tmp_path, capsys):
    (image_folder / "dawn" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code = shards_mod.main([str(image_folder), str(tmp_path / "out"), "--resolution", "8"])
    assert code == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["total"] == 12 and len(manifest["skipped"]) == 1
    assert "broken.jpg" in manifest["skipped"][0]["input"]
    assert "broken.jpg" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("missing", "source not found"),
    ("empty", "no images found"),
    ("not_empty_output", "is not empty; pass --overwrite"),
    ("unwritable", "cannot write to output dir"),
])
def test_shards_errors_are_one_line(case, message, image_folder, tmp_path, capsys):
    source, out = image_folder, tmp_path / "out"
    if case == "missing":
        source = tmp_path / "nowhere"
    elif case == "empty":
        source = tmp_path / "empty"
        source.mkdir()
    elif case == "not_empty_output":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    else:
        (tmp_path / "a_file").write_text("x")
        out = tmp_path / "a_file" / "out"
    assert shards_mod.main([str(source), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and err.startswith("bigan-shards: error:")
    if case == "not_empty_output":
        assert shards_mod.main([str(source), str(out), "--overwrite"]) == 0


# ---------------------------------------------------------------- demo set


def test_demo_landscapes_are_deterministic_and_varied(tmp_path):
    a, b = render_landscape(3, 7, 64), render_landscape(3, 7, 64)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    others = np.stack([render_landscape(3, i, 64) for i in range(16)]).astype(np.float32)
    assert others.std(axis=0).mean() > 20, "images should differ from one another"
    assert np.abs(others[:, :32].mean() - others[:, 32:].mean()) > 1, "skies differ from ground"
    manifest = ensure_demo_shards(n=50, resolution=16, root=tmp_path, workers=2, progress=False)
    again = ensure_demo_shards(n=50, resolution=16, root=tmp_path, workers=2, progress=False)
    assert manifest == again and json.loads(manifest.read_text())["total"] == 50
    assert len(list(tmp_path.iterdir())) == 1, "no temporary dirs left behind"


# ---------------------------------------------------------------- streamer


@pytest.fixture
def uneven_shards(tmp_path):
    """Three shards of 7, 3 and 11 samples with ids 0..20."""
    ids = iter(range(21))
    for i, n in enumerate((7, 3, 11)):
        _png_shard(tmp_path / f"part-{i}.tar", [next(ids) for _ in range(n)])
    return tmp_path


def test_epoch_mode_two_ranks_two_workers_uneven_shards(uneven_shards):
    """Fewer shards than readers: equal batches per rank, nothing twice, only the forced remainder left out."""
    for epoch in range(2):
        per_rank = []
        for rank in range(2):
            loader = _loader(str(uneven_shards / "part-{0..2}.tar"), batch=2, workers=2, mode="epoch",
                             rank=rank, world_size=2, epochs=epoch + 1, seed=5)
            batches = [b for b in loader if b["round"] == epoch]
            per_rank.append([i for b in batches for i in _ids(b)])
            assert len(batches) == 5  # floor(21 / (2 ranks * 2)) batches of 2
        everything = per_rank[0] + per_rank[1]
        assert len(everything) == len(set(everything)) == 20, "no sample twice in an epoch"
        assert set(everything) <= set(range(21))


def test_corrupt_jpeg_and_truncated_tar_are_skipped_and_counted(tmp_path):
    import webdataset as wds

    good = io.BytesIO()
    _solid((200, 0, 0), (8, 8)).save(good, format="JPEG")
    with wds.TarWriter(str(tmp_path / "a.tar")) as sink:
        for i in range(6):
            sink.write({"__key__": f"a{i}", "jpg": good.getvalue() if i != 2 else b"\xff\xd8garbage"})
    _png_shard(tmp_path / "b.tar", list(range(40)))
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    with tarfile.open(tmp_path / "b.tar") as probe:  # it really is broken
        with pytest.raises(tarfile.ReadError):
            probe.getmembers()

    loader = _loader(tmp_path, batch=4, seed=0)
    iterator = iter(loader)
    batches = [next(iterator) for _ in range(12)]
    assert all(b["image"].shape == (4, 3, 8, 8) for b in batches)
    assert loader.corrupt_samples >= 2, "the bad JPEG and the truncated member are counted"

    manifest = {"shards": [{"name": "a.tar", "samples": 6}, {"name": "b.tar", "samples": 40}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))  # the counts as written, before the damage
    epoch = _loader(tmp_path, batch=4, mode="epoch", epochs=1)
    assert sum(1 for _ in epoch) == (6 + 40) // 4, "epoch mode keeps its batch count despite losses"
    assert epoch.corrupt_samples >= 2


@pytest.mark.parametrize("mode, workers", [("infinite", 2), ("epoch", 2), ("infinite", 0)])
def test_resume_continues_the_uninterrupted_stream(uneven_shards, mode, workers):
    kwargs = dict(batch=2, workers=workers, mode=mode, seed=11, flip=True, shuffle_buffer=5, crop_scale=(0.5, 1.0))
    straight = _loader(uneven_shards, **kwargs)
    iterator = iter(straight)
    for _ in range(7):  # mid-epoch, and not a multiple of the worker count
        next(iterator)
    state = straight.state_dict()
    expected = [next(iterator)["image"] for _ in range(12)]  # crosses into the next epoch/round

    resumed = iter(_loader(uneven_shards, start=state, **kwargs))
    for want in expected:
        assert torch.equal(next(resumed)["image"], want)


@pytest.mark.parametrize("stop", [9, 10])
def test_resume_right_after_a_workers_last_batch_of_an_epoch(uneven_shards, stop):
    """10 batches an epoch, 5 from each of 2 workers: after batch 9 one worker's epoch is over, after batch
    10 both; a resumed worker used to yield one batch more of the finished epoch."""
    kwargs = dict(batch=2, workers=2, mode="epoch", seed=11, flip=True, shuffle_buffer=5)
    straight = _loader(uneven_shards, **kwargs)
    iterator = iter(straight)
    for _ in range(stop):
        next(iterator)
    state = straight.state_dict()
    expected = [next(iterator)["image"] for _ in range(4)]
    resumed = iter(_loader(uneven_shards, start=state, **kwargs))
    for want in expected:
        assert torch.equal(next(resumed)["image"], want)


def test_stream_errors_name_the_problem(tmp_path, uneven_shards):
    with pytest.raises(DataError, match="shard not found: .*missing-00003.tar"):
        resolve_shards(str(tmp_path / "missing-{00003..00004}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .tar shards in"):
        resolve_shards(tmp_path / "empty")
    with pytest.raises(DataError, match="cannot fill one batch of 64 on each of 2"):
        _loader(uneven_shards, batch=64, mode="epoch", world_size=2)
    state = _loader(uneven_shards, workers=2).state_dict()
    with pytest.raises(DataError, match="workers 2 -> 1"):
        _loader(uneven_shards, workers=1, start=state)


def test_a_shard_set_with_no_samples_is_refused_where_it_is_made_and_where_it_is_read(image_folder, tmp_path, capsys):
    """Found on a GPU: a loader function that failed on every input (a NameError in the worker) left a
    manifest of 0 samples, and training from it died in a DataLoader worker with an IndexError."""
    for path in image_folder.rglob("*"):
        if path.is_file():
            path.write_bytes(b"not an image")
    assert shards_mod.main([str(image_folder), str(tmp_path / "out"), "--resolution", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none of the 12 inputs could be read" in err[0] and "first: " in err[0], err
    assert not (tmp_path / "out" / "manifest.json").exists()
    empty = tmp_path / "empty"  # a manifest written that way before this fix
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"shards": [{"name": "data-000-000000.tar", "samples": 0}],
                                                     "total": 0, "skipped": [{"input": "1", "reason": "NameError"}]}))
    with pytest.raises(DataError, match=f"{empty / 'manifest.json'} lists no samples .1 input skipped, e.g. 1: NameError"):
        resolve_shards(empty)


def test_an_exception_outside_the_trainer_does_not_hang_the_exit(uneven_shards):
    """Workers ignore SIGTERM (so Slurm's signal to the group reaches the trainer alone), and
    multiprocessing ends its children at exit with SIGTERM and waits: a process that raised with a
    Loader still open used to wait forever (found on a GPU, in bench/end_to_end.py)."""
    import subprocess
    import sys

    script = (f"from bigan.data.stream import Loader, StreamSpec, resolve_shards\n"
              f"loader = Loader(StreamSpec(resolve_shards({str(uneven_shards / 'part-{0..2}.tar')!r}), 2, 8), workers=2)\n"
              f"next(iter(loader))\n"
              f"raise SystemExit('the caller failed')\n")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "the caller failed" in result.stderr and "killed by signal" not in result.stderr
    assert time.monotonic() - start < 45, result.stderr[-2000:]


def test_reads_plain_webdataset_shards_without_manifest(tmp_path):
    """Shards bigan did not write: jpeg/webp keys, no cls, no manifest."""
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "foreign.tar")) as sink:
        for i, fmt in enumerate(["JPEG", "WEBP", "JPEG"]):
            buffer = io.BytesIO()
            _solid((0, 200, 0), (20, 12)).save(buffer, format=fmt)
            sink.write({"__key__": f"x{i}", "jpeg" if fmt == "JPEG" else "webp": buffer.getvalue()})
    batch = next(iter(_loader(tmp_path / "foreign.tar", batch=3, resolution=8)))
    assert batch["label"] is None and batch["image"].shape == (3, 3, 8, 8)
    assert batch["image"][:, 1].mean() > 0.4


def test_worker_buffers_are_reused_but_never_overwritten_while_read(uneven_shards):
    """Workers send each of their shared batch buffers once and then only its slot number; a slot is
    refilled only after the Loader has copied it out. With a consumer slower than the workers (so
    they run as far ahead as the DataLoader lets them), every image must still match its label,
    which travels with the batch (a refilled buffer would hold a later batch's images)."""
    import time

    loader = _loader(uneven_shards, batch=3, workers=2, seed=3, shuffle_buffer=4)
    batches = iter(loader)
    for i in range(40):
        batch = next(batches)
        ids = _ids(batch)
        assert [v % 3 for v in ids] == batch["label"].tolist(), f"batch {i}: images {ids} vs labels"
        time.sleep(0.01)
    assert len(loader.buffers) == 2 * loader.dataset.slots  # each worker's ring, sent once


def _noise_pair_folders(root: Path, n=6, size=(40, 30), src_scale=1):
    """Targets of random pixels (every crop and flip shows) and inputs that are the same pictures with
    R and B swapped, optionally stored at another size: an aligned pair has source == image[::-1 channels]."""
    rng = np.random.default_rng(0)
    for name in ("paintings", "layouts"):
        (root / name).mkdir(parents=True)
    for i in range(n):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "paintings" / f"{i:03d}.png")
        swapped = Image.fromarray(np.ascontiguousarray(pixels[..., ::-1]))
        if src_scale != 1:
            swapped = swapped.resize((size[0] * src_scale, size[1] * src_scale), Image.Resampling.NEAREST)
        swapped.save(root / "layouts" / f"{i:03d}.png")
    return root / "paintings", root / "layouts"


def test_pairs_stay_aligned_under_random_crop_and_flip(tmp_path):
    targets, inputs = _noise_pair_folders(tmp_path)
    out = tmp_path / "pairs"
    assert shards_mod.main([str(targets), str(out), "--src-dir", str(inputs), "--format", "png", "--no-progress"]) == 0
    augmented = _loader(out, batch=3, resolution=16, paired=True, flip=True, crop_scale=(0.2, 1.0), seed=3)
    plain = _loader(out, batch=3, resolution=16, paired=True, seed=3)  # the same order, centre crops, no flips
    changed = 0
    for _, batch, reference in zip(range(8), augmented, plain):
        image, source = batch["image"], batch["source"]
        assert source.shape == image.shape == (3, 3, 16, 16)
        assert torch.equal(source, image.flip(1)), "a pair's input and target must take the same crop and flip"
        changed += not torch.equal(image, reference["image"])
    assert changed == 8, "crops (and flips) were drawn"
    # the same draws as for single images: a paired stream's targets are what an unpaired one yields
    single = next(iter(_loader(out, batch=3, resolution=16, flip=True, crop_scale=(0.2, 1.0), seed=3)))
    paired = next(iter(_loader(out, batch=3, resolution=16, paired=True, flip=True, crop_scale=(0.2, 1.0), seed=3)))
    assert torch.equal(single["image"], paired["image"]) and single["source"] is None


def test_pair_inputs_of_another_size_are_fitted_to_their_target(tmp_path):
    targets, inputs = _noise_pair_folders(tmp_path, src_scale=2)
    out = tmp_path / "pairs"
    shards_mod.make_shards(targets, out, shards_mod.ShardOptions(format="png", progress=False), src_dir=inputs)
    batch = next(iter(_loader(out, batch=6, resolution=16, paired=True, mode="epoch", epochs=1, flip=True)))
    # a 2x nearest-neighbour copy, resized back with bicubic: close to, not exactly, the swapped target
    assert (batch["source"] - batch["image"].flip(1)).abs().mean() < 0.05


def test_pairs_from_two_folders_match_by_name_and_list_the_unmatched(tmp_path, capsys):
    targets, inputs = _noise_pair_folders(tmp_path, n=4)
    (targets / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(targets / "sub" / "x.png")
    Image.new("RGB", (8, 8)).save(inputs / "only-input.jpg")
    (inputs / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(inputs / "sub" / "x.jpg")  # another extension, the same name
    out = tmp_path / "pairs"
    assert shards_mod.main([str(targets), str(out), "--src-dir", str(inputs), "--resolution", "8"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["paired"] is True and manifest["total"] == 5
    assert [entry["input"] for entry in manifest["skipped"]] == [str(inputs / "only-input.jpg")]
    assert "unmatched" in capsys.readouterr().err
    with tarfile.open(out / manifest["shards"][0]["name"]) as tar:
        names = tar.getnames()
    assert {n.split(".", 1)[1] for n in names} == {"jpg", "src.jpg"}
    assert resolve_shards(out).paired is True and resolve_shards(tmp_path / "pairs" / "manifest.json").paired


def test_pairs_from_a_dataset_with_two_image_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"painting": datasets.Image(), "sketch": datasets.Image()})
    rows = {"painting": [_solid((i * 30, 0, 0)) for i in range(5)], "sketch": [_solid((0, 0, i * 30)) for i in range(5)]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    manifest = shards_mod.make_shards(tmp_path / "saved", tmp_path / "out",
                                      shards_mod.ShardOptions(resolution=8, format="png", progress=False),
                                      image_column="painting", src_column="sketch")
    assert manifest["paired"] and manifest["total"] == 5
    batch = next(iter(_loader(tmp_path / "out", batch=5, paired=True, mode="epoch", epochs=1)))
    assert torch.equal(batch["image"][:, 0], batch["source"][:, 2]), "each painting with its own sketch"


@pytest.mark.parametrize("args, message", [
    (["--src-dir", "{missing}"], "--src-dir: {missing} is not a folder"),
    (["--src-dir", "{inputs}", "--labels-from-dirs"], "pairs (--src-dir/--src-column) carry no class labels"),
    (["--src-column", "sketch"], "--src-column is for datasets"),
])
def test_pair_errors_are_one_line(args, message, tmp_path, capsys):
    targets, inputs = _noise_pair_folders(tmp_path, n=2)
    fill = {"missing": tmp_path / "nowhere", "inputs": inputs}
    code = shards_mod.main([str(targets), str(tmp_path / "out"), *[a.format(**fill) for a in args]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message.format(**fill) in err[0]


def test_demo_pairs_are_layouts_of_their_paintings(tmp_path):
    from bigan.data.demo import render_scene

    layout, painting = render_scene(0, 3, 64)
    assert np.array_equal(painting, render_landscape(0, 3, 64))
    colours = {tuple(c) for c in layout.reshape(-1, 3).tolist()}
    assert 3 <= len(colours) <= 12, "flat regions: sky, sun, a colour per ridge, water or ground, trees"
    painted = {tuple(c) for c in painting.reshape(-1, 3).tolist()}
    assert len(painted) > 50 * len(colours)
    other_palette = next(render_scene(0, i, 64)[0] for i in range(4, 40)
                         if not np.array_equal(render_scene(0, i, 64)[0][0, 0], layout[0, 0]))
    assert other_palette is not None  # the sky's colour names the scene's palette
    manifest = ensure_demo_shards(n=6, resolution=16, root=tmp_path, workers=1, progress=False, paired=True)
    assert json.loads(manifest.read_text())["paired"]
    batch = next(iter(_loader(manifest, batch=6, resolution=16, paired=True, mode="epoch", epochs=1)))
    assert batch["source"].shape == batch["image"].shape and not torch.equal(batch["source"], batch["image"])


# ---------------------------------------------------------------- mixing sorted inputs

CLASSES, PER_CLASS, MIX_BATCH = 10, 300, 64


def _class_mix(label_batches) -> tuple[float, float]:
    """The statistic of the mixing test: mean classes per batch, and mean share of a batch's largest class."""
    counts = [np.bincount(labels, minlength=CLASSES) for labels in label_batches]
    return float(np.mean([(c > 0).sum() for c in counts])), float(np.mean([c.max() / c.sum() for c in counts]))


def _uniform_mix(batches: int) -> tuple[float, float]:
    """The same statistic for a uniformly shuffled stream of the same samples (mean of 20 shuffles)."""
    labels, rng = np.repeat(np.arange(CLASSES), PER_CLASS), np.random.default_rng(0)
    runs = [_class_mix(np.split(rng.permutation(labels)[:batches * MIX_BATCH], batches)) for _ in range(20)]
    return tuple(np.mean(runs, axis=0))


def _sorted_webdataset(folder: Path, with_manifest: bool) -> Path:
    """10 classes of 300 images written class after class by webdataset.ShardWriter, 100 per shard (another
    tool's sorted shards); with_manifest adds bigan's manifest with the counts."""
    import webdataset as wds

    folder.mkdir()
    pixels = {c: (lambda b: (b.seek(0), b.getvalue())[1])(_encoded(c)) for c in range(CLASSES)}
    with wds.ShardWriter(str(folder / "sorted-%06d.tar"), maxcount=100, verbose=0) as sink:
        for c in range(CLASSES):
            for i in range(PER_CLASS):
                sink.write({"__key__": f"{c}-{i:04d}", "png": pixels[c], "cls": c})
    if with_manifest:
        shards = sorted(folder.glob("*.tar"))
        (folder / "manifest.json").write_text(json.dumps({"shards": [{"name": p.name, "samples": 100} for p in shards]}))
    return folder


def _encoded(c):
    buffer = io.BytesIO()
    _solid((20 * c, 0, 0), (8, 8)).save(buffer, format="PNG")
    return buffer


def _class_sorted(source: str, tmp_path) -> Path:
    if source == "bigan-shards":
        folders = tmp_path / "classes"
        for c in range(CLASSES):
            (folders / f"class{c}").mkdir(parents=True)
            for i in range(PER_CLASS):
                (folders / f"class{c}" / f"{i:04d}.png").write_bytes(_encoded(c).getvalue())
        shards_mod.make_shards(folders, tmp_path / "shards", shards_mod.ShardOptions(format="png", progress=False),
                               labels_from_dirs=True)
        return tmp_path / "shards"
    return _sorted_webdataset(tmp_path / "sorted", with_manifest=source.endswith("manifest"))


MIXED = [  # (source, data mode, readers): one rank's batches, readers = ranks x workers
    ("bigan-shards", "infinite", 1), ("bigan-shards", "infinite", 8), ("bigan-shards", "epoch", 8),
    ("webdataset", "infinite", 1), ("webdataset", "epoch", 1),
    ("webdataset+manifest", "infinite", 1), ("webdataset+manifest", "infinite", 4),
    ("webdataset+manifest", "infinite", 8), ("webdataset+manifest", "epoch", 1),
]


@pytest.mark.parametrize("source, mode, readers", MIXED, ids=["-".join(map(str, c)) for c in MIXED])
def test_class_sorted_inputs_give_batches_as_mixed_as_a_uniform_shuffle(source, mode, readers, tmp_path):
    """10 equal classes written in class order. Statistic: over 40 batches of 64 of rank 0 of `readers` ranks,
    the mean number of classes per batch and the mean share of each batch's largest class; bound: within 0.25
    classes and 0.03 of a uniformly shuffled stream (9.99 classes, a largest share of ~0.17). Before shuffled
    writing and interleaved reading, bigan's own shards gave 4-5 classes and 23-36 % (issue 23). bigan-shards'
    shards are shuffled when written; another tool's sorted shards are mixed by each reader, with several
    readers by reading slices of every shard (which needs the manifest's sizes)."""
    data = _class_sorted(source, tmp_path)
    loader = _loader(data, batch=MIX_BATCH, mode=mode, seed=3, epochs=None, world_size=readers)
    iterator = iter(loader)
    classes, largest = _class_mix([next(iterator)["label"].numpy() for _ in range(40)])
    uniform_classes, uniform_largest = _uniform_mix(40)
    assert classes >= uniform_classes - 0.25 and largest <= uniform_largest + 0.03, \
        (classes, largest, uniform_classes, uniform_largest)


@pytest.mark.parametrize("source, mode", [("webdataset", "infinite"), ("webdataset+manifest", "epoch")])
def test_sorted_shards_that_cannot_be_mixed_across_readers_say_so(source, mode, tmp_path):
    """Without sizes (no manifest) a reader cannot take slices, and epoch mode keeps its exact split: with 8
    readers sharing 30 unshuffled shards, the start-up note says what to do."""
    from bigan.data.stream import ShardStream

    data = _class_sorted(source, tmp_path)
    note = ShardStream(StreamSpec(resolve_shards(data), 64, 8, world_size=8, mode=mode)).mixing_note(1)
    assert note.startswith("warning: each of the 8 data readers mixes only 4 of the 30 shards") and "bigan-shards" in note
    shuffled = _class_sorted("bigan-shards", tmp_path)
    assert ShardStream(StreamSpec(resolve_shards(shuffled), 64, 8, world_size=8, mode=mode)).mixing_note(1) is None


def test_in_each_infinite_round_the_readers_share_one_permutation_of_the_shards(tmp_path):
    """2 ranks x 2 workers over 8 shards: each round, every shard is read by exactly one reader, in an order
    that changes from round to round (before, each reader drew its shards with replacement)."""
    from bigan.data.stream import ShardStream

    shard_set = resolve_shards(str(_sorted_webdataset(tmp_path / "s", with_manifest=False)))
    shard_set.urls = shard_set.urls[:8]
    rounds = []
    for round_ in range(3):
        picked = [url for rank in range(2) for role in range(2)
                  for url, *_ in ShardStream(StreamSpec(shard_set, 4, 8, rank=rank, world_size=2, seed=1))
                  ._round_shards(role, 2, round_)]
        assert sorted(picked) == sorted(shard_set.urls), round_
        rounds.append(picked)
    assert rounds[0] != rounds[1] != rounds[2]


# ---------------------------------------------------------------- pixel formats and pairs


def write_png16(path: Path, array: np.ndarray):
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA by the last axis), written by hand: PIL writes 16-bit
    greyscale only, and that is the case PIL reads wrong."""
    import struct
    import zlib

    a = np.asarray(array, dtype=">u2")
    channels = 1 if a.ndim == 2 else a.shape[2]
    raw = b"".join(b"\x00" + a[y].tobytes() for y in range(a.shape[0]))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 16, {1: 0, 2: 4, 3: 2, 4: 6}[channels], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_images_are_scaled_to_8_bits_in_shards_stream_and_translation(channels, tmp_path):
    """A 16-bit ramp reads as the same ramp in 8 bits wherever bigan reads images (PIL's own convert turns
    16-bit greyscale nearly white)."""
    from bigan.data.stream import decode_rgb
    from bigan.sample import translate

    ramp = np.tile(np.linspace(0, 65535, 16), (16, 1)).astype(np.uint16)
    folder = tmp_path / "images"
    folder.mkdir()
    write_png16(folder / "ramp.png", ramp if channels == 1 else np.stack([ramp] * 3, -1))
    expected = np.round(ramp / 257).astype(np.int64)
    with Image.open(folder / "ramp.png") as image:
        assert image.mode == ("I;16" if channels == 1 else "RGB")
    decoded = decode_rgb({"png": (folder / "ramp.png").read_bytes()}).astype(np.int64)  # a foreign shard's sample
    assert np.abs(decoded - expected[..., None]).max() <= 1
    shards_mod.make_shards(folder, tmp_path / "shards", shards_mod.ShardOptions(format="png", progress=False))
    image = next(iter(_loader(tmp_path / "shards", batch=1, resolution=16)))["image"][0]
    assert ((image + 1) * 127.5 - torch.from_numpy(expected)).abs().max() <= 1.01
    class Echo(torch.nn.Module):
        def forward(self, x, y):
            return x

    inputs, _, _, _ = translate(Echo(), 16, [folder / "ramp.png"])  # bigan-sample --input
    assert ((inputs[0] + 1) * 127.5 - torch.from_numpy(expected)).abs().max() <= 1.01


def test_pairs_of_other_aspect_ratios_are_listed_and_skipped_others_aligned(tmp_path, capsys):
    """An input of the target's aspect but another size is resized to the target before the shared crop (so
    they line up); one of another aspect ratio cannot be lined up by any crop: listed and skipped. Two inputs
    with one name (a.jpg, a.png) are ambiguous: both listed."""
    targets, inputs = tmp_path / "targets", tmp_path / "inputs"
    targets.mkdir(), inputs.mkdir()
    pattern = np.zeros((30, 40, 3), np.uint8)
    pattern[:, :20] = 255  # left half white: where the crop falls shows
    for name in ("same", "wide", "twice", "dup"):
        Image.fromarray(pattern).save(targets / f"{name}.png")
    Image.fromarray(pattern).save(inputs / "same.png")
    Image.fromarray(pattern).resize((80, 60), Image.Resampling.NEAREST).save(inputs / "twice.png")
    Image.new("RGB", (30, 30)).save(inputs / "wide.png")
    for suffix in ("png", "jpg"):
        Image.fromarray(pattern).save(inputs / f"dup.{suffix}")
    out = tmp_path / "pairs"
    assert shards_mod.main([str(targets), str(out), "--src-dir", str(inputs), "--resolution", "16", "--format",
                            "png"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total"] == 2
    reasons = {Path(e["input"]).relative_to(tmp_path).as_posix(): e["reason"] for e in manifest["skipped"]}
    assert "differ in aspect ratio" in reasons["targets/wide.png"]
    assert "ambiguous" in reasons["inputs/dup.png"] and "ambiguous" in reasons["inputs/dup.jpg"]
    err = capsys.readouterr().err
    assert "wide.png" in err and "dup.jpg" in err
    batch = next(iter(_loader(out, batch=2, resolution=16, paired=True, mode="epoch", epochs=1)))
    assert (batch["source"] - batch["image"]).abs().max() < 0.05, "each input lines up with its target"
