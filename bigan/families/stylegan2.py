"""StyleGAN2 (Karras et al. 2020), with ADA or DiffAugment for little data, as one family.

Four phases, as stylegan2-ada-pytorch steps them (each its own optimizer step):

    Gmain                non-saturating logistic loss of D on G's images (style mixing 0.9); then
                         w_avg tracks the batch's mean w (over all ranks)
    Greg  (every 4)      path-length regularization on a batch shrunk 2x, weight pl_weight x interval
    D                    D on augmented reals and fakes (Dmain); ADA reads sign(D(real)) and moves p
    Dreg  (every 16)     R1 (gamma / 2 x interval) on the augmented reals, differentiated through the
                         augmentation back to the reals (the noise family's D and Dreg phases)

Lazy regularization as StyleGAN2 corrects it: each network's Adam takes lr x c and betas ** c, with
c = interval / (interval + 1), because its regularization phase is an optimizer step of its own.
The path-length mean and ADA's p are this family's state (checkpointed); w_avg is a buffer of G.
Pure PyTorch (bigan.models.stylegan2): no custom CUDA op is built at run time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from bigan import losses
from bigan.families.base import Network, Phase, Samples
from bigan.families.noise import NoiseFamily, lazy_r1_interval
from bigan.models import stylegan2

RESOLUTIONS = (32, 64, 128, 256, 512, 1024)

def _f(default, doc):
    return field(default=default, metadata={"doc": doc})


@dataclass
class StyleGAN2Options:
    w_dim: int = _f(512, "dimension of the intermediate latent w")
    mapping_layers: int = _f(8, "layers of the mapping network (2 in the official cifar and auto configs)")
    mapping_lr: float = _f(0.01, "learning-rate multiplier of the mapping network")
    channel_base: int = _f(32768, "channels at resolution r are min(channel_base / r, channel_max) (16384: 'paper256')")
    channel_max: int = _f(512, "channels at most, in G and D")
    conv_clamp: float = _f(256.0, "clamp of conv outputs, as the official fp16 layers (0 = off)")
    mbstd_group: int = _f(4, "minibatch-standard-deviation group in D (at most the packs D judges per rank: "
                             "the per-rank batch, or batch / loss.pack)")
    style_mixing: float = _f(0.9, "probability of mixing two latents' styles in a training batch")
    pl_weight: float = _f(2.0, "path-length regularization weight (0 = off)")
    pl_interval: int = _f(4, "Greg every N iterations (lazy regularization)")
    pl_batch_shrink: int = _f(2, "Greg runs on batch / N images")
    pl_decay: float = _f(0.01, "decay of the path-length running mean")
    auto: bool = _f(False, "the official 'auto' rule, for what is not set: per-rank batch from resolution and "
                           "ranks, R1 gamma 0.0002 res^2 / batch, EMA half-life batch x 10 / 32 kimg, ramp-up "
                           "0.05, channel_base 16384 (32768 from 512 px), lr 0.0025 (0.002 at 1024 px)")


class PathLength:
    """The running mean of path lengths, and this step's lengths until the step ends (checkpointed)."""

    def __init__(self):
        self.mean = torch.zeros(())
        self.pending = []

    def state_dict(self):
        return {"mean": self.mean.detach().cpu()}

    def load_state_dict(self, state):
        self.mean = state["mean"].to(self.mean.device)


class StyleGAN2(NoiseFamily):
    name = "stylegan2"
    options = StyleGAN2Options
    resolutions = RESOLUTIONS

    def __init__(self, config):
        super().__init__(config)
        self.path_length = PathLength()
        self.w_means = []  # this G step's batch means of w, for w_avg

    @classmethod
    def checks(cls, config) -> list[tuple]:
        o, batch, pack = config.family_options, config.train.batch_size, max(config.loss.pack, 1)
        packs = max(batch // pack, 1)  # (a pack that does not divide the batch is the base checks' to refuse)
        return [*super().checks(config),
                ("loss.name", config.loss.name == "bce",
                 "model.arch=stylegan2 trains with the non-saturating logistic loss; set loss.name=bce"),
                ("stylegan2.mbstd_group", packs % min(o.mbstd_group, packs) == 0,
                 f"must divide train.batch_size ({batch})" + (f" / loss.pack ({pack}), the packs D judges"
                                                              if pack > 1 else "") + " (D's minibatch-std groups)"),
                ("stylegan2.w_dim", o.w_dim >= 1, "must be >= 1"),
                ("stylegan2.mapping_layers", o.mapping_layers >= 1, "must be >= 1"),
                ("stylegan2.mapping_lr", o.mapping_lr > 0, "must be positive"),
                ("stylegan2.channel_base", o.channel_base >= config.data.resolution,
                 f"must be >= data.resolution ({config.data.resolution}): channels at r px are channel_base / r"),
                ("stylegan2.channel_max", o.channel_max >= 1, "must be >= 1"),
                ("stylegan2.conv_clamp", o.conv_clamp >= 0, "must be >= 0 (0 = off)"),
                ("stylegan2.mbstd_group", o.mbstd_group >= 1, "must be >= 1"),
                ("stylegan2.style_mixing", 0 <= o.style_mixing <= 1, "must be in [0, 1]"),
                ("stylegan2.pl_weight", o.pl_weight >= 0, "must be >= 0 (0 = off)"),
                ("stylegan2.pl_interval", o.pl_interval >= 1, "must be >= 1"),
                ("stylegan2.pl_batch_shrink", o.pl_batch_shrink >= 1 and batch // o.pl_batch_shrink >= 1,
                 f"must be >= 1 and leave at least one image of train.batch_size ({batch})"),
                ("stylegan2.pl_decay", 0 < o.pl_decay <= 1, "must be in (0, 1]")]

    @classmethod
    def auto_pack(cls, config) -> int:
        return 1

    @classmethod
    def resolve(cls, config, world_size: int):
        """stylegan2.auto: the official 'auto' config (stylegan2-ada-pytorch's train.py), for this many ranks."""
        if not config.family_options.auto:
            return
        res, t, given = config.data.resolution, config.train, config.given  # what was set stays, as --batch etc.
        # the official auto batch is one optimizer step's; gamma and the EMA follow it, also where a batch is
        # given (as the official --batch, which sets the batch only)
        total = max(min(world_size * min(4096 // res, 32), 64), world_size)
        if "train.batch_size" not in given:
            if total % (world_size * t.grad_accum):
                from bigan.config import ConfigError

                raise ConfigError(f"train.grad_accum: {t.grad_accum} x {world_size} ranks must divide the auto "
                                  f"batch of {total} at {res} px (stylegan2.auto), or set train.batch_size")
            t.batch_size = total // (world_size * t.grad_accum)
        if "loss.r1" not in given:
            config.loss.r1 = 0.0002 * res ** 2 / total
        if "train.ema_kimg" not in given:
            t.ema_kimg = total * 10 / 32
        if "train.ema_rampup" not in given:
            t.ema_rampup = 0.05
        if "stylegan2.mbstd_group" not in given:  # (the largest group of at most 4 that divides the packs D
            # judges: the per-rank batch, or batch / loss.pack with packs; pack 0 is auto, not yet resolved)
            packs = max(t.batch_size // (config.loss.pack or cls.auto_pack(config)), 1)
            config.family_options.mbstd_group = max(g for g in range(1, min(packs, 4) + 1) if packs % g == 0)
        if "stylegan2.channel_base" not in given:  # fmaps 1 at 512 px and up, else 0.5
            config.family_options.channel_base = 32768 if res >= 512 else 16384
        for key in ("g_lr", "d_lr"):  # (each on its own: one given leaves the other to the rule)
            if f"train.{key}" not in given:
                setattr(t, key, 0.002 if res >= 1024 else 0.0025)
        if "stylegan2.mapping_layers" not in given:  # the official auto's map=2
            config.family_options.mapping_layers = 2
        config.family_options.auto = False  # config.yaml records the values, not the rule

    def notes(self) -> list[str]:
        """A warning where D's minibatch-std groups hold one sample: its std feature is then constant, and D
        sees nothing of the spread of G's samples (the equivalence tests ask for that; a run seldom means it)."""
        o, batch, pack = self.config.family_options, self.config.train.batch_size, max(self.config.loss.pack, 1)
        if min(o.mbstd_group, batch // pack) > 1:
            return []
        if batch // pack > 1:
            why, fix = "stylegan2.mbstd_group=1", "set stylegan2.mbstd_group to a divisor of " + (
                f"the {batch // pack} packs of a batch" if pack > 1 else f"train.batch_size ({batch})")
        else:
            why = f"train.batch_size={batch}" + (f" / loss.pack={pack}: one pack" if pack > 1 else ": one image")
            why, fix = why + " per rank and micro-batch", "raise train.batch_size" + (" or lower loss.pack" if pack > 1
                                                                                       else "")
        return [f"warning: D's minibatch-std groups hold one sample ({why}), so its std feature is constant and D "
                f"cannot see how alike G's samples are; {fix}"]

    SHAPES = ("w_dim", "mapping_layers", "mapping_lr", "channel_base", "channel_max", "conv_clamp")

    def architecture(self) -> dict:
        """The keys G's and D's weights and G's outputs depend on: a resume may change the rest (pl_weight,
        style_mixing, mbstd_group, ...)."""
        return {k: v for k, v in super().architecture().items()
                if not k.startswith("stylegan2.") or k.split(".", 1)[1] in self.SHAPES}

    # -- networks and phases
    def build_pair(self):
        m, o, res = self.config.model, self.config.family_options, self.config.data.resolution
        clamp = o.conv_clamp or None
        g = stylegan2.Generator(m.z_dim, m.num_classes, res, o.w_dim, o.mapping_layers, o.channel_base,
                                o.channel_max, clamp, o.mapping_lr)
        pack = self.config.loss.pack
        d = stylegan2.Discriminator(res, m.num_classes, o.channel_base, o.channel_max,
                                    min(o.mbstd_group, self.config.train.batch_size // pack), 1, clamp, pack)
        return g, d

    def networks(self) -> dict[str, Network]:
        t, loss, o = self.config.train, self.config.loss, self.config.family_options
        g, d = self.build_pair()
        g_lr, g_betas = losses.lazy_adam(t.g_lr, t.g_betas, o.pl_interval if o.pl_weight > 0 else 1)
        d_lr, d_betas = losses.lazy_adam(t.d_lr, t.d_betas, lazy_r1_interval(loss) if loss.r1 > 0 else 1)
        return {"g": Network(g, g_lr, g_betas, t.adam_eps, keys="train.g_lr, train.g_betas, stylegan2.pl_interval"),
                "d": Network(d, d_lr, d_betas, t.adam_eps, keys="train.d_lr, train.d_betas, loss.r1_interval")}

    @property
    def phases(self) -> list[Phase]:
        """Gmain, Greg (every pl_interval), then the noise family's D, Dreg (every r1_interval) phases."""
        o = self.config.family_options
        g_phases = [Phase("Gmain", trains="g", frozen=("d",), loss=self.g_main, reals=None, after=self.track_w_avg)]
        if o.pl_weight > 0:
            g_phases.append(Phase("Greg", trains="g", loss=self.g_reg, every=o.pl_interval, reals=None,
                                  after=self.update_pl_mean, whole=True))
        return g_phases + [p for p in super().phases if p.trains == "d"]

    def state(self) -> dict:
        return {**super().state(), "path_length": self.path_length}

    def to(self, device):
        super().to(device)
        self.path_length.mean = self.path_length.mean.to(device)

    # -- the losses
    def g_main(self, step, real=None):
        z, y = self.draw(self.config.train.batch_size, step.device)
        images, ws = step.train("g")(z, y, style_mixing=self.config.family_options.style_mixing, return_ws=True)
        self.w_means.append(ws[:, 0].detach().float().mean(0))  # (before mixing: the first ws are z's own)
        return losses.g_loss("bce", step.frozen("d")(*self.seen(images, y)))

    def track_w_avg(self, step):
        """After Gmain: w_avg moves towards the mean w of the step's batch over all ranks, so every rank holds
        the same (the official code leaves each rank its own: its DDP does not broadcast buffers). Once per
        iteration, as StyleGAN3; stylegan2-ada-pytorch moves it on every mapping call in training (Gmain, D's
        fakes, and Greg's every 4th iteration), 2 to 2.25 times an iteration: the centre truncation pulls
        towards moves more slowly here."""
        mean = step.mean_over_ranks(torch.stack(self.w_means).mean(0))
        self.w_means = []
        step.frozen("g").mapping.track_w_avg(mean)

    def g_reg(self, step, real=None):
        """Path-length penalty (|J_w^T y| - its running mean)^2, on a batch shrunk pl_batch_shrink times; the
        running mean moves once per step, by the lengths of all its micro-batches and ranks."""
        o = self.config.family_options
        z, y = self.draw(max(self.config.train.batch_size // o.pl_batch_shrink, 1), step.device)
        images, lengths = step.penalty("g")(z, y, style_mixing=o.style_mixing, path_noise=self.path_noise)
        self.path_length.pending.append(lengths.detach().mean())
        # against the running mean as it stood before this step (the official code moves it by each
        # micro-batch first): so a step does not depend on how its batch is split
        penalty = (lengths - self.path_length.mean).square().mean()
        # (+ 0 x a pixel: the toRGB biases take part in this backward too, as DDP needs of every parameter)
        loss = penalty * (o.pl_weight * o.pl_interval) + 0 * images[:, 0, 0, 0].float().mean()
        return loss, {"Penalty/PL": penalty.detach(), "PL/length": lengths.detach().mean()}

    @staticmethod
    def path_noise(images):
        """y ~ N(0, I) / sqrt(H W): the random image direction the path length is measured along."""
        return torch.randn(images.shape, device=images.device) / math.sqrt(images.shape[2] * images.shape[3])

    def update_pl_mean(self, step):
        o, pending = self.config.family_options, self.path_length.pending
        mean = step.mean_over_ranks(torch.stack(pending).mean())
        self.path_length.mean = self.path_length.mean.lerp(mean, o.pl_decay)
        self.path_length.pending = []

    def fakes(self, step, g_input):
        with torch.no_grad():
            return step.fixed("g")(*g_input, style_mixing=self.config.family_options.style_mixing)

    # -- sampling: truncation is psi towards w_avg
    def grid(self, g, inputs) -> tuple:
        return g(*inputs, noise_mode="const"), None

    def sample(self, g, args, device) -> Samples:
        """--truncation psi pulls w towards w_avg (1: none); noise inputs fixed, as StyleGAN2's own sampling."""
        from bigan.sample import generate, latents, slerp

        options = {"psi": 1.0 if args.truncation is None else args.truncation, "noise_mode": "const"}
        z_dim, seed, classes = self.config.model.z_dim, args.seed or 0, self.config.model.num_classes
        if args.interpolate:
            rows = args.n // args.interpolate
            ends = latents(2 * rows, z_dim, seed, None).view(rows, 2, -1)
            t = torch.linspace(0, 1, args.interpolate)[None, :, None]
            z = slerp(ends[:, :1], ends[:, 1:], t).reshape(-1, z_dim)
            return Samples(generate(g, classes, z, device=device, **options), columns=args.interpolate)
        return Samples(generate(g, classes, latents(args.n, z_dim, seed, None), device=device, **options))
