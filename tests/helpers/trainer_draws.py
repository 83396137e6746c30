"""bigan.train's main, recording what the trainer itself feeds each D and G step on every rank.

    accelerate launch ... trainer_draws.py OUT_DIR [train args]

Each rank writes OUT_DIR/draws_rank{R}.pt: for each phase the trainer ran, in order (D, Dreg, G; D
loss.d_steps times an iteration), its name and iteration, the real micro-batches it got from the data
stream (None: it takes none) and the (latent, class) pairs the family drew for it. Rank 0 also
writes OUT_DIR/final.pt with G's and D's weights after the run (gathered on every rank). G's
BatchNorm layers run in eval mode, so that G's output does not depend on how a batch is split
over ranks (replay_draws.py compares the run with one process on the concatenated batch).
"""
import os
import sys

import torch

from bigan.train import main
from bigan.training.persistence import Persistence
from bigan.training.steps import Steps

out_dir, argv = sys.argv[1], sys.argv[2:]
records, ranks = [], []
original_run, original_export, original_init = Steps.run, Persistence.export, Steps.__init__


def clone(x):
    return x.clone() if torch.is_tensor(x) else x


def init(self, family, backend, *args, **kwargs):
    original_init(self, family, backend, *args, **kwargs)
    for module in backend.module("g").modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # and stays so (sample grids switch G to train() after)
            module.eval()
            module.train = lambda mode=True, m=module: m
    draw = family.draw

    def recorded_draw(n, device):
        pair = draw(n, device)
        records[-1]["latents"].append(tuple(clone(x) for x in pair))
        return pair

    family.draw = recorded_draw
    ranks.append(self)


def run(self, phase, reals):
    records.append({"phase": phase.name, "iteration": self.state.step, "latents": [],
                    "reals": None if reals is None else [{k: clone(v) for k, v in r.items()} for r in reals]})
    return original_run(self, phase, reals)


def export(self):
    g, d = self.t.backend.plain_copy("g"), self.t.backend.plain_copy("d")  # every rank: a collective under ZeRO-3
    if self.t.accelerator.is_main_process:
        torch.save({**{f"G.{k}": v for k, v in g.state_dict().items()}, **{f"D.{k}": v for k, v in d.state_dict().items()}},
                   os.path.join(out_dir, "final.pt"))
    return original_export(self)


Steps.__init__, Steps.run, Persistence.export = init, run, export
code = main(argv)
rank = int(os.environ.get("RANK", "0"))
torch.save(records, os.path.join(out_dir, f"draws_rank{rank}.pt"))
sys.exit(code)
