"""pix2pix (Isola et al. 2017): a U-Net generator and a PatchGAN discriminator for paired image-to-image GANs.

Both keep bigan's calling convention, G(x, y) and D(x, y): the trainer passes the input image
where a noise model gets its latent, and passes it again as the condition, so G(src, src)
translates src and D(image, src) judges an image beside its input (stacked on channels).

    U-Net, 256 px, ch=64:  C64-C128-C256-C512-C512-C512-C512-C512  (down to 1x1)
                           CD512-CD512-CD512-C512-C256-C128-C64     (up, each with its skip) -> 3, tanh
    PatchGAN (70x70):      C64-C128-C256-C512 (stride 2, 2, 2, 1) -> 1 logit per patch

Other resolutions (32-256) keep one encoder stage per octave, down to 1x1. Dropout in the
three innermost decoder blocks is the generator's only noise, as in the paper; it is off in
eval mode (sampling, evaluation).
"""
import math

import torch
from torch import nn

from bigan.models.layers import upsamplings


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels)  # per image, no running statistics (as in pix2pix/CycleGAN)
    raise ValueError(f"model.norm must be 'batch' or 'instance', got {kind!r}")


class UNetGenerator(nn.Module):
    def __init__(self, resolution=256, ch=64, norm="batch", dropout=0.5):
        super().__init__()
        upsamplings("pix2pix", resolution)  # the resolutions bigan supports
        depth = int(math.log2(resolution))  # stride-2 stages down to 1x1
        widths = [ch * min(2**i, 8) for i in range(depth)]
        self.downs = nn.ModuleList()
        for i, width in enumerate(widths):
            layers = [nn.Conv2d(3 if i == 0 else widths[i - 1], width, 4, 2, 1, bias=False)]
            if 0 < i < depth - 1:  # no norm on the input layer, nor at 1x1 (one value per channel)
                layers.append(_norm(norm, width))
            self.downs.append(nn.Sequential(*layers))
        self.ups = nn.ModuleList()
        for j in range(depth):  # up j reads the innermost features (j = 0) or the last up and its skip
            inner, outer = widths[-1 - j] * (1 if j == 0 else 2), (widths[-2 - j] if j < depth - 1 else 3)
            layers = [nn.ConvTranspose2d(inner, outer, 4, 2, 1, bias=j == depth - 1)]
            if j < depth - 1:
                layers.append(_norm(norm, outer))
                if j < 3 and dropout > 0:
                    layers.append(nn.Dropout(dropout))
            self.ups.append(nn.Sequential(*layers))

    def forward(self, x, y=None):
        skips = []
        h = x
        for i, down in enumerate(self.downs):
            h = down(h if i == 0 else nn.functional.leaky_relu(h, 0.2))
            skips.append(h)
        for j, up in enumerate(self.ups):
            if j > 0:
                h = torch.cat([h, skips[-1 - j]], 1)
            h = up(torch.relu(h))
        return torch.tanh(h)


class PatchDiscriminator(nn.Module):
    """A logit per 70x70 patch of (input, image) stacked on channels; y is the input image."""

    def __init__(self, resolution=256, ch=64, norm="batch"):
        super().__init__()
        upsamplings("pix2pix", resolution)
        widths = [ch, ch * 2, ch * 4, ch * 8]
        strides = [2, 2, 2, 1]
        self.layers = nn.ModuleList()
        for i, (width, stride) in enumerate(zip(widths, strides)):
            layers = [nn.Conv2d(6 if i == 0 else widths[i - 1], width, 4, stride, 1, bias=i == 0)]
            if i > 0:
                layers.append(_norm(norm, width))
            self.layers.append(nn.Sequential(*layers))
        self.output = nn.Conv2d(widths[-1], 1, 4, 1, 1)

    def forward(self, x, y=None):
        if y is None:
            raise ValueError("the PatchGAN discriminator judges an image beside its input: D(image, input)")
        h = torch.cat([y, x], 1)
        for layer in self.layers:
            h = nn.functional.leaky_relu(layer(h), 0.2)
        return self.output(h)  # N x 1 x P x P patch logits; the losses average over patches
