"""Generator/discriminator pairs by name. Imports nothing distributed: wrapping lives in bigan.backends."""
from bigan.models import dcgan, resnet


def build_models(arch: str, resolution: int, z_dim: int, g_channels: int, d_channels: int,
                 num_classes: int = 0, d_norm: str = "batch", pack: int = 1):
    """(G, D) for an architecture name: 'dcgan' or 'resnet'; D judges `pack` samples at once (PacGAN)."""
    if arch == "dcgan":
        return (dcgan.Generator(z_dim, resolution, g_channels, num_classes),
                dcgan.Discriminator(resolution, d_channels, num_classes, d_norm, pack))
    if arch == "resnet":
        return (resnet.Generator(z_dim, resolution, g_channels, num_classes),
                resnet.Discriminator(resolution, d_channels, num_classes, pack))
    raise ValueError(f"model.arch must be 'dcgan' or 'resnet', got {arch!r}")


def init_weights(module):
    """DCGAN initialisation: N(0, 0.02) conv weights, N(1, 0.02) norm scales."""
    import torch.nn as nn

    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.parametrizations.weight.original if hasattr(module, "parametrizations")
                        else module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d) and module.affine:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
