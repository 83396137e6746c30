"""One process replaying what trainer_draws.py recorded on W ranks, as one batch W times as large.

    python replay_draws.py DRAWS_DIR OUT.pt [train args, with train.batch_size = W x the ranks']

Phase by phase, as the ranks ran them, the ranks' real micro-batches and latents are concatenated in rank
order (the global batch DDP and ZeRO average over) and handed to this process's phase of the same name; OUT.pt holds G's and
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
phases = {p.name: p for p in trainer.family.phases}  # D, Dreg (lazy R1, every loss.r1_interval), G


def weights():
    g, d = trainer.backend.plain_copy("g"), trainer.backend.plain_copy("d")
    return {**{f"G.{k}": v.clone() for k, v in g.state_dict().items()}, **{f"D.{k}": v.clone() for k, v in d.state_dict().items()}}


def cat(parts):
    return None if parts[0] is None else torch.cat(parts)


torch.save(weights(), os.path.join(os.path.dirname(out), "initial.pt"))
assert len({len(r) for r in ranks}) == 1, "the ranks ran different numbers of phases"
for runs in zip(*ranks):
    assert len({(r["phase"], r["iteration"]) for r in runs}) == 1, "the ranks ran different phases"
    reals = None if runs[0]["reals"] is None else [
        {key: cat([r["reals"][i][key] for r in runs]) for key in ("image", "label", "source")}
        for i in range(len(runs[0]["reals"]))]
    handed_in += [tuple(cat([r["latents"][i][j] for r in runs]) for j in range(2)) for i in range(len(runs[0]["latents"]))]
    trainer.steps.run(phases[runs[0]["phase"]], reals)
    assert not handed_in, "the phase drew fewer latents than it did on the ranks"
torch.save(weights(), out)
