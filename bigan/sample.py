"""bigan-sample: images from a trained generator, on CPU or GPU.

    bigan-sample --checkpoint runs/demo --n 64 --out grid.png          # a grid
    bigan-sample --checkpoint runs/demo/checkpoints/ckpt-000001000 --out samples/   # one PNG each
    bigan-sample --checkpoint runs/demo/export/generator_ema.safetensors --n 1000 --out fakes.npz
    bigan-sample --checkpoint runs/demo --interpolate 8 --out walk.png  # latent interpolation rows
    bigan-sample --checkpoint runs/layout2painting --input layouts/ --out paintings/   # pix2pix: translate
    bigan-sample --checkpoint runs/text2image --prompt "a red sun over still water" --n 16 --out sun.png
    bigan-sample --checkpoint runs/text2image --prompts prompts.txt --n 4 --out pictures/   # one PNG each
    bigan-sample --checkpoint runs/text2image --prompt "a red sun" --prompt-to "a white moon" --interpolate 8 \
        --out walk.png                                                  # text-to-image: rows walking between prompts

CHECKPOINT is a run dir (its exported generator, else its latest complete checkpoint), a
checkpoint dir (plain or DeepSpeed: ZeRO partitions are merged on the CPU, no GPU needed), or an
exported ``.safetensors`` file with ``generator.json`` beside it. Nothing that exists is
overwritten unless ``--overwrite`` says so, and nothing is ever written into ``--input``.
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
from bigan import checkpoint, families
from bigan.tracking import image_grid, to_uint8

GRID_SUFFIXES = (".png", ".jpg", ".jpeg")


class SampleError(Exception):
    pass


def family_of(model: dict) -> "families.base.Family":
    """The family a generator was trained as, from its model settings (with "resolution", and for a family
    with its own config section the "section.key" settings architecture.json records)."""
    from bigan.config import ConfigError, config_from_dict

    sections = {"model": {k: v for k, v in model.items() if k != "resolution" and "." not in k},
                "data": {"resolution": model["resolution"]}}
    for key, value in model.items():
        if "." in key:
            section, name = key.split(".", 1)
            sections.setdefault(section, {})[name] = value
    try:
        return families.build(config_from_dict(sections))
    except (ConfigError, families.UnknownFamily) as exc:
        raise SampleError(f"--checkpoint: cannot rebuild the generator ({exc})") from None


def _build(model: dict):
    from bigan.models.text import TextEncoderError

    try:
        return family_of(model).build_generator()
    except TextEncoderError as exc:  # a model it loads from its own folder (dfgan.text_encoder) is gone
        raise SampleError(f"--checkpoint: cannot rebuild the generator ({exc})") from None


def load_generator(path: str | Path, ema: bool = True):
    """(G in eval mode, model settings dict with its "resolution") from a run dir, checkpoint dir or exported
    file; bigan.sample.family_of(settings) is its family."""
    path = Path(path)
    if not path.exists():
        raise SampleError(f"--checkpoint: {path} does not exist")
    if path.is_dir() and (path / "export" / "generator.json").exists():
        path = path / "export" / ("generator_ema.safetensors" if ema else "generator.safetensors")
        if not path.exists():
            print(f"bigan-sample: warning: no EMA generator in {path.parent} (trained with train.ema_kimg=0); "
                  f"sampling G itself", file=sys.stderr)
            path = path.with_name("generator.safetensors")
    elif path.is_dir() and not _is_checkpoint(path):  # a run dir: its latest complete checkpoint
        latest, skipped = checkpoint.resolve(path, "latest")
        if latest is None:
            raise SampleError(f"--checkpoint: {path} has no exported generator and no complete checkpoint"
                              + (f" ({'; '.join(skipped)})" if skipped else ""))
        for note in skipped:
            print(f"bigan-sample: warning: {note}", file=sys.stderr)
        path = latest
    if path.suffix == ".safetensors":
        meta_file = path.parent / "generator.json"
        if not meta_file.exists():
            raise SampleError(f"--checkpoint: {meta_file} is missing (it describes the generator's architecture)")
        meta = json.loads(meta_file.read_text())
        model = {**meta["model"], "resolution": meta["resolution"], **_family_settings(meta.get("architecture", {}))}
        return _loaded(_build(model), _read_safetensors(path), path), model
    if not path.is_dir():
        raise SampleError(f"--checkpoint: {path} is neither a run dir, a checkpoint dir nor a .safetensors file")
    model = _checkpoint_model(path)
    return _loaded(_build(model), _checkpoint_weights(path, ema), path), model


def _family_settings(architecture: dict) -> dict:
    """The "section.key" settings of a family's own config section, from architecture.json."""
    return {k: v for k, v in architecture.items() if k.split(".")[0] not in ("model", "data", "loss")}


def _is_checkpoint(path: Path) -> bool:
    return (path / checkpoint.MANIFEST).exists() or (path / "data_rank_0.json").exists()


def _checkpoint_model(path: Path) -> dict:
    """The model settings of a checkpoint: its own architecture.json, else the run's config.yaml."""
    architecture = path / "architecture.json"
    if architecture.exists():
        try:
            saved = json.loads(architecture.read_text())
            return {**{k.split(".", 1)[1]: v for k, v in saved.items() if k.startswith("model.")},
                    "resolution": saved["data.resolution"], **_family_settings(saved)}
        except (ValueError, KeyError) as exc:
            raise SampleError(f"--checkpoint: {architecture} is unreadable ({type(exc).__name__}: {exc})") from None
    config_file = path.parent.parent / "config.yaml"  # RUN/checkpoints/ckpt-N -> RUN/config.yaml
    if not config_file.exists():
        raise SampleError(f"--checkpoint: {path} has no architecture.json and {config_file} is missing")
    try:
        config = yaml.safe_load(config_file.read_text())
        return {**config["model"], "resolution": config["data"]["resolution"]}
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise SampleError(f"--checkpoint: {path} has no architecture.json and {config_file} is not a run's "
                          f"config ({type(exc).__name__})") from None


def _checkpoint_weights(path: Path, ema: bool) -> dict:
    """G's weights in a checkpoint: EMA-G's (named in checkpoint.json) unless ema is False, else G's own."""
    ema_file = path / checkpoint.states(path).get("ema", "none")  # the EMA of the family's generator
    if ema and ema_file.is_file():
        return torch.load(ema_file, map_location="cpu", weights_only=False)
    if ema:
        print(f"bigan-sample: warning: {path} holds no EMA generator (train.ema_kimg=0); sampling G itself",
              file=sys.stderr)
    if (path / "model.safetensors").exists():
        return _read_safetensors(path / "model.safetensors")
    if not (path / "G").is_dir():
        raise SampleError(f"--checkpoint: {path} is incomplete: neither model.safetensors nor G/ (DeepSpeed) is there")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(path), tag="G")  # G's ZeRO partitions, merged on the CPU


def _loaded(g, state: dict, source: Path):
    try:
        g.load_state_dict(state)
    except RuntimeError as exc:
        raise SampleError(f"--checkpoint: the weights in {source} do not fit the architecture it names "
                          f"({str(exc).splitlines()[0]})") from None
    return g.eval()


def latents(n: int, z_dim: int, seed: int, truncation: float | None) -> torch.Tensor:
    """Standard normal latents; with truncation t, drawn from the normal truncated to [-t, t] (by its
    inverse CDF: no redrawing, so a tiny t takes no longer than a large one)."""
    generator = torch.Generator().manual_seed(seed)
    if truncation is None:
        return torch.randn(n, z_dim, generator=generator)
    return torch.nn.init.trunc_normal_(torch.empty(n, z_dim), 0.0, 1.0, -truncation, truncation, generator=generator)


def slerp(a, b, t):
    a_n, b_n = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    omega = torch.acos((a_n * b_n).sum(-1, keepdim=True).clamp(-1, 1))
    so = torch.sin(omega).clamp_min(1e-8)
    return torch.sin((1 - t) * omega) / so * a + torch.sin(t * omega) / so * b


@torch.no_grad()
def generate(g, num_classes: int, z: torch.Tensor, labels=None, batch: int = 256, device="cpu", **kwargs) -> torch.Tensor:
    """G(z, y, **kwargs) on latents z in batches (classes 0, 1, ... in turn when it is class-conditional)."""
    g = g.to(device)
    if num_classes and labels is None:
        labels = torch.arange(len(z)) % num_classes
    out = []
    for i in range(0, len(z), batch):
        y = labels[i:i + batch].to(device) if labels is not None else None
        out.append(g(z[i:i + batch].to(device), y, **kwargs).float().cpu())
    return torch.cat(out)


def is_folder(out: str | Path) -> bool:
    return str(out).endswith("/") or Path(out).is_dir()


def write(images: torch.Tensor, out: str | Path, columns: int | None = None, names: list | None = None):
    """A grid (.png/.jpg), a folder of PNGs (DIR/, named 000000.png ... or `names`), or a uint8 NxHxWx3
    array (.npz)."""
    as_uint8 = to_uint8(images).permute(0, 2, 3, 1).numpy()
    if is_folder(out):
        for name, image in zip(names or [f"{i:06d}.png" for i in range(len(as_uint8))], as_uint8):
            (Path(out) / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(Path(out) / name)
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        np.savez_compressed(out, images=as_uint8)
    elif out.suffix.lower() in GRID_SUFFIXES:
        Image.fromarray(image_grid(images, columns)).save(out)
    else:
        raise SampleError(f"--out: {out} must end in .png/.jpg (grid), .npz (array) or / (one PNG each)")


def check_outputs(out: str, names: list, overwrite: bool, input_folder: Path | None = None):
    """Refuse, before anything is generated, to write into the input folder or over existing files."""
    target = Path(out).resolve()
    if input_folder is not None:
        source = input_folder.resolve()
        if target == source or source in target.parents:
            raise SampleError(f"--out: {out} is inside --input {input_folder}: bigan-sample never writes into "
                              f"its input; choose another folder")
    existing = [Path(out) / name for name in names] if is_folder(out) else [Path(out)]
    existing = [p for p in existing if p.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise SampleError(f"--out: {existing[0]} exists{more}; pass --overwrite to replace, or choose another --out")


def input_images(folder: Path) -> list[Path]:
    from bigan.data.shards import IMAGE_SUFFIXES

    if not folder.is_dir():
        raise SampleError(f"--input: {folder} is not a folder of images")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise SampleError(f"--input: no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return paths


def output_names(paths: list[Path], folder: Path) -> list[Path]:
    """The PNG name each input gets in an output folder (its relative path, .png); refuses names that two
    inputs would share (a.jpg and a.png), naming them."""
    names, seen = [path.relative_to(folder).with_suffix(".png") for path in paths], {}
    for path, name in zip(paths, names):
        if name in seen:
            raise SampleError(f"--input: {seen[name].name} and {path.name} in {path.parent} would both be written "
                              f"as {name}; rename one of them")
        seen[name] = path
    return names


@torch.no_grad()
def translate(g, resolution: int, paths: list[Path], batch: int = 32, device="cpu") -> tuple:
    """An image-to-image generator applied to each of `paths` (resized and center-cropped to the training
    resolution): (inputs, outputs, indices of the paths read, [(path, reason) skipped])."""
    from PIL import ImageOps

    from bigan.data.images import to_rgb

    skipped, inputs, outputs, read = [], [], [], []
    g = g.to(device)
    for start in range(0, len(paths), batch):
        chunk = []
        for i, path in enumerate(paths[start:start + batch], start):
            try:
                with Image.open(path) as image:
                    image = ImageOps.fit(to_rgb(image), (resolution, resolution), Image.Resampling.BICUBIC)
            except Exception as exc:  # one unreadable file never stops the rest
                skipped.append((path, f"{type(exc).__name__}: {exc}"))
                continue
            chunk.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1)
            read.append(i)
        if chunk:
            x = torch.stack(chunk).to(device)
            inputs.append(x.cpu())
            outputs.append(g(x, x).float().cpu())
    if not outputs:
        raise SampleError(f"--input: none of the {len(paths)} images could be read")
    return torch.cat(inputs), torch.cat(outputs), read, skipped


def _read_safetensors(path: Path) -> dict:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for truncated or corrupt files
        raise SampleError(f"--checkpoint: {path} is not a readable safetensors file "
                          f"({str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__})") from None


def _parse(argv):
    parser = Parser(prog="bigan-sample", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="run dir, checkpoint dir or exported .safetensors")
    parser.add_argument("--n", type=int, default=None, help="number of images (default 64; with --interpolate 8 "
                        "rows of STEPS, a multiple of STEPS; with --input: at most this many inputs; with "
                        "--prompt/--prompts: of each prompt)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the latents (default 0)")
    parser.add_argument("--truncation", type=float, default=None,
                        help="latents from the standard normal truncated to [-T, T]")
    parser.add_argument("--out", default="samples.png", help="grid .png, folder/ or .npz")
    parser.add_argument("--interpolate", type=int, default=0, metavar="STEPS",
                        help="rows of STEPS (>= 2) images walking between random latents (slerp)")
    parser.add_argument("--input", type=Path, default=None, metavar="DIR",
                        help="image-to-image (pix2pix) generators: translate every image in DIR (--n: at most)")
    parser.add_argument("--prompt", default=None, metavar="TEXT",
                        help="text-to-image (dfgan) generators: what to draw (--n images of it)")
    parser.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                        help="text-to-image: one prompt per line, --n images of each (a grid: one row each)")
    parser.add_argument("--prompt-to", default=None, metavar="TEXT",
                        help="text-to-image, with --prompt and --interpolate STEPS: rows walking from --prompt to this")
    parser.add_argument("--no-ema", action="store_true", help="the raw generator instead of its EMA")
    parser.add_argument("--overwrite", action="store_true", help="replace files that --out already holds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.truncation is not None and not args.truncation > 0:
        parser.error(f"--truncation must be positive, got {args.truncation}")
    if args.n is not None and args.n < 1:
        parser.error("--n must be at least 1")
    if args.interpolate < 0 or args.interpolate == 1:
        parser.error(f"--interpolate must be 0 (off) or at least 2 steps (a walk has two ends), got {args.interpolate}")
    if args.interpolate and args.n is not None and args.n % args.interpolate:
        parser.error(f"--n {args.n} must be a multiple of --interpolate {args.interpolate} (rows of that many steps)")
    if args.prompt is not None and args.prompts is not None:
        parser.error("--prompt and --prompts: give one of them")
    if args.prompt_to is not None and (args.prompt is None or not args.interpolate):
        parser.error("--prompt-to walks from --prompt to it: give --prompt TEXT and --interpolate STEPS too")
    if not (is_folder(args.out) or Path(args.out).suffix.lower() in (".npz", *GRID_SUFFIXES)):
        parser.error(f"--out: {args.out} must end in .png/.jpg (grid), .npz (array) or / (one PNG each)")
    return args


FAMILY_FLAGS = {"seed": "--seed", "truncation": "--truncation", "interpolate": "--interpolate", "input": "--input",
                "prompt": "--prompt", "prompts": "--prompts", "prompt_to": "--prompt-to"}


def _refuse_flags_for(family, args):
    """Flags that do nothing for the generator's family are refused (exit 2), except --seed, a warning."""
    arch = family.name
    if "input" in family.sample_flags and args.input is None:
        raise SampleError(f"--input: this generator translates images (model.arch={arch}); give --input DIR")
    if "prompt" in family.sample_flags and args.prompt is None and args.prompts is None:
        raise SampleError(f"--prompt TEXT or --prompts FILE: this generator draws what a prompt says (model.arch={arch})")
    for key, flag in FAMILY_FLAGS.items():
        if key in family.sample_flags or getattr(args, key) in (None, 0):
            continue
        if key == "seed":
            print(f"bigan-sample: warning: --seed does nothing for model.arch={arch} (it draws nothing when "
                  f"sampling)", file=sys.stderr)
            continue
        raise SampleError(f"{flag} does not apply to model.arch={arch} (its flags: "
                          f"{', '.join(FAMILY_FLAGS[k] for k in family.sample_flags) or 'none'})")


def main(argv=None):
    args = _parse(argv)
    try:
        g, model = load_generator(args.checkpoint, ema=not args.no_ema)
        family = family_of(model)
        _refuse_flags_for(family, args)
        args.n = args.n or (8 * args.interpolate if args.interpolate else None if args.input is not None else 64)
        check_outputs(args.out, family.planned_names(args), args.overwrite, args.input)
        samples = family.sample(g, args, args.device)
        if Path(args.out).suffix.lower() in GRID_SUFFIXES and not is_folder(args.out):
            write(samples.grid if samples.grid is not None else samples.images, args.out, samples.columns)
        else:
            write(samples.images, args.out, names=samples.names)
        if samples.note:
            print(samples.note)
    except (SampleError, checkpoint.CheckpointError) as exc:
        print(f"bigan-sample: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":  # python -m bigan.sample: the imported module's main, so that a family raises
    from bigan.sample import main  # the SampleError it catches (this file runs as __main__ too)

    sys.exit(main())
