"""DF-GAN (Tao et al., CVPR 2022): text-to-image with deep text-image fusion, one stage, no extra networks.

The generator maps noise z to a 4x4 map and upsamples it with residual blocks whose every
activation is modulated by the text: a fusion step is an affine transform whose per-channel
scale γ and shift β are small MLPs of cat(z, sentence), then LeakyReLU; two fusion steps and a
3x3 conv, twice, make a block (the 4x4 map comes from z alone, as in the reference code: the
text enters through every fusion). The discriminator's residual downsampling blocks (learned gain,
zero at start) reach 4x4 features, and its one-way head judges them together with the
sentence tiled onto them. Its loss pairs reals with their own sentences (real), generated
images (fake) and reals with another image's sentence (mismatched), and the matching-aware
gradient penalty smooths D around real pairs, in the image and in the sentence.

Calling convention as every bigan model: ``G(z, condition)``, ``D(image, condition)`` -> (N, 1)
logits, where condition is the sentence embedding (N, cond_dim); ``D.features(image)`` and
``D.logits(features, condition)`` are the two halves the mismatched term needs.

Widths follow the reference code: G's blocks go from 8*ngf channels at 4x4 down to ngf at full
size (min(2^k, 8) * ngf), D's the other way. ``depth`` stacks that many blocks per resolution
(the reference: 1), the knob that with ngf makes the large configurations (PRESETS).
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

PRESETS = {  # named sizes; parameter_counts(**PRESETS[name]) counts them without building weights
    "dfgan-256": dict(resolution=256, ngf=32, ndf=32, z_dim=100, cond_dim=256),  # the reference's bird config
    "dfgan-256-xl": dict(resolution=256, ngf=160, ndf=64, z_dim=128, cond_dim=512, depth=2),  # G 352 M
}


def _stages(resolution: int) -> int:
    """Upsamplings from 4x4 to resolution."""
    if resolution < 32 or resolution > 1024 or resolution & (resolution - 1):
        raise ValueError(f"DF-GAN resolution must be a power of two from 32 to 1024, got {resolution}")
    return int(math.log2(resolution)) - 2


def _widths(base: int, stages: int) -> list[int]:
    """Channels at 4x4, 8x8, ... full size for G (D reads them backwards): 8*base at coarse sizes, base at full."""
    return [base * min(2 ** (stages - k), 8) for k in range(stages + 1)]


class Affine(nn.Module):
    """x * γ(c) + β(c), per channel; γ, β: Linear -> ReLU -> Linear, starting at γ = 1, β = 0."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.gamma = nn.Sequential(nn.Linear(cond_dim, channels), nn.ReLU(), nn.Linear(channels, channels))
        self.beta = nn.Sequential(nn.Linear(cond_dim, channels), nn.ReLU(), nn.Linear(channels, channels))
        for mlp, bias in ((self.gamma, 1.0), (self.beta, 0.0)):  # the identity at start
            nn.init.zeros_(mlp[2].weight)
            nn.init.constant_(mlp[2].bias, bias)

    def forward(self, x, c):
        return x * self.gamma(c)[:, :, None, None] + self.beta(c)[:, :, None, None]


class Fusion(nn.Module):
    """DF-GAN's DFBlock: affine, LeakyReLU, affine, LeakyReLU."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.affines = nn.ModuleList([Affine(cond_dim, channels), Affine(cond_dim, channels)])

    def forward(self, x, c):
        for affine in self.affines:
            x = F.leaky_relu(affine(x, c), 0.2)
        return x


class GBlock(nn.Module):
    """(nearest x2 when upsample) then shortcut(x) + conv(fuse(conv(fuse(x)))); a 1x1 conv shortcut
    where the channels change."""

    def __init__(self, cond_dim: int, a: int, b: int, upsample: bool):
        super().__init__()
        self.upsample = upsample
        self.fuse1, self.conv1 = Fusion(cond_dim, a), nn.Conv2d(a, b, 3, 1, 1)
        self.fuse2, self.conv2 = Fusion(cond_dim, b), nn.Conv2d(b, b, 3, 1, 1)
        self.shortcut = nn.Conv2d(a, b, 1) if a != b else nn.Identity()

    def forward(self, x, c):
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        h = self.conv2(self.fuse2(self.conv1(self.fuse1(x, c)), c))
        return self.shortcut(x) + h


class Generator(nn.Module):
    def __init__(self, z_dim: int = 100, cond_dim: int = 256, resolution: int = 64, ngf: int = 32, depth: int = 1):
        """z (N, z_dim), sentence (N, cond_dim) -> images (N, 3, resolution, resolution) in [-1, 1]."""
        super().__init__()
        widths = _widths(ngf, _stages(resolution))
        self.z_dim, self.cond_dim = z_dim, cond_dim
        self.fc = nn.Linear(z_dim, widths[0] * 16)
        self.blocks = nn.ModuleList(
            GBlock(z_dim + cond_dim, a if i == 0 else b, b, upsample=i == 0)
            for a, b in zip(widths, widths[1:]) for i in range(depth))
        self.to_rgb = nn.Conv2d(widths[-1], 3, 3, 1, 1)

    def forward(self, z, condition):
        h = self.fc(z).view(len(z), -1, 4, 4)
        c = torch.cat([z, condition], dim=1)  # every fusion sees the noise as well as the text
        for block in self.blocks:
            h = block(h, c)
        return torch.tanh(self.to_rgb(F.leaky_relu(h, 0.2)))


class DBlock(nn.Module):
    """x' + γ · residual(x), γ learned from 0: residual = 4x4 stride-2 conv (stride 1 when not
    downsampling), LeakyReLU, 3x3 conv, LeakyReLU; x' = avg-pooled x, through a 1x1 conv where
    the channels change."""

    def __init__(self, a: int, b: int, downsample: bool):
        super().__init__()
        first = nn.Conv2d(a, b, 4, 2, 1, bias=False) if downsample else nn.Conv2d(a, b, 3, 1, 1, bias=False)
        self.residual = nn.Sequential(first, nn.LeakyReLU(0.2), nn.Conv2d(b, b, 3, 1, 1, bias=False), nn.LeakyReLU(0.2))
        self.shortcut = nn.Conv2d(a, b, 1) if a != b else nn.Identity()
        self.downsample = downsample
        self.gain = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        skip = self.shortcut(x)
        if self.downsample:
            skip = F.avg_pool2d(skip, 2)
        return skip + self.gain * self.residual(x)


class Discriminator(nn.Module):
    def __init__(self, cond_dim: int = 256, resolution: int = 64, ndf: int = 32, depth: int = 1):
        """image (N, 3, resolution, resolution), sentence (N, cond_dim) -> logits (N, 1)."""
        super().__init__()
        widths = _widths(ndf, _stages(resolution))[::-1]  # full size: ndf ... 4x4: 8*ndf
        self.cond_dim = cond_dim
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1)
        self.blocks = nn.Sequential(*(DBlock(a if i == 0 else b, b, downsample=i == 0)
                                      for a, b in zip(widths, widths[1:]) for i in range(depth)))
        self.head = nn.Sequential(  # one-way output: the sentence tiled onto the 4x4 features
            nn.Conv2d(widths[-1] + cond_dim, 2 * ndf, 3, 1, 1, bias=False), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * ndf, 1, 4, 1, 0, bias=False))

    def features(self, images):
        """(N, 8*ndf, 4, 4) image features, before the text is seen."""
        return self.blocks(self.stem(images))

    def logits(self, features, condition):
        """(N, 1): does each image's features match its sentence?"""
        tiled = condition[:, :, None, None].expand(-1, -1, *features.shape[2:])
        return self.head(torch.cat([features, tiled], dim=1)).flatten(1)

    def forward(self, images, condition):
        return self.logits(self.features(images), condition)


def parameter_counts(resolution: int = 64, ngf: int = 32, ndf: int = 32, z_dim: int = 100, cond_dim: int = 256,
                     depth: int = 1) -> dict:
    """Parameters of G and D of one configuration, built on the meta device (no memory, no init time)."""
    with torch.device("meta"):
        g = Generator(z_dim, cond_dim, resolution, ngf, depth)
        d = Discriminator(cond_dim, resolution, ndf, depth)
    return {"generator": sum(p.numel() for p in g.parameters()),
            "discriminator": sum(p.numel() for p in d.parameters())}


# ---------------------------------------------------------------- losses (pure functions of logits)


def mismatched(condition):
    """Each sample's sentence replaced by the previous sample's (rolled by one in the batch)."""
    return condition.roll(1, dims=0)


def d_loss(real_logits, fake_logits, mismatched_logits):
    """DF-GAN's hinge loss for D on D(real, s), D(fake, s) and D(real, mismatched(s)):

        relu(1 - D(real, s)) + (relu(1 + D(fake, s)) + relu(1 + D(real, s_mis))) / 2
    """
    real = F.relu(1 - real_logits.float()).mean()
    fake = F.relu(1 + fake_logits.float()).mean()
    mis = F.relu(1 + mismatched_logits.float()).mean()
    loss = real + (fake + mis) / 2
    return loss, {"Loss/D": loss.detach(), "Loss/D_real": real.detach(), "Loss/D_fake": fake.detach(),
                  "Loss/D_mismatched": mis.detach(), "D/real": real_logits.detach().float().mean(),
                  "D/fake": fake_logits.detach().float().mean(),
                  "D/mismatched": mismatched_logits.detach().float().mean()}


def ma_gp(real_images, sentences, real_logits, weight: float = 2.0, power: float = 6.0):
    """Matching-aware zero-centred gradient penalty on real pairs (DF-GAN's MA-GP):

        weight * mean_i ‖[∇ₓD(x_i, s_i) ; ∇ₛD(x_i, s_i)]‖₂^power        # DF-GAN: weight 2, power 6

    real_images and sentences must require grad (a frozen encoder's sentences:
    s.detach().requires_grad_()); the graph is kept, so the penalty trains D (double backward)."""
    for name, tensor in (("real_images", real_images), ("sentences", sentences)):
        if not tensor.requires_grad:
            raise ValueError(f"ma_gp: {name} must require grad before D sees them: {name}.requires_grad_(True)")
    grad_x, grad_s = torch.autograd.grad(real_logits.float().sum(), (real_images, sentences), create_graph=True)
    squared = grad_x.float().flatten(1).square().sum(1) + grad_s.float().flatten(1).square().sum(1)
    penalty = weight * squared.pow(power / 2).mean()  # ‖g‖^p as (‖g‖²)^(p/2): no sqrt, finite at g = 0
    return penalty, {"Penalty/MA-GP": penalty.detach(), "Penalty/grad_norm": squared.detach().sqrt().mean()}
