"""Where a run's data comes from: its shards (the demo set rendered on first use) and this rank's loader."""
from __future__ import annotations

from bigan.data.stream import DataError, Loader, StreamSpec, resolve_shards


DEMO_SETS = ("demo", "demo_captions")  # data.shards values that name a built-in set, not files


def data_source(family, held_out: bool = False, accelerator=None) -> str:
    """data.shards (held_out: eval.data, else data.shards); 'demo' is the family's demo set
    (family.demo), 'demo_captions' the captioned demo set (data.demo_images of them), each rendered
    on first use by rank 0 while the other ranks wait, then found."""
    config = family.config
    shards = (config.eval.data or config.data.shards) if held_out else config.data.shards
    if shards not in DEMO_SETS:
        return shards
    from contextlib import nullcontext

    from bigan.data.demo import ensure_demo_shards
    from bigan.data.demo_captions import ensure_caption_shards

    first = accelerator.main_process_first() if accelerator is not None else nullcontext()
    with first:
        main = accelerator is None or accelerator.is_main_process
        if shards == "demo_captions":
            return str(ensure_caption_shards(config.data.demo_images, config.data.resolution, progress=main))
        return str(ensure_demo_shards(resolution=config.data.resolution, progress=main, **family.demo(held_out)))


def build_loader(family, accelerator, start: dict | None = None, seed: int | None = None) -> Loader:
    """This rank's loader, continuing from `start` (a checkpoint's position) with the stream seed `seed`
    (default train.seed)."""
    config = family.config
    source = data_source(family, accelerator=accelerator)
    shard_set = resolve_shards(source)
    why = family.check_data(shard_set, "data.shards", source)
    if why:
        raise DataError(why)
    m = config.model
    if m.num_classes and shard_set.labels is not None and len(shard_set.labels) != m.num_classes:
        raise DataError(f"model.num_classes={m.num_classes} but the shards have {len(shard_set.labels)} labels")
    if m.num_classes and shard_set.counts is not None and shard_set.labels is None:
        raise DataError(f"model.num_classes={m.num_classes} but the shards' manifest names no labels (write them "
                        f"with bigan-shards --labels-from-dirs or --label-column)")
    family.use_data(shard_set)
    if m.num_classes and shard_set.label_counts is None and accelerator.is_main_process and not start:
        print(f"bigan: {source} does not say how many samples each class has (no label_counts in a bigan manifest, "
              f"as bigan-shards writes since 2026-12-02): G's classes are drawn uniformly, not as the data holds "
              f"them", flush=True)
    d = config.data
    spec = StreamSpec(shard_set, config.train.batch_size, d.resolution, rank=accelerator.process_index,
                      world_size=accelerator.num_processes, seed=config.train.seed if seed is None else seed,
                      mode=d.mode, shuffle_buffer=d.shuffle_buffer, shard_mix=d.shard_mix, flip=d.flip,
                      crop_scale=None if d.crop_scale_min >= 1 else (d.crop_scale_min, 1.0), start=start or {},
                      paired=family.paired)
    loader = Loader(spec, workers=d.workers, device=accelerator.device)
    note = loader.dataset.mixing_note(d.workers) if not start else None  # (said when the run started)
    if note and accelerator.is_main_process:
        print(f"bigan: {note}", flush=True)
    return loader
