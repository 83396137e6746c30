"""DCGAN (Radford et al. 2016): transposed-conv + BatchNorm generator, strided-conv + LeakyReLU discriminator.

At 64 px with ``ch=64`` the layers match the classic DCGAN (and the yardstick's ``dcgan64``);
other resolutions (32-256) add or drop one stride-2 stage per octave.
"""
import torch
from torch import nn

from bigan.models.layers import ConditionalBatchNorm2d, make_norm, pack_samples, spectral_norm, upsamplings


def _upsample(upsample: str, a: int, b: int) -> nn.Module:
    """x2 from a to b channels: a 4x4 stride-2 transposed conv (DCGAN), or nearest x2 then a 3x3 conv,
    whose output pixels all see the same number of taps (no checkerboard; Odena et al. 2016)."""
    if upsample == "transposed":
        return nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False)
    if upsample == "resize":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(a, b, 3, 1, 1, bias=False))
    raise ValueError(f"model.g_upsample must be 'transposed' or 'resize', got {upsample!r}")


class Generator(nn.Module):
    def __init__(self, z_dim=128, resolution=64, ch=64, num_classes=0, upsample="transposed"):
        super().__init__()
        stages = upsamplings("dcgan", resolution)
        widths = [ch * min(2 ** (stages - 1 - i), 16) for i in range(stages)]  # 64 px: 8ch, 4ch, 2ch, ch
        self.z_dim, self.num_classes = z_dim, num_classes
        self.input = nn.ConvTranspose2d(z_dim, widths[0], 4, 1, 0, bias=False)
        self.norms = nn.ModuleList(ConditionalBatchNorm2d(w, num_classes) for w in widths)
        self.ups = nn.ModuleList(_upsample(upsample, a, b) for a, b in zip(widths, widths[1:]))
        self.output = _upsample(upsample, widths[-1], 3)

    def forward(self, z, y=None):
        h = torch.relu(self.norms[0](self.input(z[:, :, None, None]), y))
        for up, norm in zip(self.ups, self.norms[1:]):
            h = torch.relu(norm(up(h), y))
        return torch.tanh(self.output(h))


class Discriminator(nn.Module):
    def __init__(self, resolution=64, ch=64, num_classes=0, norm="batch", pack=1):
        """norm: 'batch' (DCGAN), 'spectral' (SN-DCGAN, Miyato et al. 2018: no batch statistics) or 'none';
        pack: samples judged together (PacGAN; one logit per pack)."""
        super().__init__()
        self.pack = pack
        stages = upsamplings("dcgan", resolution)
        widths = [ch * min(2**i, 16) for i in range(stages)]  # 64 px: ch, 2ch, 4ch, 8ch
        sn = spectral_norm if norm == "spectral" else (lambda m: m)
        self.input = sn(nn.Conv2d(3 * pack, widths[0], 4, 2, 1, bias=False))
        self.downs = nn.ModuleList(sn(nn.Conv2d(a, b, 4, 2, 1, bias=False)) for a, b in zip(widths, widths[1:]))
        self.norms = nn.ModuleList(make_norm(norm, w) for w in widths[1:])
        self.output = sn(nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False))
        self.embed = nn.Embedding(num_classes, widths[-1] * 16) if num_classes else None

    def forward(self, x, y=None):
        h = nn.functional.leaky_relu(self.input(pack_samples(x, self.pack)), 0.2)
        for down, norm in zip(self.downs, self.norms):
            h = nn.functional.leaky_relu(norm(down(h)), 0.2)
        logits = self.output(h).flatten(1)
        if self.embed is not None:  # projection discriminator (Miyato & Koyama 2018)
            logits = logits + (self.embed(y) * h.flatten(1)).sum(1, keepdim=True)
        return logits
