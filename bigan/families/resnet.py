"""SNGAN/BigGAN-style residual G (conditional BatchNorm) and D (spectral norm, projection)."""
from bigan.families.noise import NoiseFamily
from bigan.models import build_models


class ResNet(NoiseFamily):
    name = "resnet"

    def build_pair(self):
        m, loss, res = self.config.model, self.config.loss, self.config.data.resolution
        return build_models("resnet", res, m.z_dim, m.g_channels, m.d_channels, m.num_classes, pack=loss.pack)
