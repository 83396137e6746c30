"""A GAN family: everything the training loop, bigan-sample and bigan-eval need to know of a model.

The loop, the backends and the checkpoint code name no family. A family is one module that says:

    networks()        {name: Network(module, lr, betas, eps, lr multipliers per parameter group)}
    phases            [Phase(name, trains, frozen, every, repeat, reals, loss)], in the order they run
    ema               the networks whose moving average is kept (and sampled, exported)
    state()           its own state kept in checkpoints, by name
    architecture()    what the weights' shapes depend on (architecture.json; enough to rebuild G)
    grid_inputs/grid  what TensorBoard's sample grids show
    evaluate          what the loop's eval.every_kimg and bigan-eval measure
    sample            what bigan-sample makes of its generator (and which of its flags apply)

and draws what its generator takes (latents, classes, source images, captions) inside its phases'
losses, from this rank's generators (bigan.seeding). StyleGAN2-ADA's loss phases (Gmain, Greg,
Dmain, Dreg) are the model: a phase is one optimizer step of one network over `train.grad_accum`
micro-batches; it runs every `every` iterations (lazy regularization as data) and `repeat` times
when due (D steps per G step); `reals` says whether it takes new real batches, the previous
phase's, or none.

Families are looked up by name in bigan.families (one line per family), or given as
``model.arch=package.module:Class`` for a family of one's own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Network:
    """A network and how its optimizer (Adam) steps it."""

    module: torch.nn.Module
    lr: float
    betas: tuple
    eps: float = 1e-8
    lr_multipliers: dict = field(default_factory=dict)  # parameter-name prefix -> multiplier of lr
    keys: str = ""  # the config keys its settings come from, for messages

    def param_groups(self) -> list[dict]:
        """Adam's parameter groups: one per learning-rate multiplier (by name prefix), then the rest."""
        groups, taken = [], set()
        for prefix, multiplier in self.lr_multipliers.items():
            params = [p for name, p in self.module.named_parameters() if name.startswith(prefix)]
            taken |= {id(p) for p in params}
            groups.append({"params": params, "lr": self.lr * multiplier})
        rest = [p for p in self.module.parameters() if id(p) not in taken]
        return [{"params": rest, "lr": self.lr}] + [g for g in groups if g["params"]]

    def settings(self) -> list[dict]:
        """lr, betas and eps of each parameter group (what a resume applies over the checkpoint's)."""
        return [{"lr": g["lr"], "betas": tuple(self.betas), "eps": self.eps} for g in self.param_groups()]


@dataclass
class Phase:
    """One optimizer step of the network `trains`. Networks in `frozen` run with their parameters
    frozen: gradients flow through them into `trains`, none into them, and none of their DDP or ZeRO
    hooks fire. `loss(step, real)` gives (loss, stats) of one micro-batch: `step` is the
    bigan.training.steps.StepContext, `real` a batch from the stream, or None when `reals` is None."""

    name: str
    trains: str
    loss: Callable
    frozen: tuple = ()
    every: int = 1        # due on iterations i (counted from 0) with i % every == 0
    repeat: int = 1       # optimizer steps when due (e.g. loss.d_steps)
    reals: str | None = "new"  # "new": fresh real micro-batches (counted as images seen), "last": the
                               # previous ones again, None: none (the loss draws what it needs)
    after: Callable | None = None  # after(step), once the optimizer step is taken (e.g. a running mean)
    whole: bool = False   # its backward reaches `trains`' weights outside their modules' own backward (a
                          # second-order penalty's graph): the backend keeps them whole for the phase (ZeRO-3)


class Family:
    """The interface; bigan.families.noise.NoiseFamily is the common case to start from."""

    name = "base"
    generator = "g"        # the network bigan-sample and bigan-eval run, and the export writes
    ema = ("g",)           # networks with a moving average of their weights
    options = None         # a dataclass of the family's own config keys (config section `name`), or None
    paired = False         # its samples hold an input image beside the target (src.*)
    captioned = False      # its samples hold a caption each (txt), which its G and D read
    metrics = ("fid", "kid", "is", "pr")  # what eval.metrics and bigan-eval --metrics may name
    data_free_metrics = ()  # those of them it measures without reference shards
    sample_flags = ()      # bigan-sample flags that apply to it, beyond --n, --out, --no-ema, --overwrite
    modes = False          # mode coverage (eval.modes, bigan-eval --modes) applies to its samples
    resolutions = (32, 64, 128, 256)  # what data.resolution may be
    architecture_defaults = {}  # architecture() keys added later: what a checkpoint without them was built with
    label_counts = None    # the training shards' samples per class (use_data), None: not known

    def __init__(self, config):
        self.config = config

    def networks(self) -> dict[str, Network]:
        raise NotImplementedError

    @property
    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def state(self) -> dict:
        """Objects with state_dict()/load_state_dict() kept in checkpoints, by name."""
        return {}

    def to(self, device):
        """Move the family's own state to the device it trains on (before a checkpoint is loaded into it)."""

    @classmethod
    def resolve(cls, config, world_size: int):
        """Settings this family derives from others (auto rules), fixed when the config is loaded."""

    def architecture(self) -> dict:
        """What the weights' shapes depend on (model.*, data.resolution, loss.pack, the family's section)."""
        settings = self.config.to_dict()
        arch = {f"model.{k}": v for k, v in settings["model"].items() if k != "sync_batchnorm"}
        arch.update({"data.resolution": self.config.data.resolution, "loss.pack": self.config.loss.pack})
        if self.options is not None:
            arch.update({f"{self.name}.{k}": v for k, v in settings[self.name].items()})
        return arch

    def build_generator(self) -> torch.nn.Module:
        """The generator alone, as networks() builds it (bigan-sample and bigan-eval)."""
        return self.networks()[self.generator].module

    # -- configuration and data
    @classmethod
    def checks(cls, config) -> list[tuple]:
        """(key, ok, message) for settings this family cannot work with (config validation)."""
        return []

    @classmethod
    def auto_pack(cls, config) -> int:
        """What loss.pack=0 (auto) means for this family."""
        return 1

    def demo(self, held_out: bool) -> dict:
        """Keyword arguments of bigan.data.demo.ensure_demo_shards for data.shards=demo."""
        return {"n": self.config.data.demo_images, "seed": 0}

    def notes(self) -> list[str]:
        """Lines for the user at start-up (main process): what these settings do that may not be meant."""
        return []

    def use_data(self, shard_set):
        """What the family takes from its training shards, before the first step: their samples per class
        (label_counts), which conditional families draw their fakes' classes from."""
        self.label_counts = shard_set.label_counts

    def check_data(self, shard_set, key: str, source: str) -> str | None:
        """Why the shards `source` (config key `key`) cannot train this family, in one line; None if they can."""
        classes = self.config.model.num_classes
        if classes and shard_set.label_counts is not None and len(shard_set.label_counts) > classes:
            return (f"{key}: {source} holds labels up to {len(shard_set.label_counts) - 1}, and the model has "
                    f"model.num_classes={classes}")
        if self.paired and shard_set.paired is False:
            return (f"{key}: model.arch={self.name} needs pairs, and {source} holds single images "
                    f"(write pairs with bigan-shards TARGETS OUT --src-dir INPUTS)")
        if self.captioned and shard_set.captions is False:
            return (f"{key}: model.arch={self.name} trains on captioned images, and {source} holds none (write "
                    f"shards with captions, or use data.shards=demo_captions)")
        return None

    # -- grids, evaluation, sampling
    def grid_inputs(self, device):
        """The fixed inputs of the sample grids (read once at start, on the main process)."""
        raise NotImplementedError

    def grid(self, g, inputs) -> tuple:
        """(images in [-1, 1], columns or None) of a sample grid of generator g."""
        raise NotImplementedError

    def evaluate(self, g, data, extractor, classifier, accelerator, n: int, wanted, seed: int = 0,
                 batch: int = 64) -> dict:
        """Metrics of generator g (every rank calls this; each computes its share)."""
        raise NotImplementedError

    def prepare_metrics(self, wanted, accelerator):
        """Load what the family's own metrics among `wanted` need, at start-up (before anything is written), so
        that a missing or broken file fails then, not at the first evaluation."""

    def planned_names(self, args) -> list:
        """The file names bigan-sample would write into an output folder (checked before it generates)."""
        return [f"{i:06d}.png" for i in range(args.n)]

    def sample(self, g, args, device) -> "Samples":
        """What bigan-sample writes for these flags (bigan.sample.main has checked them)."""
        raise NotImplementedError


@dataclass
class Samples:
    """What bigan-sample writes: images in [-1, 1]; per-image file names in an output folder (default
    000000.png ...); a grid's columns; and the images a grid shows if not these (e.g. input | output)."""

    images: torch.Tensor
    names: list | None = None
    columns: int | None = None
    grid: torch.Tensor | None = None
    note: str = ""
