"""One process replaying what trainer_draws.py recorded on W ranks, as one batch W times as large.

    python replay_draws.py DRAWS_DIR OUT.pt [train args, with train.batch_size = W x the ranks']

Step by step, the ranks' real micro-batches and latents are concatenated in rank order (the global
batch DDP and ZeRO average over) and handed to this process's D, Dreg and G steps; OUT.pt holds G's and
D's weights after them, and initial.pt beside it those before.
"""
import os
import sys
from pathlib import Path

import torch

from bigan.config import load_config
from bigan.train import make_accelerator
from bigan.trainer import Trainer

draws_dir, out, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
ranks = [torch.load(p, weights_only=False) for p in sorted(draws_dir.glob("draws_rank*.pt"))]
trainer = Trainer(load_config(None, overrides), make_accelerator(load_config(None, overrides)))
for module in trainer.backend.module("g").modules():
    if isinstance(module, torch.nn.BatchNorm2d):  # and stays so (sample grids switch G to train() after)
        module.eval()
        module.train = lambda mode=True, m=module: m
handed_in = []  # what the phases' next draws return
trainer.family.draw = lambda n, device: handed_in.pop(0)
phases = trainer.family.phases  # D, Dreg (lazy R1, every loss.r1_interval), G: only D and G draw latents


def weights():
    g, d = trainer.backend.plain_copy("g"), trainer.backend.plain_copy("d")
    return {**{f"G.{k}": v.clone() for k, v in g.state_dict().items()}, **{f"D.{k}": v.clone() for k, v in d.state_dict().items()}}


def cat(parts):
    return None if parts[0] is None else torch.cat(parts)


torch.save(weights(), os.path.join(os.path.dirname(out), "initial.pt"))
for iteration, steps in enumerate(zip(*ranks)):
    micro = range(len(steps[0]["reals"]))
    reals = [{"image": cat([s["reals"][i]["image"] for s in steps]), "label": cat([s["reals"][i]["label"] for s in steps]),
              "source": cat([s["reals"][i]["source"] for s in steps])} for i in micro]
    for key in ("d_latents", "g_latents"):
        handed_in += [tuple(cat([s[key][i][j] for s in steps]) for j in range(2)) for i in micro]
    for phase in phases:
        if iteration % phase.every == 0:
            trainer.steps.run(phase, reals if phase.reals is not None else None)
torch.save(weights(), out)
