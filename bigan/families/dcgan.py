"""DCGAN (Radford et al. 2016): transposed-conv (or resize-conv) + BatchNorm G, strided-conv D with
BatchNorm, spectral norm or nothing (then lazy R1 keeps it in check)."""
from bigan.families.noise import NoiseFamily
from bigan.models import build_models


class DCGAN(NoiseFamily):
    name = "dcgan"
    dcgan_init = True

    def build_pair(self):
        m, loss, res = self.config.model, self.config.loss, self.config.data.resolution
        return build_models("dcgan", res, m.z_dim, m.g_channels, m.d_channels, m.num_classes, m.d_norm, loss.pack,
                            g_upsample=m.g_upsample)
