"""A deliberately odd GAN family, to show a family needs nothing outside its own file.

    --model.arch=odd_family:Odd   (with this folder on PYTHONPATH)

Three networks: DCGAN's G and D, and Q, an encoder that learns to read G's latent back from its
image (InfoGAN's idea); three phases: D and G every iteration, Q every `odd.q_every` (3)
iterations with G fixed. Its own config section (odd.*) and its own checkpointed state (how many
images Q has seen) come from here too.
"""
from dataclasses import dataclass, field

import torch
from torch import nn

from bigan.families.base import Network, Phase
from bigan.families.dcgan import DCGAN


@dataclass
class OddOptions:
    q_every: int = field(default=3, metadata={"doc": "iterations between Q's optimizer steps"})
    q_lr: float = field(default=1e-3, metadata={"doc": "Q's Adam learning rate"})


class QCounter:
    """State of the family's own, kept in checkpoints: images Q has been trained on."""

    def __init__(self):
        self.images = 0

    def state_dict(self):
        return {"images": self.images}

    def load_state_dict(self, state):
        self.images = state["images"]


class Encoder(nn.Module):
    def __init__(self, resolution: int, z_dim: int, ch: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(ch, ch, 4, 2, 1),
                                  nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(ch * (resolution // 4) ** 2, z_dim))

    def forward(self, images, y=None):
        return self.body(images)


class Odd(DCGAN):
    name = "odd"
    options = OddOptions

    def __init__(self, config):
        super().__init__(config)
        self.counter = QCounter()

    @classmethod
    def checks(cls, config):
        return [("odd.q_every", config.family_options.q_every >= 1, "must be >= 1")]

    def networks(self):
        nets = super().networks()
        m, o = self.config.model, self.config.family_options
        nets["q"] = Network(Encoder(self.config.data.resolution, m.z_dim), o.q_lr, (0.5, 0.99), keys="odd.q_lr")
        return nets

    @property
    def phases(self):
        return [*super().phases, Phase("Q", trains="q", loss=self.q_loss, every=self.config.family_options.q_every,
                                       reals=None)]

    def state(self):
        return {"q_counter": self.counter}

    def q_loss(self, step, real=None):
        z, y = self.draw(self.config.train.batch_size, step.device)
        with torch.no_grad():
            fake = step.fixed("g")(z, y)
        error = (step.train("q")(fake).float() - z).square().mean()
        self.counter.images += len(z)
        return error, {"Loss/Q": error.detach()}
