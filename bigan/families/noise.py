"""Noise-to-image GANs (DCGAN, SNGAN/ResNet): G(latent, class) against D(image, class).

Phases per iteration:

    D     (loss.d_steps times)  reals and G's fakes (G run under no_grad); WGAN-GP; PacGAN packs;
                                R1 on the reals too when loss.r1_interval is 1
    Dreg  (every loss.r1_interval iterations, when it is more than 1)  R1 on the reals D just saw,
                                an optimizer step of its own, as StyleGAN2 regularizes lazily; D's
                                Adam takes lr x c and betas ** c, c = interval / (interval + 1)
    G                           fresh latents through D, D frozen (gradients through it, none into it)

D sees reals and fakes through augment.* (DiffAugment or ADA, differentiable, so R1 goes through
it), for any family built on this one. A subclass says which networks (build_pair); the rest is here.
"""
from __future__ import annotations

import torch

from bigan import losses
from bigan.augment import AdaController, AdaptiveAugment, DiffAugment
from bigan.families.base import Family, Network, Phase, Samples
from bigan.models import init_weights

AUTO_PACK = 4  # bench/modes.py on an H200 (bench/RESULTS.md): 1000 of 1000 modes, KL 0.09 in 2M images;
               # unpacked and packs of 2 collapsed (19 and 8 modes) in the same run


def class_weights(label_counts, num_classes: int) -> torch.Tensor:
    """Per-class sampling weights (float, num_classes long) of a manifest's label_counts; classes it does
    not list weigh 0."""
    weights = torch.zeros(num_classes)
    weights[:len(label_counts)] = torch.tensor(label_counts, dtype=torch.float)
    return weights


def lazy_r1_interval(loss) -> int:
    """D steps per Dreg step: Dreg runs every loss.r1_interval iterations, each of loss.d_steps D steps; R1's gain
    and the Adam correction take this, so that gamma is per D step whatever loss.d_steps is."""
    return loss.r1_interval * loss.d_steps if loss.r1_interval > 1 else 1


class NoiseFamily(Family):
    sample_flags = ("seed", "truncation", "interpolate")
    modes = True
    dcgan_init = False  # DCGAN's N(0, 0.02) initialisation

    def __init__(self, config):
        super().__init__(config)
        a = config.augment
        self.pipe = {"none": None, "diffaugment": lambda: DiffAugment(a.policy), "ada": AdaptiveAugment}[a.kind]
        self.pipe = self.pipe() if self.pipe is not None else None
        self.ada = AdaController(a.target or 0.6, a.interval, a.kimg, a.p) if a.kind == "ada" else None

    def state(self) -> dict:
        return {"ada": self.ada} if self.ada is not None else {}

    def to(self, device):
        if self.ada is not None:  # (load_state_dict puts the state where p is)
            state, self.ada.p = self.ada.state_dict(), self.ada.p.to(device)
            self.ada.load_state_dict(state)

    def augment(self, images):
        """What D sees of a batch of images (reals or fakes): augment.* of it, drawn anew for each call."""
        if self.pipe is None:
            return images
        return self.pipe(images, self.ada.p) if self.ada is not None else self.pipe(images)

    def seen(self, images, condition):
        """(images, condition) as D takes them: the images augmented (augment), the condition as it is."""
        return self.augment(images), condition

    def observe_reals(self, real_logits):
        """ADA reads D's logits on reals (no host read)."""
        if self.ada is not None and self.config.augment.target > 0:  # (target 0: p stays where it is set)
            self.ada.accumulate(real_logits)

    def update_augment(self, step):
        """After a D step: ADA moves p every augment.interval steps from the ranks' sign(D(real))."""
        if self.ada is not None and self.config.augment.target > 0:
            c = self.config
            self.ada.update(c.train.batch_size * c.train.grad_accum * step.accelerator.num_processes,
                            step.sum_over_ranks)

    def build_pair(self) -> tuple:
        """(G, D) for this config."""
        raise NotImplementedError

    def networks(self) -> dict[str, Network]:
        t, loss = self.config.train, self.config.loss
        g, d = self.build_pair()
        if self.dcgan_init:
            g.apply(init_weights), d.apply(init_weights)
        # lazy R1 (its own Dreg step every loss.r1_interval): D's Adam lr x c, betas ** c, c = interval / (interval + 1),
        # as StyleGAN2 corrects for the extra optimizer step
        d_lr, d_betas = losses.lazy_adam(t.d_lr, t.d_betas, lazy_r1_interval(loss) if loss.r1 > 0 else 1)
        return {"g": Network(g, t.g_lr, tuple(t.g_betas), t.adam_eps, keys="train.g_lr, train.g_betas"),
                "d": Network(d, d_lr, d_betas, t.adam_eps, keys="train.d_lr, train.d_betas, loss.r1_interval")}

    @property
    def phases(self) -> list[Phase]:
        loss = self.config.loss
        # (R1 or WGAN-GP in the D step need no hold of D's ZeRO-3 weights: its engine forward on the fakes gathers
        # them again in the same backward, measured equal to the plain path; lazy R1 alone does, Phase.whole)
        phases = [Phase("D", trains="d", loss=self.d_loss, repeat=loss.d_steps, after=self.update_augment)]
        if loss.r1 > 0 and loss.r1_interval > 1:  # lazy R1: a step of its own on the reals D just saw
            phases.append(Phase("Dreg", trains="d", loss=self.d_reg, every=loss.r1_interval, reals="last", whole=True))
        return phases + [Phase("G", trains="g", frozen=("d",), loss=self.g_loss, reals=None)]

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
        """(latents, classes or None) of n fresh samples: the classes as often as the training shards hold them
        (their manifest's label_counts, as stylegan2-ada-pytorch draws a random training image's label), uniform
        where that is not known."""
        m = self.config.model
        z = torch.randn(n, m.z_dim, device=device)
        if not m.num_classes:
            return z, None
        if self.label_counts is None:
            return z, torch.randint(m.num_classes, (n,), device=device)
        if self._class_weights is None or self._class_weights.device != z.device:  # (z's: "cuda" is not "cuda:0")
            self._class_weights = class_weights(self.label_counts, m.num_classes).to(z.device)
        return z, torch.multinomial(self._class_weights, n, replacement=True)

    _class_weights = None  # draw's label_counts as a tensor on its device

    def use_data(self, shard_set):
        super().use_data(shard_set)
        self._class_weights = None

    def fake_inputs(self, real: dict) -> tuple:
        """(G's input, the condition D sees the fakes with) for fakes to set against `real`."""
        z, y = self.draw(len(real["image"]), real["image"].device)
        return (z, y), y

    def fakes(self, step, g_input):
        """G's images for the D step: its current weights, no gradient, no DDP sync."""
        with torch.no_grad():
            return step.fixed("g")(*g_input)

    def condition(self, real: dict):
        return real["label"]

    # -- the phases' losses
    def d_loss(self, step, real: dict):
        """D on (augmented) reals and G's fakes; with loss.r1_interval 1, R1 on the reals in the same step;
        WGAN-GP at interpolates."""
        c = self.config.loss
        regularize = c.r1 > 0 and c.r1_interval == 1
        g_input, fake_condition = self.fake_inputs(real)
        fake = self.fakes(step, g_input)
        image = real["image"].detach().requires_grad_(True) if regularize else real["image"]
        condition = self.condition(real)
        real_logits = (step.penalty("d") if regularize else step.train("d"))(*self.seen(image, condition))
        fake_logits = step.train("d")(*self.seen(fake, fake_condition))
        self.observe_reals(real_logits)
        loss, stats = losses.d_loss(c.name, real_logits, fake_logits, c.r)
        if regularize:
            r1, r1_stats = losses.r1_penalty(image, real_logits, c.pack)
            loss, stats = loss + (c.r1 / 2) * r1, {**stats, **r1_stats}
        if c.name == "wgan" and c.gp > 0:
            critic = lambda x, y: step.penalty("d")(*self.seen(x, y))  # noqa: E731
            gp, gp_stats = losses.gradient_penalty(critic, image, fake, condition, pack=c.pack)
            loss, stats = loss + c.gp * gp, {**stats, **gp_stats}
        if self.ada is not None:
            stats = {**stats, "Augment/p": self.ada.p, "Augment/rt": self.ada.rt}
        return loss, stats

    def d_reg(self, step, real: dict):
        """Lazy R1 (Mescheder et al. 2018): gamma / 2 x E||grad_x D(augment(x))||^2 on reals, scaled by the
        interval it runs at; differentiated through the augmentation back to the reals."""
        c = self.config.loss
        image, condition = real["image"].detach().requires_grad_(True), self.condition(real)
        real_logits = step.penalty("d")(*self.seen(image, condition))
        r1, stats = losses.r1_penalty(image, real_logits, c.pack)
        # (+ 0 x the logits: D's last bias then takes part in this backward too, which DDP needs of every
        # parameter, as stylegan2-ada-pytorch adds real_logits * 0)
        return (c.r1 / 2 * lazy_r1_interval(c)) * r1 + 0 * real_logits.float().mean(), stats

    def g_loss(self, step, real=None):
        """Fresh latents through D (frozen: gradients through it, none into it)."""
        z, y = self.draw(self.config.train.batch_size, step.device)
        return losses.g_loss(self.config.loss.name, step.frozen("d")(*self.seen(step.train("g")(z, y), y)))

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
        counts = self.reference_label_counts(data) if m.num_classes and data else None
        blocks = generated_images(g, m.z_dim, m.num_classes, accelerator, n, seed, batch, counts)
        return evaluate(blocks, data if wanted else None, self.config.data.resolution, extractor, accelerator, n,
                        wanted, batch, classifier=classifier)

    def reference_label_counts(self, data) -> list | None:
        """The samples per class of the reference shards `data` (their manifest's), None if it does not say;
        refused (DataError) as check_data refuses them (classes the model has not)."""
        from bigan.data.stream import DataError, resolve_shards

        shard_set = resolve_shards(data)
        why = self.check_data(shard_set, "data", data)
        if why:
            raise DataError(why)
        return shard_set.label_counts

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
