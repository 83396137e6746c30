"""Procedural landscape paintings: bigan's built-in demo dataset, no download needed.

Each image is a pure function of (seed, index): a sky gradient with clouds, a sun or moon
with a glow, layered mountain ridgelines fading into aerial haze, an optional lake that
reflects everything above it with ripples, trees on the shore, and a brush-stroke texture,
in a palette after a classic landscape style. Each scene can also be drawn as its layout: the
same shapes (sky, sun or moon, each mountain ridge, water, ground, trees) as flat regions, each
in one colour of the scene's palette, the input of the layout -> painting pix2pix demo. (With
one fixed label colour per region the layout would not say which palette the painting uses,
and a generator could only guess it: bench/RESULTS.md.) The first time the demo set is asked for it is
rendered into shards under a cache dir (`$BIGAN_CACHE`, default `~/.cache/bigan`), by the
same shard writer `bigan-shards` uses, and reused from then on.

    bigan-demo-data --n 10000 --resolution 64      # prints the manifest path
    bigan-demo-data --grid real.png                # a grid of the first 64 images instead
    bigan-demo-data --pairs                        # layout -> painting pairs (training and held-out sets)
    bigan-demo-data --pairs --folders data/        # the same as two folders of PNGs: data/layouts, data/paintings
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bigan.cli import Parser

# name: sky top, sky at the horizon, far ridge, near ridge, water, foliage, sun or moon (RGB 0-1)
PALETTES = {
    "hudson_river": ["#3d6ea8", "#f4d9a0", "#8a7f9a", "#3f4a36", "#6d8aa8", "#24301c", "#fff1c0"],
    "hiroshige": ["#1d3f74", "#e8d7b0", "#6d86a3", "#2c4a5a", "#2f5f86", "#1e2e25", "#e3553c"],
    "monet": ["#9fb7d9", "#f2d6dc", "#b7a6c9", "#7b8f8a", "#8fb3c6", "#4f6b4f", "#fff6e0"],
    "turner": ["#c9a55a", "#fbe6a2", "#b99a6b", "#7a5a3a", "#c7a26a", "#4a3a22", "#fffbe8"],
    "nocturne": ["#0b1430", "#34507e", "#23304f", "#111a2c", "#1c2c4c", "#070c16", "#f0f0d8"],
    "sunset": ["#2a1f5c", "#ff9a4d", "#7a3f6b", "#3a1f3a", "#b0586a", "#1a0f1a", "#ffd27a"],
    "autumn": ["#5d8fc2", "#f7e3b5", "#a08a74", "#7a3e1e", "#5e7f9c", "#8a3b12", "#fff0c8"],
    "alpine": ["#2f6fb5", "#d9ecf7", "#c8d3de", "#5b6b73", "#4f86ad", "#1f3b26", "#ffffff"],
}
_PALETTE_RGB = {
    name: np.array([[int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)] for c in colors], np.float32)
    for name, colors in PALETTES.items()
}
_PALETTE_NAMES = sorted(PALETTES)


class _Layout:
    """The scene's layout, painted alongside it: every region where a painting step's mask is over 1/2,
    flat, in the colour that step paints with (the sky: halfway between its top and horizon colours)."""

    def __init__(self, shape, pal):
        self.image = np.empty(shape, np.float32)
        self.image[...] = (pal[0] + pal[1]) / 2

    def paint(self, color, mask):
        self.image[mask > 0.5] = color


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _noise2d(rng, h, w, cells_y, cells_x):
    """Value noise in [0, 1]: a random (cells_y+1)x(cells_x+1) lattice, smoothly interpolated."""
    lattice = rng.random((cells_y + 1, cells_x + 1), dtype=np.float32)
    ys, xs = np.linspace(0, cells_y, h, endpoint=False), np.linspace(0, cells_x, w, endpoint=False)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = _smoothstep(ys - y0)[:, None], _smoothstep(xs - x0)[None, :]
    top = lattice[y0][:, x0] * (1 - fx) + lattice[y0][:, x0 + 1] * fx
    bottom = lattice[y0 + 1][:, x0] * (1 - fx) + lattice[y0 + 1][:, x0 + 1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def _ridge(rng, w, base_cells, octaves=4):
    """Fractal 1-D profile in about [-1, 1]: octaves of value noise, halving in amplitude."""
    profile, amp = np.zeros(w, np.float32), 1.0
    for k in range(octaves):
        profile += amp * (_noise2d(rng, 1, w, 1, base_cells * 2**k)[0] * 2 - 1)
        amp *= 0.5
    return profile / 1.875


def _blend(img, color, mask):
    """Paint `color` (3,) or (H, W, 3) onto img with an (H, W) alpha mask."""
    return img + (color - img) * mask[..., None]


def _sky(rng, pal, yy, xx, horizon):
    t = (yy / horizon) ** rng.uniform(0.6, 1.4)
    sky = pal[0] + (pal[1] - pal[0]) * np.clip(t, 0, 1)[..., None]
    h, w = yy.shape
    clouds = _noise2d(rng, h, w, 3, 4) * 0.6 + _noise2d(rng, h, w, 6, 12) * 0.4
    cover = rng.uniform(0.35, 0.75)
    cloud_mask = _smoothstep((clouds - cover) / 0.15) * np.clip(1.2 - yy / horizon, 0, 1)
    cloud_color = np.clip(pal[1] * 1.1 + 0.08, 0, 1)
    return _blend(sky, cloud_color, cloud_mask * rng.uniform(0.3, 0.8))


def _sun(rng, pal, img, yy, xx, horizon, layout):
    cx, cy = rng.uniform(0.15, 0.85), rng.uniform(0.1, horizon * 0.8)
    radius = rng.uniform(0.04, 0.09)
    dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    glow = np.exp(-dist / (radius * rng.uniform(2, 4))) * rng.uniform(0.3, 0.6)
    img = img + (pal[6] - img) * glow[..., None]
    disc = _smoothstep((radius - dist) / 0.01)
    layout.paint(pal[6], disc)
    return _blend(img, pal[6], disc)


def _moonlit(pal):
    """The palette by night: colours darkened and shifted to blue, the disc the nocturne's pale moon."""
    night = pal * np.array([0.35, 0.4, 0.55], np.float32)
    night[6] = _PALETTE_RGB["nocturne"][6]
    return night


def _mountains(rng, pal, img, yy, xx, horizon, layout):
    h, w = yy.shape
    layers = rng.integers(2, 5)
    for k in range(layers):
        near = k / max(layers - 1, 1)                      # 0 = farthest ridge, 1 = nearest
        height = rng.uniform(0.12, 0.35) * (1 - 0.4 * near)
        top = horizon - height + _ridge(rng, w, rng.integers(2, 5)) * height * 0.6
        top = top + near * (1 - horizon) * 0.3
        color = pal[2] + (pal[3] - pal[2]) * near
        haze = (1 - near) * rng.uniform(0.2, 0.5)           # aerial perspective
        color = color + (pal[1] - color) * haze
        shade = 1 - 0.25 * _smoothstep((yy - top[None, :]) / 0.3)[..., None]
        texture = 1 + 0.12 * (_noise2d(rng, h, w, 8, 16)[..., None] - 0.5)
        mask = _smoothstep((yy - top[None, :]) / 0.012)
        img = img + (color * shade * texture - img) * mask[..., None]
        layout.paint(color, mask)  # each ridge its own shade, hazier far away
    return img, int(layers)


def _trees(rng, pal, img, yy, xx, ground, layout):
    count = rng.integers(3, 14)
    for _ in range(count):
        tx, size = rng.uniform(0, 1), rng.uniform(0.05, 0.16)
        base = ground + rng.uniform(0.0, 0.05)
        if rng.random() < 0.6:                              # conifer: a triangle
            width = (yy - (base - size)) * rng.uniform(0.25, 0.4)
            mask = _smoothstep((width - np.abs(xx - tx)) / 0.006) * (yy < base)
        else:                                               # broadleaf: a round crown on a trunk
            crown = np.sqrt((xx - tx) ** 2 + ((yy - (base - size * 0.7)) * 1.2) ** 2)
            mask = _smoothstep((size * 0.45 - crown) / 0.01)
            mask = np.maximum(mask, (np.abs(xx - tx) < 0.008) * (yy < base) * (yy > base - size * 0.5))
        color = pal[5] * rng.uniform(0.7, 1.2)
        img = _blend(img, np.clip(color, 0, 1), mask.astype(np.float32))
        layout.paint(np.clip(color, 0, 1), mask)
    return img


def _water(rng, pal, img, yy, xx, waterline, layout):
    """Mirror the picture above `waterline` into the lake below it, rippled and tinted."""
    h, w = yy.shape
    rows = np.arange(h)
    line_row = int(waterline * h)
    src_rows = np.clip(2 * line_row - rows - 1, 0, h - 1)
    ripple = np.sin(rows * rng.uniform(0.8, 1.6) + rng.uniform(0, 6.28)) * rng.uniform(0.5, 2.0)
    cols = (np.arange(w)[None, :] + ripple[:, None] * ((rows - line_row) / h * 4)[:, None]).astype(int)
    reflection = img[src_rows[:, None], np.clip(cols, 0, w - 1)]
    reflection = reflection + (pal[4] - reflection) * rng.uniform(0.25, 0.5)
    mask = (rows >= line_row).astype(np.float32)[:, None].repeat(w, 1)
    layout.paint(pal[4], mask)
    return _blend(img, reflection * 0.9, mask)


def _ground(rng, pal, img, yy, xx, groundline, layout):
    h, w = yy.shape
    top = groundline + _ridge(rng, w, 2) * 0.03
    mask = _smoothstep((yy - top[None, :]) / 0.01)
    color = pal[5] * 1.3 + (pal[3] - pal[5]) * 0.3
    layout.paint(np.clip(color, 0, 1), mask)
    return _blend(img, np.clip(color, 0, 1), mask)


def _brush(rng, img):
    """Multiplicative brush-stroke texture: noise stretched along a random stroke direction."""
    h, w = img.shape[:2]
    if rng.random() < 0.75:  # mostly horizontal strokes, as a landscape painter lays them
        strokes = _noise2d(rng, h, w, h // 2, max(w // 16, 2))
    else:
        strokes = _noise2d(rng, h, w, max(h // 16, 2), w // 2)
    return img * (1 + rng.uniform(0.03, 0.09) * (strokes[..., None] - 0.5) * 2)


def render_landscape(seed: int, index: int, resolution: int = 64) -> np.ndarray:
    """One landscape painting as uint8 (resolution, resolution, 3); the same for the same arguments."""
    return render_scene(seed, index, resolution)[1]


def render_scene(seed: int, index: int, resolution: int = 64, with_attributes: bool = False,
                 moonlit: bool = False, trees_on_ground: bool = True):
    """(layout, painting) of one scene, each uint8 (resolution, resolution, 3).

    with_attributes: (layout, painting, attributes), what the scene shows, read off the draws that
    made it: {"style": palette name, "celestial": "sun" or "moon", "ridges": 2-4, "water": bool,
    "trees": bool}; the same at every resolution. The defaults draw the demo set, where a moon
    shows only in the nocturne palette and trees always stand on dry ground; the captioned
    variant (bigan.data.captions) draws other palettes by night (moonlit) and bare ground
    (trees_on_ground=False), with the same draws otherwise.
    """
    rng = np.random.default_rng([seed, index])
    style = _PALETTE_NAMES[rng.integers(len(_PALETTE_NAMES))]
    pal = np.clip(_PALETTE_RGB[style] * rng.uniform(0.9, 1.1, size=(1, 3)).astype(np.float32), 0, 1)
    moonlit = moonlit and style != "nocturne"  # a nocturne is moonlit already
    if moonlit:
        pal = _moonlit(pal)
    coords = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    horizon = rng.uniform(0.45, 0.7)
    layout = _Layout(yy.shape + (3,), pal)
    img = _sky(rng, pal, yy, xx, horizon)
    img = _sun(rng, pal, img, yy, xx, horizon, layout)
    img, ridges = _mountains(rng, pal, img, yy, xx, horizon, layout)
    shore = rng.uniform(horizon + 0.05, 0.85)
    water = bool(rng.random() < 0.6)
    if water:
        img = _water(rng, pal, img, yy, xx, shore, layout)
        trees = bool(rng.random() < 0.5)
        if trees:
            img = _trees(rng, pal, img, yy, xx, shore, layout)
    else:
        img = _ground(rng, pal, img, yy, xx, shore, layout)
        trees = bool(trees_on_ground)
        if trees:
            img = _trees(rng, pal, img, yy, xx, shore + 0.04, layout)
    img = _brush(rng, img)
    to_uint8 = lambda x: (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)  # noqa: E731
    if not with_attributes:
        return to_uint8(layout.image), to_uint8(img)
    attributes = {"style": style, "celestial": "moon" if moonlit or style == "nocturne" else "sun",
                  "ridges": ridges, "water": water, "trees": trees}
    return to_uint8(layout.image), to_uint8(img), attributes


def cache_dir() -> Path:
    return Path(os.environ.get("BIGAN_CACHE", Path.home() / ".cache" / "bigan"))


HELD_OUT_SEED = 1_000_003  # the held-out pairs of the layout -> painting demo (training uses data seed 0)


def ensure_demo_shards(n: int = 10_000, resolution: int = 64, seed: int = 0, root: Path | None = None,
                       workers: int | None = None, progress: bool = True, paired: bool = False) -> Path:
    """Render the demo set into shards once and return its manifest path; paired: layout -> painting
    pairs (the layout as each sample's input, src.png)."""
    root = Path(root) if root is not None else cache_dir()
    final = root / f"{'layout2painting' if paired else 'landscapes'}-{resolution}px-n{n}-seed{seed}-{'v2' if paired else 'v1'}"
    # pairs in PNG: a layout is flat colours, which JPEG would smear at their edges
    return build_once(final, lambda: [(seed, i, resolution, paired) for i in range(n)], _load_demo_item,
                      f"{n} {'layout/painting pairs' if paired else 'landscapes'} at {resolution} px", "demo set",
                      resolution, "png" if paired else "jpg", workers, progress,
                      source=f"bigan demo landscapes (seed {seed})", paired=paired)


def build_once(final: Path, items, load, what: str, name: str, resolution: int, fmt: str, workers, progress,
               **write_options) -> Path:
    """Shards of items() (each turned into a sample by `load`) at `final`, once; its manifest path.

    The set is built in a temporary folder and renamed into place when complete, so a crash
    leaves nothing half-made and concurrent callers end up sharing one copy.
    """
    from bigan.data.shards import ShardOptions, write_shards

    manifest = final / "manifest.json"
    if manifest.exists():
        return manifest
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        options = ShardOptions(resolution=resolution, format=fmt, quality=95, maxcount=2000,
                               workers=workers or os.cpu_count() or 1, progress=progress)
        if progress:  # a line even where the progress bar is not shown (output not a terminal)
            print(f"bigan: rendering the {name} once: {what} into {final} ({options.workers} processes)", flush=True)
        start = time.time()
        write_shards(items(), load, tmp, options, **write_options)
        if progress:
            print(f"bigan: {name} rendered in {time.time() - start:.0f} s", flush=True)
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: use its copy
            if not manifest.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _load_demo_item(item):
    seed, index, resolution, paired = item
    layout, painting = render_scene(seed, index, resolution)
    return painting, None, f"{index:08d}", layout if paired else None


def write_pair_folders(out: Path, n: int, resolution: int, seed: int = 0):
    """The layout -> painting pairs as two folders of PNGs with matching names (out/layouts, out/paintings)."""
    from PIL import Image

    for name in ("layouts", "paintings"):
        (Path(out) / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        layout, painting = render_scene(seed, i, resolution)
        Image.fromarray(layout).save(Path(out) / "layouts" / f"{i:06d}.png")
        Image.fromarray(painting).save(Path(out) / "paintings" / f"{i:06d}.png")


def main(argv=None):
    parser = Parser(prog="bigan-demo-data", description="Render the built-in landscape demo set into shards.")
    parser.add_argument("--n", type=int, default=10_000, help="number of images")
    parser.add_argument("--resolution", type=int, default=64, help="pixels per side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=None, help="cache dir (default $BIGAN_CACHE or ~/.cache/bigan)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--grid", type=Path, default=None, metavar="PNG",
                        help="write a grid of the first 64 images of the set here instead (rendered, not read back)")
    parser.add_argument("--pairs", action="store_true", help="layout -> painting pairs (pix2pix demo): the "
                        "training set, and a held-out set of 512 pairs drawn with other seeds")
    parser.add_argument("--folders", type=Path, default=None, metavar="DIR",
                        help="with --pairs: write DIR/layouts/ and DIR/paintings/ as PNG files instead of shards")
    args = parser.parse_args(argv)
    if args.folders is not None and not args.pairs:
        parser.error("--folders writes pairs: add --pairs")
    for flag, value in (("--n", args.n), ("--resolution", args.resolution), ("--workers", args.workers)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    drawn = "--grid" if args.grid is not None else "--folders" if args.folders is not None else None
    for flag, value in (("--root", args.root), ("--workers", args.workers)):
        if drawn and value is not None:  # those draw in this process and write no shards
            parser.error(f"{flag} does nothing with {drawn}: it renders in this process and writes no shards")
    if args.grid is not None:
        import torch

        from bigan.sample import write

        scenes = [render_scene(args.seed, i, args.resolution) for i in range(min(args.n, 64))]
        images = np.stack([image for scene in scenes for image in (scene if args.pairs else scene[1:])])
        write(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, args.grid)
        print(args.grid)
        return
    if args.folders is not None:
        write_pair_folders(args.folders, args.n, args.resolution, args.seed)
        print(f"wrote {args.n} pairs to {args.folders / 'layouts'} and {args.folders / 'paintings'}")
        return
    print(ensure_demo_shards(args.n, args.resolution, args.seed, args.root, args.workers, paired=args.pairs))
    if args.pairs:
        print(ensure_demo_shards(512, args.resolution, HELD_OUT_SEED, args.root, args.workers, paired=True))


if __name__ == "__main__":
    main()
