"""Training configuration: typed sections, YAML presets, dotted overrides.

Precedence: CLI ``--section.key=value`` > ``--config FILE`` > defaults. Unknown keys and bad
values stop at start-up with a message naming the key.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(Exception):
    """A bad key or value; the message names it."""


def _f(default, doc, choices=None):
    return field(default=default, metadata={"doc": doc, "choices": choices})


@dataclass
class DataConfig:
    shards: str = _f("demo", "manifest, shard dir, brace pattern or pipe: URLs; 'demo' = built-in landscapes, 'demo_captions' = captioned ones")
    resolution: int = _f(64, "training resolution in pixels (32-256, a power of two; stylegan2 up to 1024)")
    mode: str = _f("infinite", "'infinite' (resampled shards) or 'epoch' (equal batches per rank)",
                   ("infinite", "epoch"))
    workers: int = _f(2, "DataLoader worker processes per rank")
    shuffle_buffer: int = _f(1000, "samples held in each worker's shuffle buffer")
    shard_mix: int = _f(32, "shards each worker reads at once, interleaved at random (mixes shards written in "
                            "sorted order; lower it for pipe: sources, one process per open shard)")
    flip: bool = _f(True, "random horizontal flip")
    crop_scale_min: float = _f(1.0, "random-resized-crop minimum area fraction; 1.0 = center crop only")
    demo_images: int = _f(10_000, "size of the built-in demo set when shards='demo'")


@dataclass
class ModelConfig:
    arch: str = _f("dcgan", "the GAN family (bigan.families): 'dcgan' (conv + BatchNorm), 'resnet' (residual, "
                            "spectral norm), 'pix2pix' (paired image-to-image: U-Net G, PatchGAN D; needs paired "
                            "shards), 'dfgan' (text-to-image: DF-GAN; needs captioned shards, dfgan.* its own keys), "
                            "or package.module:Class for a family of your own")
    z_dim: int = _f(128, "latent dimension")
    g_channels: int = _f(32, "generator base width (64 = classic DCGAN; 32 keeps the CPU demo quick)")
    d_channels: int = _f(32, "discriminator base width")
    num_classes: int = _f(0, "class-conditional with this many classes (labels from the shards); 0 = off")
    d_norm: str = _f("none", "dcgan D: 'none' (kept in check by loss.r1), 'spectral' (SN-DCGAN) or 'batch' "
                             "(classic DCGAN)", ("batch", "spectral", "none"))
    g_upsample: str = _f("transposed", "dcgan G: 'transposed' (4x4 stride-2 transposed convs, classic DCGAN) or "
                                       "'resize' (nearest x2 + 3x3 conv: no checkerboard, 2.25x G's arithmetic)",
                         ("transposed", "resize"))
    norm: str = _f("batch", "pix2pix G and D: 'batch' or 'instance' normalization", ("batch", "instance"))
    dropout: float = _f(0.5, "pix2pix G: dropout in the three innermost decoder blocks (its noise); 0 = none")
    sync_batchnorm: bool = _f(False, "use SyncBatchNorm across ranks (BatchNorm over the global batch)")


@dataclass
class LossConfig:
    name: str = _f("bce", "'bce' (non-saturating), 'lsgan', 'hinge' or 'wgan'", ("bce", "lsgan", "hinge", "wgan"))
    r: float = _f(0.5, "balance of real vs fake D terms: 2*(r*real + (1-r)*fake); 0.5 = plain sum")
    gp: float = _f(10.0, "WGAN-GP weight (used with loss.name=wgan; 0 = off)")
    r1: float = _f(0.2, "R1 gamma on reals; 0 = off")
    r1_interval: int = _f(16, "apply R1 every N iterations (lazy regularization: its own step, scaled by N x "
                                  "loss.d_steps, Adam lr and betas adjusted)")
    d_steps: int = _f(1, "D steps per G step")
    pack: int = _f(0, "PacGAN: D judges this many samples at once, stacked on channels (1 = off; 0 = auto: "
                      "4 for unconditional noise models, else 1; fewer where train.batch_size does not divide by 4)")
    l1: float = _f(100.0, "pix2pix: weight of the L1 distance from G's output to the target (lambda); 0 = GAN loss only")


@dataclass
class TrainConfig:
    batch_size: int = _f(64, "images per process per micro-batch")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step (both D and G)")
    kimg: float = _f(100.0, "training length in thousands of real images shown to D")
    precision: str = _f("no", "mixed precision: 'no', 'bf16' or 'fp16' (autocast, fp32 weights)", ("no", "bf16", "fp16"))
    seed: int = _f(0, "random seed (models, latents, data order)")
    g_lr: float = _f(2e-4, "generator Adam learning rate")
    d_lr: float = _f(2e-4, "discriminator Adam learning rate")
    g_betas: list = _f((0.0, 0.99), "generator Adam betas")
    d_betas: list = _f((0.0, 0.99), "discriminator Adam betas")
    adam_eps: float = _f(1e-8, "Adam epsilon (both models)")
    ema_kimg: float = _f(10.0, "EMA half-life of G in kimg; 0 = no EMA")
    ema_rampup: float = _f(0.05, "EMA half-life at most this fraction of images seen so far; 0 = no ramp-up")
    grad_clip: float = _f(0.0, "clip gradient norm of G and D to this; 0 = off")
    compile: bool = _f(False, "torch.compile G and D")
    channels_last: bool = _f(False, "channels_last memory format (faster convs on GPUs)")
    deepspeed: str = _f("", "DeepSpeed JSON for both G and D ('' = plain Accelerate/DDP, or the launch config's)")
    deepspeed_g: str = _f("", "DeepSpeed JSON for G only (e.g. ZeRO-3), overriding train.deepspeed")
    deepspeed_d: str = _f("", "DeepSpeed JSON for D only (e.g. ZeRO-2), overriding train.deepspeed; "
                              "train.deepspeed_<name> does the same for a family's other networks")
    zero3_shadow: bool = _f(True, "ZeRO-3: a whole copy of each partitioned network per rank draws its no-grad "
                                  "forwards (G's fakes for D), keeping DeepSpeed's prefetch; false: the partitioned "
                                  "network itself, layer by layer (4 bytes a parameter less per rank, no prefetch)")
    max_bad_steps: int = _f(5, "after this many non-finite losses in a row, roll back to the last checkpoint")
    max_rollbacks: int = _f(3, "roll-backs per run at most (each goes on with new batches and latents); then exit 2")


@dataclass
class RunConfig:
    dir: str = _f("runs/demo", "run directory: config, logs, checkpoints, samples, exported generator")
    resume: str = _f("", "'latest', a checkpoint path, or '' to start fresh")
    log_every: int = _f(20, "log scalars every N iterations")
    image_every_kimg: float = _f(4.0, "write sample grids every N kimg")
    ckpt_every_kimg: float = _f(20.0, "checkpoint every N kimg (and at exit)")
    ckpt_limit: int = _f(3, "keep at most this many checkpoints")
    grid_size: int = _f(64, "images in each sample grid")
    progress: bool = _f(True, "progress bar on the main process")


@dataclass
class AugmentConfig:
    kind: str = _f("none", "augmentation of what D sees, reals and fakes alike, differentiable (R1 through it): "
                           "'none', 'diffaugment' (DiffAugment) or 'ada' (adaptive, the 'bgc' pipeline)",
                   ("none", "diffaugment", "ada"))
    policy: str = _f("color,translation,cutout", "diffaugment: its ops, comma-separated (color, translation, cutout)")
    p: float = _f(0.0, "ada: the probability of each transform to start from (fixed if augment.target is 0)")
    target: float = _f(0.6, "ada: the E[sign(D(real))] p steers to; 0 = keep p fixed")
    kimg: float = _f(500.0, "ada: thousands of images for p to move from 0 to 1 at most")
    interval: int = _f(4, "ada: D steps between moves of p")


@dataclass
class EvalConfig:
    every_kimg: float = _f(0.0, "evaluate EMA-G every N kimg during training; 0 = off")
    n: int = _f(5000, "generated samples per evaluation")
    extractor: str = _f("inception", "'inception' (local file, see eval.inception) or a TorchScript/module path")
    inception: str = _f("", "path of inception-2015-12-05.pkl ('' = $BIGAN_INCEPTION or $BIGAN_CACHE/…)")
    metrics: str = _f("fid,kid", "comma-separated: fid, kid, is, pr; pix2pix also l1, psnr (to the targets) "
                                 "('' = none, e.g. with eval.modes only)")
    modes: str = _f("", "mode-coverage classifier file (uint8 images -> class logits): logs Metrics/modes, "
                        "Metrics/kl_modes; '' = off")
    data: str = _f("", "reference shards ('' = data.shards; pix2pix: held-out pairs, '' = the demo's held-out set)")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        self.family_options = None     # the options dataclass of model.arch's family, if it has one
        self.deepspeed_networks = {}   # train.deepspeed_<name> for a family's networks other than g and d
        self.given = frozenset()       # the keys a file or the command line set (rules such as stylegan2.auto keep them)

    def sections(self) -> dict:
        """Section name -> its dataclass instance: the fixed ones, then the family's own (if any)."""
        found = {s.name: getattr(self, s.name) for s in dataclasses.fields(self)}
        if self.family_options is not None:
            found[family_section(self)] = self.family_options
        return found

    def to_dict(self) -> dict:
        out = {name: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}
               for name, obj in self.sections().items()}
        out["train"].update({f"deepspeed_{name}": path for name, path in self.deepspeed_networks.items()})
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _convert(key: str, value, spec: dataclasses.Field):
    """Coerce value (a YAML scalar or a CLI string) to the field's type, or raise naming the key."""
    kind = type(spec.default) if spec.default is not None else str
    if isinstance(value, str) and kind is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{key}: cannot parse {value!r}") from None
    if kind in (tuple, list):
        if not isinstance(value, (list, tuple)) or len(value) != len(spec.default):
            raise ConfigError(f"{key}: expected a list of {len(spec.default)} numbers, got {value!r}")
        try:
            value = [float(v) for v in value]
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a list of {len(spec.default)} numbers, got {value!r}") from None
    elif kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    elif not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    choices = spec.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {value!r}")
    return value


def family_section(config: Config) -> str | None:
    """The config section of model.arch's own options (the family's name), or None if it has none."""
    from bigan import families

    family = families.get(config.model.arch)
    return family.name if family.options is not None else None


def _set(config: Config, key: str, value):
    section, _, name = key.partition(".")
    sections = config.sections()
    if section == "train" and name.startswith("deepspeed_") and name not in ("deepspeed_g", "deepspeed_d"):
        config.deepspeed_networks[name.removeprefix("deepspeed_")] = _convert(key, value, _PATH)
        return
    if section not in sections or not name:
        raise ConfigError(f"unknown config key {key!r} (sections: {', '.join(sections)}"
                          + (f"; a family's own section exists only with its model.arch" if "." in key else "") + ")")
    obj = sections[section]
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if name not in fields:
        raise ConfigError(f"unknown config key {key!r} (known in {section}: {', '.join(fields)})")
    setattr(obj, name, _convert(key, value, fields[name]))


_PATH = _f("", "")


def _validate(c: Config):
    from bigan import families

    d, m, loss, t, r, e, a = c.data, c.model, c.loss, c.train, c.run, c.eval, c.augment
    family = families.get(m.arch)
    metrics = {x.strip() for x in e.metrics.split(",") if x.strip()}
    checks = [
        ("data.resolution", d.resolution in family.resolutions,
         f"must be one of {', '.join(map(str, family.resolutions))} for model.arch={m.arch}"),
        ("data.workers", d.workers >= 0, "must be >= 0"),
        ("data.shuffle_buffer", d.shuffle_buffer >= 1, "must be >= 1"),
        ("data.shard_mix", d.shard_mix >= 1, "must be >= 1"),
        ("data.crop_scale_min", 0 < d.crop_scale_min <= 1, "must be in (0, 1]"),
        ("data.demo_images", d.demo_images >= 1, "must be >= 1"),
        ("model.z_dim", m.z_dim > 0, "must be positive"),
        ("model.g_channels", m.g_channels >= 1, "must be >= 1"),
        ("model.d_channels", m.d_channels >= 1, "must be >= 1"),
        ("model.num_classes", m.num_classes >= 0, "must be >= 0 (0 = unconditional)"),
        ("loss.r", 0 <= loss.r <= 1, "must be in [0, 1]"),
        ("loss.gp", loss.gp >= 0, "must be >= 0"),
        ("loss.r1", loss.r1 >= 0, "must be >= 0"),
        ("loss.d_steps", loss.d_steps >= 1, "must be >= 1"),
        ("loss.r1_interval", loss.r1_interval >= 1, "must be >= 1"),
        ("loss.pack", loss.pack >= 1, "must be >= 1 (1 = off; 0 = auto)"),
        ("loss.pack", loss.pack == 1 or t.batch_size % loss.pack == 0,
         f"must divide train.batch_size ({t.batch_size}) so that every micro-batch splits into packs"),
        ("loss.pack", loss.pack == 1 or m.num_classes == 0,
         "packing is for unconditional models (a pack of samples has no one label); set model.num_classes=0"),
        ("loss.l1", loss.l1 >= 0, "must be >= 0 (0 = GAN loss only)"),
        ("model.dropout", 0 <= m.dropout < 1, "must be in [0, 1)"),
        *family.checks(c),
        ("train.batch_size", t.batch_size >= 1, "must be >= 1"),
        ("train.grad_accum", t.grad_accum >= 1, "must be >= 1"),
        ("train.kimg", t.kimg > 0, "must be positive"),
        ("train.g_lr", t.g_lr > 0, "must be positive"),
        ("train.d_lr", t.d_lr > 0, "must be positive"),
        ("train.g_betas", all(0 <= b < 1 for b in t.g_betas), "must be two numbers in [0, 1)"),
        ("train.d_betas", all(0 <= b < 1 for b in t.d_betas), "must be two numbers in [0, 1)"),
        ("train.adam_eps", t.adam_eps > 0, "must be positive"),
        ("train.ema_kimg", t.ema_kimg >= 0, "must be >= 0 (0 = no EMA)"),
        ("train.ema_rampup", t.ema_rampup >= 0, "must be >= 0 (0 = no ramp-up)"),
        ("train.grad_clip", t.grad_clip >= 0, "must be >= 0 (0 = off)"),
        ("train.max_bad_steps", t.max_bad_steps >= 1, "must be >= 1"),
        ("train.max_rollbacks", t.max_rollbacks >= 0, "must be >= 0"),
        ("run.log_every", r.log_every >= 1, "must be >= 1"),
        ("run.image_every_kimg", r.image_every_kimg > 0, "must be positive"),
        ("run.ckpt_every_kimg", r.ckpt_every_kimg > 0, "must be positive"),
        ("run.ckpt_limit", r.ckpt_limit >= 1, "must be >= 1"),
        ("run.grid_size", r.grid_size >= 1, "must be >= 1"),
        ("eval.every_kimg", e.every_kimg >= 0, "must be >= 0 (0 = off)"),
        ("eval.n", e.n >= 1, "must be >= 1"),
        ("eval.metrics", metrics <= set(family.metrics),
         f"model.arch={m.arch} is evaluated with {', '.join(family.metrics)}"),
        ("augment.policy", {x.strip() for x in a.policy.split(",") if x.strip()} <= {"color", "translation", "cutout"}
         and a.policy.strip(", "), "must name some of color, translation, cutout"),
        ("augment.p", 0 <= a.p <= 1, "must be in [0, 1]"),
        ("augment.p", a.p == 0 or a.kind == "ada", f"is ADA's starting probability; augment.kind={a.kind} has none"),
        ("augment.target", 0 <= a.target <= 1, "must be in [0, 1] (0 = p fixed)"),
        ("augment.kimg", a.kimg > 0, "must be positive"),
        ("augment.interval", a.interval >= 1, "must be >= 1"),
        ("eval.metrics", e.every_kimg == 0 or e.metrics.strip(",").strip() or e.modes,
         "is empty and so is eval.modes: evaluation every eval.every_kimg would compute nothing"),
    ]
    for section, obj in c.sections().items():  # no inf or nan anywhere (train.kimg=.inf never ends)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            numbers = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                raise ConfigError(f"{section}.{f.name}: must be a finite number, got {value!r}")
    for key, ok, message in checks:
        if not ok:
            section, name = key.split(".")
            raise ConfigError(f"{key}: {message}, got {getattr(c.sections()[section], name)!r}")


def check_files(c: Config):
    """What the config names on disk, checked before anything is built or written (cheap checks only).

    The shards themselves are checked by the caller (bigan.data.stream.resolve_shards)."""
    named = {key: getattr(getattr(c, key.split(".")[0]), key.split(".")[1]) for key in
             ("train.deepspeed", "train.deepspeed_g", "train.deepspeed_d", "eval.inception", "eval.modes")}
    named.update({f"train.deepspeed_{name}": path for name, path in c.deepspeed_networks.items()})
    for key, value in named.items():
        if value and not Path(value).is_file():
            raise ConfigError(f"{key}: file not found: {value}")
    if c.eval.extractor != "inception" and not Path(c.eval.extractor).is_file():
        raise ConfigError(f"eval.extractor: 'inception' or a TorchScript/module file, and {c.eval.extractor} is no file")
    features = {m.strip() for m in c.eval.metrics.split(",") if m.strip()} & {"fid", "kid", "is", "pr"}
    if c.eval.every_kimg > 0 and features and c.eval.extractor == "inception":  # before the demo set renders
        from bigan.metrics.features import inception_path, missing_inception

        weights = inception_path(c.eval.inception or None)
        if not weights.is_file():
            raise ConfigError(f"eval.every_kimg: {missing_inception(weights, '--eval.inception')}")
    if c.run.resume not in ("", "latest") and not Path(c.run.resume).is_dir():
        raise ConfigError(f"run.resume: '', 'latest' or a checkpoint folder, and {c.run.resume} is no folder")
    run_dir = Path(c.run.dir)
    if not c.run.resume and (run_dir / "checkpoints").is_dir():
        from bigan.checkpoint import checkpoints

        found = checkpoints(run_dir)
        if found:  # a second run here would rotate out its own checkpoints and mix its logs with the first's
            raise ConfigError(f"run.dir: {run_dir} holds another run (checkpoints up to {found[-1].name}); continue it "
                              f"with --run.resume=latest, or start this one in a new --run.dir (or delete {run_dir})")
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigError(f"run.dir: cannot create or write {run_dir} ({existing} is "
                          f"{'not a folder' if not existing.is_dir() else 'not writable'})")


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file (nested sections), then `section.key=value` overrides."""
    config = _apply(_settings(path, overrides))
    resolve_auto(config)
    _validate(config)
    return config


def peek(path: str | Path | None, overrides: typing.Sequence[str], *keys: str) -> tuple:
    """The values the file and the overrides give fixed-section keys (`run.dir`), or their defaults, before the
    rest is read or checked: a resume reads its run's own config.yaml, whose model.arch may differ from the
    default's and have keys of its own (--stylegan2.style_mixing=0.5)."""
    defaults = Config()
    values = {key: getattr(getattr(defaults, key.partition(".")[0]), key.partition(".")[2]) for key in keys}
    values.update((k, v) for k, v in _settings(path, overrides) if k in values)
    return tuple(values[key] for key in keys)


def _settings(path: str | Path | None, overrides: typing.Sequence[str]) -> list[tuple[str, typing.Any]]:
    """(key, value) in order: the file's, then the command line's."""
    settings = []
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected sections (data:, model:, …) at the top level")
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping")
            settings += [(f"{section}.{name}", value) for name, value in values.items()]
    for item in overrides:
        key, sep, value = item.removeprefix("--").partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like --section.key=value")
        settings.append((key, value))
    return settings


def _apply(settings) -> Config:
    """A Config from (key, value) pairs: the fixed sections' keys first (model.arch among them), then the
    keys of that family's own section, which only exists once the family is known."""
    from bigan import families

    config = Config()
    fixed = {f.name for f in dataclasses.fields(Config)}
    for key, value in settings:
        if key.partition(".")[0] in fixed:
            _set(config, key, value)
    try:
        family = families.get(config.model.arch)
    except families.UnknownFamily as exc:
        raise ConfigError(f"model.arch: {exc}") from None
    if family.options is not None:
        config.family_options = family.options()
    for key, value in settings:
        if key.partition(".")[0] not in fixed:
            _set(config, key, value)
    config.given = frozenset(key for key, _ in settings)
    return config


def resolve_auto(config: Config) -> Config:
    """Settings left to bigan (0 = auto), fixed from the rest of the config: the run's config.yaml
    records what was used, so a resume or a sampler reads the value and not the rule."""
    from bigan import families

    family = families.get(config.model.arch)
    family.resolve(config, int(os.environ.get("WORLD_SIZE", "1")))
    if config.loss.pack == 0:
        config.loss.pack = family.auto_pack(config)
    return config


def config_from_dict(data: dict) -> Config:
    """A Config from to_dict() output (e.g. the config.yaml saved in a run dir)."""
    return resolve_auto(_apply([(f"{section}.{name}", value) for section, values in data.items()
                                for name, value in values.items()]))
