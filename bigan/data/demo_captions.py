"""The captioned demo set: the demo landscapes with a caption each (bigan.data.captions), no download needed.

`data.shards=demo_captions` trains on it: `data.demo_images` scenes at `data.resolution`, rendered
once into shards under the cache dir (`$BIGAN_CACHE`, default `~/.cache/bigan`) by the shard writer
`bigan-shards` uses, each sample an image and its caption (`KEY.jpg`, `KEY.txt`), the manifest with
the captions' vocabulary. The scenes are bigan.data.captions.training_items: the attribute
combinations held out for evaluation never appear in them.

    bigan-demo-data --captions --n 10000 --resolution 64    # prints the manifest path
    bigan-demo-data --captions --folders data/ --n 500      # data/000000.png + 000000.txt ...: try bigan-shards on it
    bigan-demo-data --held-out-prompts prompts.txt --n 256  # one held-out caption per line

Any other bigan-demo-data command is bigan.data.demo's.
"""
from __future__ import annotations

import sys
from pathlib import Path

from bigan.cli import Parser
from bigan.data import demo

DEFAULT_PROMPTS = 256  # held-out prompts written by --held-out-prompts without --n


def ensure_caption_shards(n: int = 10_000, resolution: int = 64, seed: int = 0, root: Path | None = None,
                          workers: int | None = None, progress: bool = True) -> Path:
    """Render the captioned demo set into shards once and return its manifest path (as
    bigan.data.demo.ensure_demo_shards: built in a temporary folder, renamed into place when complete)."""
    from bigan.data.captions import training_items

    root = Path(root) if root is not None else demo.cache_dir()
    final = root / f"landscapes-captioned-{resolution}px-n{n}-seed{seed}-v1"
    return demo.build_once(final, lambda: [(seed, index, resolution, text) for index, _, text in training_items(n, seed)],
                           _load_captioned_item, f"{n} landscapes with captions at {resolution} px",
                           "captioned demo set", resolution, "jpg", workers, progress,
                           source=f"bigan demo landscapes with captions (seed {seed})", captions_from="bigan.data.captions")


def _load_captioned_item(item):
    from bigan.data.captions import render_captioned

    seed, index, resolution, text = item
    return render_captioned(seed, index, resolution)[0], None, f"{index:08d}", None, text


def write_caption_folder(out: Path, n: int, resolution: int, seed: int = 0):
    """The captioned demo set as a folder of PNGs, each with its caption beside it (out/000000.png, out/000000.txt)."""
    from PIL import Image

    from bigan.data.captions import render_captioned, training_items

    Path(out).mkdir(parents=True, exist_ok=True)
    for i, (index, _, text) in enumerate(training_items(n, seed)):
        Image.fromarray(render_captioned(seed, index, resolution)[0]).save(Path(out) / f"{i:06d}.png")
        (Path(out) / f"{i:06d}.txt").write_text(text + "\n", encoding="utf-8")


def write_held_out_prompts(path: Path, n: int, seed: int | None = None):
    """n captions of held-out scenes (attribute combinations training never shows), one per line."""
    from bigan.data.captions import held_out_items

    texts = [text for _, _, text in held_out_items(n, demo.HELD_OUT_SEED if seed is None else seed)]
    Path(path).write_text("".join(text + "\n" for text in texts), encoding="utf-8")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not any(arg.split("=", 1)[0] in ("--captions", "--held-out-prompts") for arg in argv):
        return demo.main(argv)
    parser = Parser(prog="bigan-demo-data", description="Render the captioned demo set, or its held-out prompts.")
    parser.add_argument("--captions", action="store_true", help="the captioned demo set (shards, or --folders)")
    parser.add_argument("--held-out-prompts", type=Path, default=None, metavar="FILE",
                        help="write captions of held-out scenes here, one per line")
    parser.add_argument("--folders", type=Path, default=None, metavar="DIR",
                        help="with --captions: write DIR/NNNNNN.png and DIR/NNNNNN.txt instead of shards")
    parser.add_argument("--n", type=int, default=None,
                        help=f"images (default 10000), or prompts (default {DEFAULT_PROMPTS})")
    parser.add_argument("--resolution", type=int, default=None, help="pixels per side (default 64)")
    parser.add_argument("--seed", type=int, default=None, help="scenes' seed (default 0; held-out prompts: "
                        f"{demo.HELD_OUT_SEED})")
    parser.add_argument("--root", type=Path, default=None, help="cache dir (default $BIGAN_CACHE or ~/.cache/bigan)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    if args.held_out_prompts is not None:
        n = args.n or DEFAULT_PROMPTS
        try:
            write_held_out_prompts(args.held_out_prompts, n, args.seed)
        except OSError as exc:
            parser.error(f"--held-out-prompts: cannot write {args.held_out_prompts}: {exc.strerror or exc}")
        print(f"wrote {n} held-out prompts to {args.held_out_prompts}")
        return 0
    n, resolution, seed = args.n or 10_000, args.resolution or 64, args.seed or 0
    if args.folders is not None:
        write_caption_folder(args.folders, n, resolution, seed)
        print(f"wrote {n} images with captions to {args.folders} (NNNNNN.png beside NNNNNN.txt; "
              f"bigan-shards {args.folders} OUT reads them)")
        return 0
    print(ensure_caption_shards(n, resolution, seed, args.root, args.workers))
    return 0


def check_arguments(parser, args):
    """Refuse contradictory and idle flags, one line naming the flag."""
    if args.captions and args.held_out_prompts is not None:
        parser.error("--captions and --held-out-prompts write different things: pass one of them")
    for flag, value in (("--n", args.n), ("--resolution", args.resolution), ("--workers", args.workers)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.held_out_prompts is not None:
        for flag, value in (("--folders", args.folders), ("--resolution", args.resolution)):
            if value is not None:
                parser.error(f"{flag} does nothing with --held-out-prompts: it writes text, no images")
        if args.held_out_prompts.is_dir():
            parser.error(f"--held-out-prompts: {args.held_out_prompts} is a folder; name a file")
    drawn = "--held-out-prompts" if args.held_out_prompts is not None else "--folders" if args.folders else None
    for flag, value in (("--root", args.root), ("--workers", args.workers)):
        if drawn and value is not None:  # those draw in this process and write no shards
            parser.error(f"{flag} does nothing with {drawn}: it writes in this process, no shards")


if __name__ == "__main__":
    sys.exit(main())
