"""Exponential moving average of G's weights, with a half-life in images (StyleGAN2-ADA)."""
import copy

import torch


class EMA:
    partitioned = False  # (bigan.backends.deepspeed.PartitionedEMA: each rank holds a partition)

    def __init__(self, model: torch.nn.Module, half_life_kimg: float, rampup: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.half_life_kimg, self.rampup = half_life_kimg, rampup
        self._pairs = None

    def beta(self, images_seen: int, batch_images: int) -> float:
        half_life = self.half_life_kimg * 1000
        if self.rampup > 0:
            half_life = min(half_life, images_seen * self.rampup)
        return 0.5 ** (batch_images / max(half_life, 1e-8))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, images_seen: int, batch_images: int):
        beta = self.beta(images_seen, batch_images)
        if self._pairs is None or self._pairs[0] is not model:  # lists made once per model (per-step Python)
            self._pairs = (model, list(self.model.parameters()), list(model.parameters()),
                           list(self.model.buffers()), list(model.buffers()))
        _, ema_params, params, ema_buffers, buffers = self._pairs
        torch._foreach_lerp_(ema_params, params, 1 - beta)
        if buffers:  # BatchNorm statistics and spectral-norm vectors follow G
            torch._foreach_copy_(ema_buffers, buffers)

    def whole(self, everywhere: bool = True) -> torch.nn.Module:
        """The EMA network, whole (every rank calls this: a collective where the EMA is partitioned, which
        with everywhere=False builds it on the main process only)."""
        return self.model

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)
        self._pairs = None
