"""bigan.train's main, recording what the trainer itself feeds each D and G step on every rank.

    accelerate launch ... trainer_draws.py OUT_DIR [train args]

Each rank writes OUT_DIR/draws_rank{R}.pt: per step, the real micro-batches the D step got from the
data stream and the (latent, class) pairs the trainer drew for the D and the G step. Rank 0 also
writes OUT_DIR/final.pt with G's and D's weights after the run (gathered on every rank). G's
BatchNorm layers run in eval mode, so that G's output does not depend on how a batch is split
over ranks (replay_draws.py compares the run with one process on the concatenated batch).
"""
import os
import sys

import torch

from bigan.train import main
from bigan.trainer import Trainer

out_dir, argv = sys.argv[1], sys.argv[2:]
records, trainers = [], []
original_init, original_d_step, original_g_step, original_export = (Trainer.__init__, Trainer.d_step,
                                                                    Trainer.g_step, Trainer.export)


def init(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    for module in self.backend.g_module.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # and stays so (sample grids switch G to train() after)
            module.eval()
            module.train = lambda mode=True, m=module: m
    trainers.append(self)


def d_step(self, reals, latents):
    records.append({"reals": [{k: v.clone() if torch.is_tensor(v) else v for k, v in r.items()} for r in reals],
                    "d_latents": [tuple(x.clone() if x is not None else None for x in pair) for pair in latents]})
    return original_d_step(self, reals, latents)


def g_step(self, latents, targets=None):
    records[-1]["g_latents"] = [tuple(x.clone() if x is not None else None for x in pair) for pair in latents]
    return original_g_step(self, latents, targets)


def export(self):
    g, d = self.backend.plain_copy("g"), self.backend.plain_copy("d")  # every rank: a collective under ZeRO-3
    if self.accelerator.is_main_process:
        torch.save({**{f"G.{k}": v for k, v in g.state_dict().items()}, **{f"D.{k}": v for k, v in d.state_dict().items()}},
                   os.path.join(out_dir, "final.pt"))
    return original_export(self)


Trainer.__init__, Trainer.d_step, Trainer.g_step, Trainer.export = init, d_step, g_step, export
code = main(argv)
torch.save(records, os.path.join(out_dir, f"draws_rank{trainers[0].accelerator.process_index}.pt"))
sys.exit(code)
