"""Training configuration: typed sections, YAML presets, dotted overrides.

Precedence: CLI ``--section.key=value`` > ``--config FILE`` > defaults. Unknown keys and bad
values stop at start-up with a message naming the key.
"""
from __future__ import annotations

import dataclasses
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
    shards: str = _f("demo", "manifest, shard dir, brace pattern or pipe: URLs; 'demo' = built-in landscapes")
    resolution: int = _f(64, "training resolution in pixels (32-256, a power of two)")
    mode: str = _f("infinite", "'infinite' (resampled shards) or 'epoch' (equal batches per rank)",
                   ("infinite", "epoch"))
    workers: int = _f(2, "DataLoader worker processes per rank")
    shuffle_buffer: int = _f(1000, "samples held in each worker's shuffle buffer")
    flip: bool = _f(True, "random horizontal flip")
    crop_scale_min: float = _f(1.0, "random-resized-crop minimum area fraction; 1.0 = center crop only")
    demo_images: int = _f(10_000, "size of the built-in demo set when shards='demo'")


@dataclass
class ModelConfig:
    arch: str = _f("dcgan", "'dcgan' (conv + BatchNorm) or 'resnet' (residual, spectral norm)", ("dcgan", "resnet"))
    z_dim: int = _f(128, "latent dimension")
    g_channels: int = _f(32, "generator base width (64 = classic DCGAN; 32 keeps the CPU demo quick)")
    d_channels: int = _f(32, "discriminator base width")
    num_classes: int = _f(0, "class-conditional with this many classes (labels from the shards); 0 = off")
    d_norm: str = _f("spectral", "dcgan D: 'spectral' (SN-DCGAN), 'batch' (classic DCGAN) or 'none'",
                     ("batch", "spectral", "none"))
    sync_batchnorm: bool = _f(False, "use SyncBatchNorm across ranks (BatchNorm over the global batch)")


@dataclass
class LossConfig:
    name: str = _f("hinge", "'bce' (non-saturating), 'lsgan', 'hinge' or 'wgan'", ("bce", "lsgan", "hinge", "wgan"))
    r: float = _f(0.5, "balance of real vs fake D terms: 2*(r*real + (1-r)*fake); 0.5 = plain sum")
    gp: float = _f(10.0, "WGAN-GP weight (used with loss.name=wgan; 0 = off)")
    r1: float = _f(0.0, "R1 gamma on reals; 0 = off")
    r1_interval: int = _f(16, "apply R1 every N D steps (lazy regularization, Adam betas adjusted)")
    d_steps: int = _f(1, "D steps per G step")


@dataclass
class TrainConfig:
    batch_size: int = _f(64, "images per process per micro-batch")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step (both D and G)")
    kimg: float = _f(100.0, "training length in thousands of real images shown to D")
    precision: str = _f("no", "mixed precision: 'no', 'bf16' or 'fp16' (autocast, fp32 weights)", ("no", "bf16", "fp16"))
    seed: int = _f(0, "random seed (models, latents, data order)")
    g_lr: float = _f(2e-4, "generator Adam learning rate")
    d_lr: float = _f(2e-4, "discriminator Adam learning rate")
    g_betas: list = _f((0.5, 0.999), "generator Adam betas")
    d_betas: list = _f((0.5, 0.999), "discriminator Adam betas")
    adam_eps: float = _f(1e-8, "Adam epsilon (both models)")
    ema_kimg: float = _f(10.0, "EMA half-life of G in kimg; 0 = no EMA")
    ema_rampup: float = _f(0.05, "EMA half-life at most this fraction of images seen so far; 0 = no ramp-up")
    grad_clip: float = _f(0.0, "clip gradient norm of G and D to this; 0 = off")
    compile: bool = _f(False, "torch.compile G and D")
    channels_last: bool = _f(False, "channels_last memory format (faster convs on GPUs)")
    deepspeed: str = _f("", "DeepSpeed JSON for both G and D ('' = plain Accelerate/DDP, or the launch config's)")
    deepspeed_g: str = _f("", "DeepSpeed JSON for G only (e.g. ZeRO-3), overriding train.deepspeed")
    deepspeed_d: str = _f("", "DeepSpeed JSON for D only (e.g. ZeRO-2), overriding train.deepspeed")
    max_bad_steps: int = _f(5, "after this many non-finite losses in a row, roll back to the last checkpoint")


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
class EvalConfig:
    every_kimg: float = _f(0.0, "evaluate EMA-G every N kimg during training; 0 = off")
    n: int = _f(5000, "generated samples per evaluation")
    extractor: str = _f("inception", "'inception' (local file, see eval.inception) or a TorchScript/module path")
    inception: str = _f("", "path of inception-2015-12-05.pkl ('' = $BIGAN_INCEPTION or $BIGAN_CACHE/…)")
    metrics: str = _f("fid,kid", "comma-separated: fid, kid, is, pr")
    data: str = _f("", "reference shards ('' = data.shards)")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return {s.name: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(getattr(self, s.name)).items()}
                for s in dataclasses.fields(self)}

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
        value = [float(v) for v in value]
    elif kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    choices = spec.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {value!r}")
    return value


def _set(config: Config, key: str, value):
    section, _, name = key.partition(".")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections or not name:
        raise ConfigError(f"unknown config key {key!r} (sections: {', '.join(sections)})")
    obj = getattr(config, section)
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if name not in fields:
        raise ConfigError(f"unknown config key {key!r} (known in {section}: {', '.join(fields)})")
    setattr(obj, name, _convert(key, value, fields[name]))


def _validate(c: Config):
    checks = [
        ("data.resolution", c.data.resolution in (32, 64, 128, 256), "must be 32, 64, 128 or 256"),
        ("data.workers", c.data.workers >= 0, "must be >= 0"),
        ("data.crop_scale_min", 0 < c.data.crop_scale_min <= 1, "must be in (0, 1]"),
        ("model.z_dim", c.model.z_dim > 0, "must be positive"),
        ("loss.r", 0 <= c.loss.r <= 1, "must be in [0, 1]"),
        ("loss.d_steps", c.loss.d_steps >= 1, "must be >= 1"),
        ("loss.r1_interval", c.loss.r1_interval >= 1, "must be >= 1"),
        ("train.batch_size", c.train.batch_size >= 1, "must be >= 1"),
        ("train.grad_accum", c.train.grad_accum >= 1, "must be >= 1"),
        ("train.kimg", c.train.kimg > 0, "must be positive"),
        ("run.ckpt_limit", c.run.ckpt_limit >= 1, "must be >= 1"),
        ("run.log_every", c.run.log_every >= 1, "must be >= 1"),
    ]
    for key, ok, message in checks:
        if not ok:
            section, name = key.split(".")
            raise ConfigError(f"{key}: {message}, got {getattr(getattr(c, section), name)!r}")


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file (nested sections), then `section.key=value` overrides."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected sections (data:, model:, …) at the top level")
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping")
            for name, value in values.items():
                _set(config, f"{section}.{name}", value)
    for item in overrides:
        key, sep, value = item.removeprefix("--").partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like --section.key=value")
        _set(config, key, value)
    _validate(config)
    return config


def config_from_dict(data: dict) -> Config:
    """A Config from to_dict() output (e.g. the config.yaml saved in a run dir)."""
    config = Config()
    for section, values in data.items():
        for name, value in values.items():
            _set(config, f"{section}.{name}", value)
    return config
