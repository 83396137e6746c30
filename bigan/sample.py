"""bigan-sample: images from a trained generator, on CPU or GPU.

    bigan-sample --checkpoint runs/demo --n 64 --out grid.png          # a grid
    bigan-sample --checkpoint runs/demo/checkpoints/ckpt-000001000 --out samples/   # one PNG each
    bigan-sample --checkpoint runs/demo/export/generator_ema.safetensors --n 1000 --out fakes.npz
    bigan-sample --checkpoint runs/demo --interpolate 8 --out walk.png  # latent interpolation rows
    bigan-sample --checkpoint runs/layout2painting --input layouts/ --out paintings/   # pix2pix: translate

CHECKPOINT is a run dir (its exported generator, else its latest checkpoint), a checkpoint
dir (plain or DeepSpeed: ZeRO partitions are merged on the CPU, no GPU needed), or an
exported ``.safetensors`` file with ``generator.json`` beside it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from bigan.cli import Parser
from bigan import checkpoint
from bigan.models import build_models
from bigan.tracking import image_grid, to_uint8

EMA_STATE_INDEX = 2  # custom_checkpoint_2.pkl: the trainer registers state, scalers, EMA in that order


class SampleError(Exception):
    pass


def _build(model: dict, resolution: int):
    g, _ = build_models(model["arch"], resolution, model["z_dim"], model["g_channels"], model["d_channels"],
                        model["num_classes"], model.get("d_norm", "batch"), norm=model.get("norm", "batch"),
                        dropout=model.get("dropout", 0.5), g_upsample=model.get("g_upsample", "transposed"))
    return g


def load_generator(path: str | Path, ema: bool = True):
    """(G in eval mode, model config dict with its "resolution") from a run dir, checkpoint dir or exported file."""
    path = Path(path)
    if not path.exists():
        raise SampleError(f"--checkpoint: {path} does not exist")
    if path.is_dir() and (path / "export" / "generator.json").exists():
        path = path / "export" / ("generator_ema.safetensors" if ema else "generator.safetensors")
        if not path.exists():
            path = path.with_name("generator.safetensors")
    elif path.is_dir() and not (path / "random_states_0.pkl").exists():  # a run dir: its latest checkpoint
        latest = checkpoint.resolve(path, "latest")
        if latest is None:
            raise SampleError(f"--checkpoint: {path} has no exported generator and no checkpoints")
        path = latest
    if path.suffix == ".safetensors":
        meta_file = path.parent / "generator.json"
        if not meta_file.exists():
            raise SampleError(f"--checkpoint: {meta_file} is missing (it describes the generator's architecture)")
        meta = json.loads(meta_file.read_text())
        g = _build(meta["model"], meta["resolution"])
        g.load_state_dict(_read_safetensors(path))
        return g.eval(), {**meta["model"], "resolution": meta["resolution"]}
    config_file = path.parent.parent / "config.yaml"  # RUN/checkpoints/ckpt-N -> RUN/config.yaml
    if not config_file.exists():
        raise SampleError(f"--checkpoint: {config_file} is missing (the run's resolved config)")
    config = yaml.safe_load(config_file.read_text())
    g = _build(config["model"], config["data"]["resolution"])
    ema_file = path / f"custom_checkpoint_{EMA_STATE_INDEX}.pkl"
    if ema and ema_file.exists():
        g.load_state_dict(torch.load(ema_file, map_location="cpu", weights_only=False))
    elif (path / "model.safetensors").exists():
        g.load_state_dict(_read_safetensors(path / "model.safetensors"))
    else:  # a DeepSpeed checkpoint: merge G's ZeRO partitions on the CPU
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        g.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(path), tag="G"))
    return g.eval(), {**config["model"], "resolution": config["data"]["resolution"]}


def latents(n: int, z_dim: int, seed: int, truncation: float | None) -> torch.Tensor:
    """Standard normal latents; with truncation t, components beyond ±t are redrawn."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, z_dim, generator=generator)
    if truncation is not None:
        while (outside := z.abs() > truncation).any():
            z[outside] = torch.randn(int(outside.sum()), generator=generator)
    return z


def slerp(a, b, t):
    a_n, b_n = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    omega = torch.acos((a_n * b_n).sum(-1, keepdim=True).clamp(-1, 1))
    so = torch.sin(omega).clamp_min(1e-8)
    return torch.sin((1 - t) * omega) / so * a + torch.sin(t * omega) / so * b


@torch.no_grad()
def generate(g, model: dict, z: torch.Tensor, labels=None, batch: int = 256, device="cpu") -> torch.Tensor:
    g = g.to(device)
    if model["num_classes"] and labels is None:
        labels = torch.arange(len(z)) % model["num_classes"]
    out = []
    for i in range(0, len(z), batch):
        y = labels[i:i + batch].to(device) if labels is not None else None
        out.append(g(z[i:i + batch].to(device), y).float().cpu())
    return torch.cat(out)


def write(images: torch.Tensor, out: str | Path, columns: int | None = None):
    """A grid (.png/.jpg), a folder of PNGs (DIR/), or a uint8 NxHxWx3 array (.npz)."""
    is_dir, out = str(out).endswith("/"), Path(out)
    as_uint8 = to_uint8(images).permute(0, 2, 3, 1).numpy()
    if is_dir or out.is_dir():
        out.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(as_uint8):
            Image.fromarray(image).save(out / f"{i:06d}.png")
    elif out.suffix == ".npz":
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out, images=as_uint8)
    elif out.suffix.lower() in (".png", ".jpg", ".jpeg"):
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image_grid(images, columns)).save(out)
    else:
        raise SampleError(f"--out: {out} must end in .png/.jpg (grid), .npz (array) or / (one PNG each)")


def input_images(folder: Path) -> list[Path]:
    from bigan.data.shards import IMAGE_SUFFIXES

    if not folder.is_dir():
        raise SampleError(f"--input: {folder} is not a folder of images")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise SampleError(f"--input: no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return paths


@torch.no_grad()
def translate(g, resolution: int, folder: Path, out: str, limit: int | None = None, batch: int = 32,
              device="cpu") -> tuple[int, list]:
    """An image-to-image generator applied to every image in `folder` (each resized and center-cropped
    to the training resolution). out: a folder (one PNG per input, same relative path), a grid .png of
    input | output pairs, or a .npz of the outputs. Returns (images written, [(path, reason) skipped])."""
    from PIL import ImageOps

    paths, skipped, inputs, outputs, names = input_images(folder)[:limit], [], [], [], []
    g = g.to(device)
    for start in range(0, len(paths), batch):
        chunk = []
        for path in paths[start:start + batch]:
            try:
                with Image.open(path) as image:
                    image = ImageOps.fit(image.convert("RGB"), (resolution, resolution), Image.Resampling.BICUBIC)
            except Exception as exc:  # one unreadable file never stops the rest
                skipped.append((path, f"{type(exc).__name__}: {exc}"))
                continue
            chunk.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1)
            names.append(path.relative_to(folder).with_suffix(".png"))
        if chunk:
            x = torch.stack(chunk).to(device)
            inputs.append(x.cpu())
            outputs.append(g(x, x).float().cpu())
    if not outputs:
        raise SampleError(f"--input: none of the {len(paths)} images in {folder} could be read")
    inputs, outputs = torch.cat(inputs), torch.cat(outputs)
    if out.endswith("/") or Path(out).is_dir():
        for name, image in zip(names, to_uint8(outputs).permute(0, 2, 3, 1).numpy()):
            (Path(out) / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(Path(out) / name)
    elif Path(out).suffix.lower() in (".png", ".jpg", ".jpeg"):
        write(torch.stack([inputs, outputs], 1).flatten(0, 1), out, columns=8)
    else:
        write(outputs, out)
    return len(outputs), skipped


def _read_safetensors(path: Path) -> dict:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for truncated or corrupt files
        raise SampleError(f"--checkpoint: {path} is not a readable safetensors file "
                          f"({str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__})") from None


def main(argv=None):
    parser = Parser(prog="bigan-sample", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="run dir, checkpoint dir or exported .safetensors")
    parser.add_argument("--n", type=int, default=None, help="number of images (default 64; with --input: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--truncation", type=float, default=None, help="redraw latent components beyond ±T")
    parser.add_argument("--out", default="samples.png", help="grid .png, folder/ or .npz")
    parser.add_argument("--interpolate", type=int, default=0, metavar="STEPS",
                        help="rows of STEPS images walking between random latents (slerp)")
    parser.add_argument("--input", type=Path, default=None, metavar="DIR",
                        help="image-to-image (pix2pix) generators: translate every image in DIR (--n: at most)")
    parser.add_argument("--no-ema", action="store_true", help="the raw generator instead of its EMA")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.truncation is not None and not args.truncation > 0:  # redrawing until |z| <= 0 never ends
        parser.error(f"--truncation must be positive, got {args.truncation}")
    if (args.n is not None and args.n < 1) or args.interpolate < 0:
        parser.error("--n must be at least 1" if args.interpolate >= 0 else "--interpolate must be >= 0")
    n = args.n or 64
    out = str(args.out)
    if not (out.endswith("/") or Path(out).is_dir() or Path(out).suffix.lower() in (".npz", ".png", ".jpg", ".jpeg")):
        parser.error(f"--out: {out} must end in .png/.jpg (grid), .npz (array) or / (one PNG each)")
    try:
        g, model = load_generator(args.checkpoint, ema=not args.no_ema)
        if (model["arch"] == "pix2pix") != (args.input is not None):
            raise SampleError("--input: this generator translates images (model.arch=pix2pix); give --input DIR"
                              if args.input is None else
                              f"--input is for image-to-image generators; {args.checkpoint} maps noise to images")
        if args.input is not None:
            written, skipped = translate(g, model["resolution"], args.input, out, args.n, device=args.device)
            for path, reason in skipped:
                print(f"bigan-sample: skipped {path}: {reason}", file=sys.stderr)
            print(f"translated {written} images from {args.input}")
        elif args.interpolate:
            rows = max(1, n // args.interpolate)
            ends = latents(2 * rows, model["z_dim"], args.seed, args.truncation).view(rows, 2, -1)
            t = torch.linspace(0, 1, args.interpolate)[None, :, None]
            z = slerp(ends[:, :1], ends[:, 1:], t).reshape(-1, model["z_dim"])
            write(generate(g, model, z, device=args.device), args.out, columns=args.interpolate)
        else:
            z = latents(n, model["z_dim"], args.seed, args.truncation)
            write(generate(g, model, z, device=args.device), args.out)
    except SampleError as exc:
        print(f"bigan-sample: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
