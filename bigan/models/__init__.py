"""Generator/discriminator pairs by name. Imports nothing distributed: wrapping lives in bigan.backends."""
from bigan.models import dcgan, pix2pix, resnet


def build_models(arch: str, resolution: int, z_dim: int, g_channels: int, d_channels: int,
                 num_classes: int = 0, d_norm: str = "batch", pack: int = 1, norm: str = "batch",
                 dropout: float = 0.5, g_upsample: str = "transposed"):
    """(G, D) for an architecture name: 'dcgan', 'resnet' or 'pix2pix' (U-Net G and PatchGAN D, with
    `norm` and `dropout`); D judges `pack` samples at once (PacGAN); `g_upsample`: the DCGAN G's x2 steps."""
    if arch == "dcgan":
        return (dcgan.Generator(z_dim, resolution, g_channels, num_classes, g_upsample),
                dcgan.Discriminator(resolution, d_channels, num_classes, d_norm, pack))
    if arch == "resnet":
        return (resnet.Generator(z_dim, resolution, g_channels, num_classes),
                resnet.Discriminator(resolution, d_channels, num_classes, pack))
    if arch == "pix2pix":
        return (pix2pix.UNetGenerator(resolution, g_channels, norm, dropout),
                pix2pix.PatchDiscriminator(resolution, d_channels, norm))
    raise ValueError(f"model.arch must be 'dcgan', 'resnet' or 'pix2pix', got {arch!r}")


def init_weights(module):
    """DCGAN initialisation: N(0, 0.02) conv weights, N(1, 0.02) norm scales."""
    import torch.nn as nn

    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.parametrizations.weight.original if hasattr(module, "parametrizations")
                        else module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d) and module.affine:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
