"""Noise-to-image GANs (DCGAN, SNGAN/ResNet): G(latent, class) against D(image, class).

Two phases per iteration, as bigan has always stepped them:

    D  (loss.d_steps times)  reals and G's fakes (G run under no_grad); lazy R1 on the reals every
                             loss.r1_interval D steps, folded into this step; WGAN-GP; PacGAN packs
    G                        fresh latents through D, D frozen (gradients through it, none into it)

A subclass says which networks (build_pair); everything else is here.
"""
from __future__ import annotations

import torch

from bigan import losses
from bigan.families.base import Family, Network, Phase, Samples
from bigan.models import init_weights

AUTO_PACK = 4  # bench/modes.py on an H200 (bench/RESULTS.md): 1000 of 1000 modes, KL 0.09 in 2M images;
               # unpacked and packs of 2 collapsed (19 and 8 modes) in the same run


class NoiseFamily(Family):
    sample_flags = ("seed", "truncation", "interpolate")
    modes = True
    dcgan_init = False  # DCGAN's N(0, 0.02) initialisation

    def build_pair(self) -> tuple:
        """(G, D) for this config."""
        raise NotImplementedError

    def networks(self) -> dict[str, Network]:
        t, loss = self.config.train, self.config.loss
        g, d = self.build_pair()
        if self.dcgan_init:
            g.apply(init_weights), d.apply(init_weights)
        # lazy R1 folded into the D step: Adam's lr and betas as StyleGAN2 adjusts them for the interval
        d_lr, d_betas = losses.lazy_adam(t.d_lr, t.d_betas, loss.r1_interval if loss.r1 > 0 else 1)
        return {"g": Network(g, t.g_lr, tuple(t.g_betas), t.adam_eps, keys="train.g_lr, train.g_betas"),
                "d": Network(d, d_lr, d_betas, t.adam_eps, keys="train.d_lr, train.d_betas, loss.r1_interval")}

    @property
    def phases(self) -> list[Phase]:
        return [Phase("D", trains="d", loss=self.d_loss, repeat=self.config.loss.d_steps),
                Phase("G", trains="g", frozen=("d",), loss=self.g_loss, reals=None)]

    @classmethod
    def checks(cls, config) -> list[tuple]:
        wanted = {x.strip() for x in config.eval.metrics.split(",")}
        return [("eval.metrics", not wanted & {"l1", "psnr"},
                 "l1 and psnr compare outputs with targets: they need a paired family (model.arch=pix2pix)")]

    @classmethod
    def auto_pack(cls, config) -> int:
        if config.model.num_classes:  # a pack of samples has no one label
            return 1
        return next((p for p in (AUTO_PACK, 2) if config.train.batch_size % p == 0), 1)

    # -- what G takes, drawn from this rank's generators
    def draw(self, n: int, device):
        """(latents, classes or None) of n fresh samples."""
        m = self.config.model
        z = torch.randn(n, m.z_dim, device=device)
        return z, torch.randint(m.num_classes, (n,), device=device) if m.num_classes else None

    def fake_inputs(self, real: dict) -> tuple:
        """(G's input, the condition D sees the fakes with) for fakes to set against `real`."""
        z, y = self.draw(len(real["image"]), real["image"].device)
        return (z, y), y

    def condition(self, real: dict):
        return real["label"]

    # -- the phases' losses
    def d_loss(self, step, real: dict):
        """D on reals and G's fakes; R1 on the reals every loss.r1_interval D steps (folded in, scaled by
        the interval); WGAN-GP at interpolates."""
        c = self.config.loss
        regularize = c.r1 > 0 and step.count % c.r1_interval == 0
        g_input, fake_condition = self.fake_inputs(real)
        with torch.no_grad():
            fake = step.fixed("g")(*g_input)  # G's current weights, no gradient, no DDP sync
        image = real["image"].detach().requires_grad_(True) if regularize else real["image"]
        condition = self.condition(real)
        real_logits = (step.penalty("d") if regularize else step.train("d"))(image, condition)
        fake_logits = step.train("d")(fake, fake_condition)
        loss, stats = losses.d_loss(c.name, real_logits, fake_logits, c.r)
        if regularize:
            r1, r1_stats = losses.r1_penalty(image, real_logits, c.pack)
            loss, stats = loss + (c.r1 / 2 * c.r1_interval) * r1, {**stats, **r1_stats}
        if c.name == "wgan" and c.gp > 0:
            gp, gp_stats = losses.gradient_penalty(step.penalty("d"), image, fake, condition, pack=c.pack)
            loss, stats = loss + c.gp * gp, {**stats, **gp_stats}
        return loss, stats

    def g_loss(self, step, real=None):
        """Fresh latents through D (frozen: gradients through it, none into it)."""
        z, y = self.draw(self.config.train.batch_size, step.device)
        return losses.g_loss(self.config.loss.name, step.frozen("d")(step.train("g")(z, y), y))

    # -- grids, evaluation, sampling
    def grid_inputs(self, device):
        m, n = self.config.model, self.config.run.grid_size
        z = torch.randn(n, m.z_dim, generator=torch.Generator().manual_seed(self.config.train.seed)).to(device)
        return z, (torch.arange(n) % m.num_classes).to(device) if m.num_classes else None

    def grid(self, g, inputs) -> tuple:
        return g(*inputs), None

    def evaluate(self, g, data, extractor, classifier, accelerator, n: int, wanted, seed: int = 0,
                 batch: int = 64) -> dict:
        from bigan.metrics.evaluate import evaluate, generated_images

        m = self.config.model
        blocks = generated_images(g, m.z_dim, m.num_classes, accelerator, n, seed, batch)
        return evaluate(blocks, data if wanted else None, self.config.data.resolution, extractor, accelerator, n,
                        wanted, batch, classifier=classifier)

    def sample(self, g, args, device) -> Samples:
        from bigan.sample import generate, latents, slerp

        z_dim, seed = self.config.model.z_dim, args.seed or 0
        if args.interpolate:
            rows = args.n // args.interpolate
            ends = latents(2 * rows, z_dim, seed, args.truncation).view(rows, 2, -1)
            t = torch.linspace(0, 1, args.interpolate)[None, :, None]
            z = slerp(ends[:, :1], ends[:, 1:], t).reshape(-1, z_dim)
            return Samples(generate(g, self.config.model.num_classes, z, device=device), columns=args.interpolate)
        return Samples(generate(g, self.config.model.num_classes, latents(args.n, z_dim, seed, args.truncation),
                                device=device))
