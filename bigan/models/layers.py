"""Building blocks shared by the architectures: fp32 spectral norm, conditional BatchNorm."""
import math
import weakref

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm


class StepSpectralNorm(_SpectralNorm):
    """Spectral norm in fp32, with the power iteration driven by the optimizer step, not the forward.

    PyTorch's spectral norm runs a power iteration in every training forward, so a step that
    calls D twice (reals, then fakes) or over k accumulated micro-batches normalizes each call
    by a different sigma, and the result depends on how the batch was split. Here
    ``update_spectral_norms(model)`` marks one power iteration as due, and the next forward
    runs it, where the weights are at hand (under ZeRO-3 they are only gathered there); every
    other forward only reads u and v. Everything runs in fp32 even under autocast (bf16 loses
    the precision that keeps sigma stable).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.due = False

    def forward(self, weight):
        with torch.autocast(weight.device.type, enabled=False):
            weight = weight.float()
            if weight.ndim == 1:
                return nn.functional.normalize(weight, dim=0, eps=self.eps)
            weight_mat = self._reshape_weight_to_matrix(weight)
            if self.due:
                self._power_method(weight_mat.detach(), self.n_power_iterations)  # no_grad inside
                self.due = False
            u = self._u.clone(memory_format=torch.contiguous_format)
            v = self._v.clone(memory_format=torch.contiguous_format)
            return weight / torch.vdot(u, torch.mv(weight_mat, v))


def spectral_norm(module: nn.Module, n_power_iterations: int = 1, eps: float = 1e-12) -> nn.Module:
    weight = module.weight
    dim = 1 if isinstance(module, nn.ConvTranspose2d) else 0
    parametrize.register_parametrization(module, "weight", StepSpectralNorm(weight, n_power_iterations, dim, eps))
    return module


_SPECTRAL_NORMS: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


def update_spectral_norms(model: nn.Module):
    """Mark one power-iteration step as due in every spectral norm of model (once per optimizer step).

    The norms of a model are found once (walking a model's modules each step cost 0.4 ms of
    Python per model on the CPU); architectures do not change after they are built.
    """
    norms = _SPECTRAL_NORMS.get(model)
    if norms is None:
        norms = _SPECTRAL_NORMS[model] = [m for m in model.modules() if isinstance(m, StepSpectralNorm)]
    for module in norms:
        module.due = True


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose scale and shift come from the class label (plain BatchNorm when num_classes == 0)."""

    def __init__(self, channels: int, num_classes: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.bn = nn.BatchNorm2d(channels, affine=num_classes == 0)
        if num_classes:
            self.gain = nn.Embedding(num_classes, channels)
            self.bias = nn.Embedding(num_classes, channels)
            nn.init.ones_(self.gain.weight)
            nn.init.zeros_(self.bias.weight)

    def forward(self, x, y=None):
        h = self.bn(x)
        if not self.num_classes:
            return h
        return h * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]


def make_norm(kind: str, channels: int) -> nn.Module:
    """A discriminator normalization layer: BatchNorm for 'batch'; 'spectral' and 'none' use none."""
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.Identity()


def upsamplings(arch: str, resolution: int) -> int:
    """Number of 2x stages from 4x4 to resolution (32-256 px, powers of two)."""
    stages = int(math.log2(resolution)) - 2 if resolution > 0 else 0
    if 2 ** (stages + 2) != resolution or not 3 <= stages <= 6:
        raise ValueError(f"{arch} supports resolutions 32, 64, 128 and 256, not {resolution}")
    return stages


def pack_samples(x: torch.Tensor, pack: int) -> torch.Tensor:
    """PacGAN (Lin et al. 2018): groups of `pack` consecutive samples side by side on channels.

    (N, C, H, W) -> (N / pack, pack * C, H, W); a discriminator that reads packs sees the joint
    distribution of m samples, so a generator that repeats itself is easy to tell from data.
    """
    if pack == 1:
        return x
    if x.shape[0] % pack:
        raise ValueError(f"loss.pack={pack}: a batch of {x.shape[0]} samples does not split into packs")
    return x.reshape(x.shape[0] // pack, pack * x.shape[1], *x.shape[2:])
