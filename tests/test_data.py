"""Shards, the demo set and the streamer: what users feed bigan and what each rank gets back."""
import io
import json
import tarfile
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
    assert manifest["total"] == 12 and manifest["labels"] == ["dawn", "dusk"]
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
    assert manifest["total"] == 7 and manifest["labels"] == ["lake", "peak"]
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
