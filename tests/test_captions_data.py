"""Captioned shards (issue 27): captions into shards from sidecars, metadata.jsonl and dataset columns,
through the stream beside their images, and the captioned demo set."""
import collections
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bigan.data import captions as demo_text
from bigan.data import shards as shards_mod
from bigan.data.demo_captions import ensure_caption_shards
from bigan.data.demo_captions import main as demo_data_main
from bigan.data.stream import Loader, StreamSpec, caption_vocabulary, mirror_caption, read_shard, resolve_shards
from bigan.models.text import words

CAPTIONS = ["A red sun, still water.", "café au lait — ünïcode", "two ridges\tand  a lake", "x"]


def _vocabulary(texts) -> list:
    counts = collections.Counter(w for t in texts for w in words(t))
    return [[w, c] for w, c in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))]


def _written(out: Path) -> dict:
    """{red value: caption} of every sample in a shard set (images are solid, red = their id)."""
    found = {}
    for url in resolve_shards(out).urls:
        for sample in read_shard(url):
            red = int(np.asarray(Image.open(io.BytesIO(sample["png"])))[0, 0, 0])
            found[red] = sample["txt"].decode("utf-8") if "txt" in sample else None
    return found


def _solid(path: Path, red: int):
    Image.new("RGB", (8, 8), (red, 0, 0)).save(path)


def test_sidecar_captions_round_trip_and_the_uncaptioned_are_listed(tmp_path, capsys):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i, text in enumerate(CAPTIONS):
        _solid(root / ("sub" if i % 2 else ".") / f"{i}.png", 10 * i)
        (root / ("sub" if i % 2 else ".") / f"{i}.txt").write_text(text + "\n", encoding="utf-8")
    _solid(root / "uncaptioned.png", 200)
    _solid(root / "blank.png", 210)
    (root / "blank.txt").write_text("  \n")
    out = tmp_path / "shards"
    assert shards_mod.main([str(root), str(out), "--format", "png", "--no-progress", "--workers", "2"]) == 0
    stdout, stderr = capsys.readouterr()
    assert "4 images with captions from NAME.txt sidecars" in stdout
    assert "uncaptioned.png: no caption" in stderr and "blank.png: empty caption" in stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["captions"] is True and manifest["total"] == 4
    assert manifest["vocabulary"] == _vocabulary(CAPTIONS)
    assert sorted(e["input"] for e in manifest["skipped"]) == [str(root / "blank.png"), str(root / "uncaptioned.png")]
    assert _written(out) == {10 * i: text for i, text in enumerate(CAPTIONS)}, "captions read back exactly"
    assert resolve_shards(out).captions is True
    assert caption_vocabulary(str(out)) == [w for w, _ in _vocabulary(CAPTIONS)]

    plain = tmp_path / "plain"
    assert shards_mod.main([str(root), str(plain), "--format", "png", "--no-progress", "--no-captions"]) == 0
    manifest = json.loads((plain / "manifest.json").read_text())
    assert manifest["captions"] is False and manifest["vocabulary"] is None and manifest["total"] == 6
    assert set(_written(plain).values()) == {None}
    assert resolve_shards(plain).captions is False and caption_vocabulary(str(plain)) is None
    assert resolve_shards(f"{out}::{plain}").captions is False
    assert caption_vocabulary(f"{out}::{out}") == caption_vocabulary(str(out)), "a join sums the counts"


def test_metadata_jsonl_captions_round_trip(tmp_path, capsys):
    root = tmp_path / "imagefolder"
    (root / "train").mkdir(parents=True)
    lines = []
    for i, text in enumerate(CAPTIONS):
        _solid(root / "train" / f"{i}.png", 10 * i)
        lines.append(json.dumps({"file_name": f"{i}.png", "text": text, "other": i}))
    _solid(root / "train" / "unlisted.png", 200)
    lines.append(json.dumps({"file_name": "gone.png", "text": "not there"}))
    (root / "train" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    assert shards_mod.main([str(root), str(out), "--format", "png", "--no-progress"]) == 0
    assert "with captions from metadata.jsonl" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total"] == 4 and manifest["vocabulary"] == _vocabulary(CAPTIONS)
    assert [e["input"].split("/")[-1] for e in manifest["skipped"]] == ["metadata.jsonl:5", "unlisted.png"]
    assert _written(out) == {10 * i: text for i, text in enumerate(CAPTIONS)}

    (root / "train" / "metadata.jsonl").write_text(lines[0] + "\n{not json\n")
    assert shards_mod.main([str(root), str(tmp_path / "bad"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metadata.jsonl:2: not JSON" in err[0], err
    assert not (tmp_path / "bad").exists()


def test_dataset_caption_column_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = CAPTIONS + [None, ""]
    rows = {"image": [Image.new("RGB", (8, 8), (10 * i, 0, 0)) for i in range(len(texts))], "prompt": texts}
    datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"image": datasets.Image(), "prompt": datasets.Value("string")})).save_to_disk(str(tmp_path / "saved"))
    options = shards_mod.ShardOptions(format="png", progress=False)
    manifest = shards_mod.make_shards(tmp_path / "saved", tmp_path / "out", options, caption_column="prompt")
    assert manifest["captions"] and manifest["caption_source"] == "column 'prompt'" and manifest["total"] == 4
    assert manifest["vocabulary"] == _vocabulary(CAPTIONS)
    assert [(e["input"], e["reason"].split(" (")[0]) for e in manifest["skipped"]] == [
        ("row 4", "no caption"), ("row 5", "empty caption")]
    assert _written(tmp_path / "out") == {10 * i: text for i, text in enumerate(CAPTIONS)}
    uncaptioned = shards_mod.make_shards(tmp_path / "saved", tmp_path / "plain", options)  # no flag: images only
    assert uncaptioned["captions"] is False and uncaptioned["total"] == 6


# ---------------------------------------------------------------- the stream


def _sided_shards(root: Path, shards=3, per_shard=8) -> Path:
    """Images whose content says their caption: red = id, green dark on one side and bright on the other,
    captioned "sample ID: bright on the right" (or left)."""
    import webdataset as wds

    root.mkdir()
    for s in range(shards):
        with wds.TarWriter(str(root / f"part-{s}.tar")) as sink:
            for j in range(per_shard):
                i = s * per_shard + j
                pixels = np.zeros((8, 8, 3), np.uint8)
                pixels[..., 0] = 10 * i
                side = "right" if i % 3 else "left"
                pixels[:, 4:, 1] = 255 if side == "right" else 0
                pixels[:, :4, 1] = 0 if side == "right" else 255
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="PNG")
                sink.write({"__key__": f"s{i:04d}", "png": buffer.getvalue(), "txt": f"sample {i}: bright on the {side}"})
    return root


def _check_matched(batch) -> int:
    """Assert each image's caption names its id and its bright side; return how many were mirrored."""
    images, mirrored = batch["image"], 0
    assert len(batch["caption"]) == len(images)
    for image, text in zip(images, batch["caption"]):
        i = int(round((image[0].mean().item() + 1) * 127.5 / 10))
        bright = "right" if image[1, :, 4:].mean() > image[1, :, :4].mean() else "left"
        assert text == f"sample {i}: bright on the {bright}", (text, i, bright)
        mirrored += bright != ("right" if i % 3 else "left")
    return mirrored


@pytest.mark.parametrize("mode, rank, world", [("infinite", 0, 1), ("epoch", 1, 2)])
def test_captions_stay_with_their_images_through_shuffle_workers_flips_and_resume(tmp_path, mode, rank, world):
    source = _sided_shards(tmp_path / "sided")
    spec = dict(mode=mode, rank=rank, world_size=world, seed=4, flip=True, shuffle_buffer=5, shard_mix=2,
                crop_scale=(0.6, 1.0))
    straight = Loader(StreamSpec(resolve_shards(str(source)), 4, 8, **spec), workers=2)
    batches = iter(straight)
    mirrored = sum(_check_matched(next(batches)) for _ in range(5))
    state = straight.state_dict()
    expected = [next(batches) for _ in range(7)]  # crosses into the next round / epoch
    mirrored += sum(_check_matched(batch) for batch in expected)
    assert mirrored > 0, "some images were flipped, and their captions with them"
    straight.close()
    resumed = Loader(StreamSpec(resolve_shards(str(source)), 4, 8, start=state, **spec), workers=2)
    for want, got in zip(expected, resumed):
        assert got["caption"] == want["caption"] and (got["image"] == want["image"]).all()
    resumed.close()


def test_shards_without_manifest_captioned_or_not(tmp_path):
    """Foreign shards (img2dataset's): their vocabulary is read from their captions; without any, None."""
    import webdataset as wds

    captioned = _sided_shards(tmp_path / "sided", shards=1, per_shard=3)
    texts = [f"sample {i}: bright on the {'right' if i % 3 else 'left'}" for i in range(3)]
    assert caption_vocabulary(str(captioned)) == [w for w, _ in _vocabulary(texts)]
    with wds.TarWriter(str(tmp_path / "plain.tar")) as sink:
        for i in range(2):
            buffer = io.BytesIO()
            Image.new("RGB", (8, 8)).save(buffer, format="PNG")
            sink.write({"__key__": f"p{i}", "png": buffer.getvalue()})
    assert caption_vocabulary(str(tmp_path / "plain.tar")) is None
    batch = next(iter(Loader(StreamSpec(resolve_shards(str(tmp_path / "plain.tar")), 2, 8), workers=0)))
    assert batch["caption"] is None


def test_mirroring_swaps_left_and_right_and_keeps_their_case():
    assert mirror_caption("The Left bank, LEFT of the rightmost tree; leftover") == \
        "The Right bank, RIGHT of the leftmost tree; leftover"
    assert mirror_caption(mirror_caption("bright on the right")) == "bright on the right"


# ---------------------------------------------------------------- the captioned demo set


def _parse(text: str) -> dict:
    """The attributes a demo caption names (those it leaves out are absent), read back through its words."""
    found = {}
    kinds = {"style": demo_text.STYLE_WORDS, "colour": demo_text.COLOUR_WORDS, "time": demo_text.TIME_WORDS,
             "ridges": demo_text.RIDGE_WORDS, "water": demo_text.WATER_WORDS, "trees": demo_text.TREE_WORDS}
    for kind, table in kinds.items():
        phrases = sorted(((p, v) for v, ps in table.items() for p in ps), key=lambda pv: -len(pv[0]))
        rest = f" {text} "
        for phrase, value in phrases:  # longest first: "no trees" before "trees", "pale yellow" before "pale"
            if f" {phrase}" in rest.replace(",", " ").replace(":", " "):
                found[kind] = value
                break
    found["celestial"] = "moon" if " moon" in text else "sun" if " sun" in text else None
    return {k: v for k, v in found.items() if v is not None}


def test_demo_captions_build_and_their_captions_name_their_scenes(tmp_path, monkeypatch):
    manifest = ensure_caption_shards(n=6, resolution=16, root=tmp_path, workers=1, progress=False)
    written = json.loads(manifest.read_text())
    expected = {index: (attributes, text) for index, attributes, text in demo_text.training_items(6)}
    assert written["captions"] and written["total"] == 6
    assert written["vocabulary"] == _vocabulary(text for _, text in expected.values())
    for url in resolve_shards(manifest).urls:
        for sample in read_shard(url):
            attributes, text = expected[int(sample["__key__"])]
            assert sample["txt"].decode() == text
            named = _parse(text)
            assert named and all(getattr(attributes, k) == v for k, v in named.items()), (text, attributes)
            image = np.asarray(Image.open(io.BytesIO(sample["jpg"])), np.float32)
            painting = demo_text.render_captioned(0, int(sample["__key__"]), 16)[0]
            assert np.abs(image - painting).mean() < 8, "the image is its caption's scene"
    batch = next(iter(Loader(StreamSpec(resolve_shards(manifest), 6, 16, mode="epoch", epochs=1), workers=0)))
    assert sorted(batch["caption"]) == sorted(text for _, text in expected.values())
    monkeypatch.setenv("BIGAN_CACHE", str(tmp_path))  # data.shards=demo_captions: the same set, found
    assert caption_vocabulary("demo_captions", demo_images=6, resolution=16) == [w for w, _ in written["vocabulary"]]


def test_demo_data_writes_captioned_folders_for_bigan_shards_and_held_out_prompts(tmp_path, capsys):
    assert demo_data_main(["--captions", "--folders", str(tmp_path / "f"), "--n", "3", "--resolution", "16"]) == 0
    texts = [t for _, _, t in demo_text.training_items(3)]
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == [f"{i:06d}.{e}" for i in range(3) for e in ("png", "txt")]
    assert shards_mod.main([str(tmp_path / "f"), str(tmp_path / "s"), "--no-progress"]) == 0
    assert "3 images with captions from NAME.txt sidecars" in capsys.readouterr().out
    written = [sample["txt"].decode() for url in resolve_shards(tmp_path / "s").urls for sample in read_shard(url)]
    assert sorted(written) == sorted(texts)
    assert demo_data_main(["--held-out-prompts", str(tmp_path / "prompts.txt"), "--n", "2"]) == 0
    prompts = (tmp_path / "prompts.txt").read_text().splitlines()
    assert prompts == [t for _, a, t in demo_text.held_out_items(2)]
    assert all(demo_text.is_held_out(a) for _, a, _ in demo_text.held_out_items(2))
