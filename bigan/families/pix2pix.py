"""pix2pix (Isola et al. 2017): image-to-image on pairs, a U-Net G and a 70x70 PatchGAN D.

G(src, src) translates the batch's input images; D(image, src) judges an image beside its input (with
augment.*, both augmented alike: `seen`).
Two phases per iteration: D on (target, input) pairs against (G(input), input); then G on the same
pairs D just saw, through D frozen, plus loss.l1 times the L1 distance of G's output to the targets.
"""
from __future__ import annotations

import sys

import torch

from bigan import losses
from bigan.families.base import Phase, Samples
from bigan.families.noise import NoiseFamily
from bigan.models import build_models


class Pix2Pix(NoiseFamily):
    name = "pix2pix"
    dcgan_init = True
    paired = True
    metrics = ("l1", "psnr", "fid", "kid")  # on held-out pairs
    sample_flags = ("input",)
    modes = False

    def build_pair(self):
        m = self.config.model
        return build_models("pix2pix", self.config.data.resolution, m.z_dim, m.g_channels, m.d_channels, norm=m.norm,
                            dropout=m.dropout)

    @property
    def phases(self) -> list[Phase]:
        d_phases = [p for p in super().phases if p.trains == "d"]  # D, and lazy R1's own Dreg step
        return d_phases + [Phase("G", trains="g", frozen=("d",), loss=self.g_loss, reals="last")]  # the pairs D saw

    @classmethod
    def auto_pack(cls, config) -> int:
        return 1

    @classmethod
    def checks(cls, config) -> list[tuple]:
        wanted = {x.strip() for x in config.eval.metrics.split(",")}
        return [("model.num_classes", config.model.num_classes == 0,
                 "model.arch=pix2pix is conditioned on its input image, not a class; set model.num_classes=0"),
                ("loss.pack", config.loss.pack == 1, "packing is for unconditional models; model.arch=pix2pix "
                 "needs loss.pack=1"),
                ("eval.metrics", not wanted & {"is", "pr"}, "model.arch=pix2pix is evaluated with l1, psnr, fid and kid"),
                ("eval.modes", not config.eval.modes, "mode coverage is for noise-to-image models, not model.arch=pix2pix")]

    def demo(self, held_out: bool) -> dict:
        from bigan.data.demo import HELD_OUT_SEED

        n, seed = (512, HELD_OUT_SEED) if held_out else (self.config.data.demo_images, 0)
        return {"n": n, "seed": seed, "paired": True}

    def fake_inputs(self, real: dict) -> tuple:
        return (real["source"], real["source"]), real["source"]

    def condition(self, real: dict):
        return real["source"]

    def seen(self, images, source):
        """The pair augmented alike: the input image takes the same draws as the image (the random
        generators forked around its call), so a flip, shift, cut-out or colour change moves both and D
        still judges aligned pairs; an augmentation of the image alone would misalign them."""
        if self.pipe is None:
            return images, source
        accelerator = [] if source.device.type == "cpu" else [source.device]  # (the CPU's is always forked)
        with torch.random.fork_rng(devices=accelerator, device_type=source.device.type if accelerator else "cuda"):
            source = self.augment(source)
        return self.augment(images), source

    def g_loss(self, step, real: dict):
        fake = step.train("g")(real["source"], real["source"])
        loss, stats = losses.g_loss(self.config.loss.name, step.frozen("d")(*self.seen(fake, real["source"])))
        l1, l1_stats = losses.l1_term(fake, real["image"])
        return loss + self.config.loss.l1 * l1, {**stats, **l1_stats}

    # -- grids of held-out input | output | target, evaluation on held-out pairs, translation
    def grid_inputs(self, device):
        from bigan.metrics.evaluate import held_out_pairs
        from bigan.training.data import data_source

        return held_out_pairs(data_source(self, held_out=True), self.config.data.resolution,
                              min(self.config.run.grid_size, 16), device)

    def grid(self, g, inputs) -> tuple:
        sources, targets = inputs  # two triplets per row
        return torch.stack([sources, g(sources, sources).float(), targets], 1).flatten(0, 1), 6

    def evaluate(self, g, data, extractor, classifier, accelerator, n: int, wanted, seed: int = 0,
                 batch: int = 64) -> dict:
        from bigan.metrics.evaluate import evaluate_pairs

        return evaluate_pairs(g, data, self.config.data.resolution, extractor, accelerator, n, wanted, batch)

    def planned_names(self, args) -> list:
        from bigan.sample import input_images, output_names

        return output_names(input_images(args.input)[:args.n], args.input)

    def sample(self, g, args, device) -> Samples:
        from bigan.sample import input_images, translate

        paths = input_images(args.input)[:args.n]
        inputs, outputs, read, skipped = translate(g, self.config.data.resolution, paths, device=device)
        names = self.planned_names(args)
        for path, reason in skipped:
            print(f"bigan-sample: skipped {path}: {reason}", file=sys.stderr)
        return Samples(outputs, names=[names[i] for i in read], columns=8,
                       grid=torch.stack([inputs, outputs], 1).flatten(0, 1),
                       note=f"translated {len(read)} images from {args.input}")
