"""SNGAN/BigGAN-style residual G and D with spectral normalization.

At 128 px with ``ch=64`` the layout matches the yardstick's ``resnet128``; every octave from
32 to 256 px adds or drops one block. G uses (conditional) BatchNorm; D has no batch
statistics, so its output does not depend on how a batch is split across ranks.
"""
import torch
from torch import nn
from torch.nn import functional as F

from bigan.models.layers import upsamplings, ConditionalBatchNorm2d, pack_samples, spectral_norm


class GBlock(nn.Module):
    def __init__(self, cin, cout, num_classes=0):
        super().__init__()
        self.bn1, self.bn2 = ConditionalBatchNorm2d(cin, num_classes), ConditionalBatchNorm2d(cout, num_classes)
        self.c1 = spectral_norm(nn.Conv2d(cin, cout, 3, 1, 1))
        self.c2 = spectral_norm(nn.Conv2d(cout, cout, 3, 1, 1))
        self.sc = spectral_norm(nn.Conv2d(cin, cout, 1))

    def forward(self, x, y=None):
        h = F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2)
        h = self.c2(F.relu(self.bn2(self.c1(h), y)))
        return h + self.sc(F.interpolate(x, scale_factor=2))


class DBlock(nn.Module):
    def __init__(self, cin, cout, first=False, down=True):
        super().__init__()
        self.first, self.down = first, down
        self.c1 = spectral_norm(nn.Conv2d(cin, cout, 3, 1, 1))
        self.c2 = spectral_norm(nn.Conv2d(cout, cout, 3, 1, 1))
        self.sc = spectral_norm(nn.Conv2d(cin, cout, 1))

    def forward(self, x):
        h = x if self.first else F.relu(x)
        h = self.c2(F.relu(self.c1(h)))
        s = self.sc(x)
        if self.down:
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        return h + s


class Generator(nn.Module):
    def __init__(self, z_dim=128, resolution=128, ch=64, num_classes=0):
        super().__init__()
        blocks = upsamplings("resnet", resolution)
        mult = [min(2 ** (blocks - i), 16) for i in range(blocks + 1)]  # 128 px: 16, 16, 8, 4, 2, 1
        self.z_dim, self.num_classes, self.ch0 = z_dim, num_classes, ch * mult[0]
        self.fc = spectral_norm(nn.Linear(z_dim, 4 * 4 * self.ch0))
        self.blocks = nn.ModuleList(GBlock(ch * a, ch * b, num_classes) for a, b in zip(mult, mult[1:]))
        self.out_bn = nn.BatchNorm2d(ch * mult[-1])
        self.out_conv = spectral_norm(nn.Conv2d(ch * mult[-1], 3, 3, 1, 1))

    def forward(self, z, y=None):
        h = self.fc(z).view(-1, self.ch0, 4, 4)
        for block in self.blocks:
            h = block(h, y)
        return torch.tanh(self.out_conv(F.relu(self.out_bn(h))))


class Discriminator(nn.Module):
    def __init__(self, resolution=128, ch=64, num_classes=0, pack=1):
        """pack: samples judged together (PacGAN; one logit per pack)."""
        super().__init__()
        self.pack = pack
        blocks = upsamplings("resnet", resolution)
        mult = [1] + [min(2 ** (i + 1), 16) for i in range(blocks)]  # 128 px: 1, 2, 4, 8, 16, 16
        layers = [DBlock(3 * pack, ch, first=True)] + [DBlock(ch * a, ch * b) for a, b in zip(mult, mult[1:])]
        self.blocks = nn.Sequential(*layers, DBlock(ch * mult[-1], ch * mult[-1], down=False))
        self.fc = spectral_norm(nn.Linear(ch * mult[-1], 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, ch * mult[-1])) if num_classes else None

    def forward(self, x, y=None):
        h = F.relu(self.blocks(pack_samples(x, self.pack))).sum(dim=(2, 3))
        logits = self.fc(h)
        if self.embed is not None:  # projection discriminator
            logits = logits + (self.embed(y) * h).sum(1, keepdim=True)
        return logits
