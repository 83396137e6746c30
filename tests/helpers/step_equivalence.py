"""Run bigan's D and G steps on a fixed global batch and save the resulting parameters.

    python step_equivalence.py OUT.pt [--section.key=value ...]             # one process
    torchrun --nproc_per_node 2 step_equivalence.py OUT.pt [...]           # DDP: each rank its slice

Every run sees the same global batch of reals and latents (train.batch_size per rank per
micro-batch, train.grad_accum micro-batches, WORLD_SIZE ranks), so the parameters after the
steps must agree whatever the split. G's BatchNorm layers are put in eval mode so that G's
output does not depend on the split either (BatchNorm over micro-batches is another function).
"""
import os
import sys

import torch

from bigan.config import load_config
from bigan.train import make_accelerator
from bigan.trainer import Trainer

out, overrides = sys.argv[1], sys.argv[2:]
config = load_config(None, overrides)
accelerator = make_accelerator(config)
world = int(os.environ.get("WORLD_SIZE", "1"))
assert accelerator.num_processes == world, f"accelerator sees {accelerator.num_processes} processes, expected {world}"
trainer = Trainer(config, accelerator)
if world > 1:  # gradients are only averaged across ranks when DDP wraps the models
    assert isinstance(trainer.backend.g, torch.nn.parallel.DistributedDataParallel), type(trainer.backend.g)
    assert isinstance(trainer.backend.d, torch.nn.parallel.DistributedDataParallel), type(trainer.backend.d)
for module in trainer.backend.g_module.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
        module.eval()

def parameters():
    g, d = (accelerator.unwrap_model(m) for m in (trainer.backend.g_module, trainer.backend.d_module))
    return {**{f"G.{k}": v.clone() for k, v in g.state_dict().items()}, **{f"D.{k}": v.clone() for k, v in d.state_dict().items()}}


initial = parameters()
b, k, rank, res, zd = config.train.batch_size, config.train.grad_accum, accelerator.process_index, config.data.resolution, config.model.z_dim
total = b * k * world
data = torch.Generator().manual_seed(1234)
for step in range(3):
    reals = torch.rand(total, 3, res, res, generator=data) * 2 - 1
    z_d, z_g = torch.randn(total, zd, generator=data), torch.randn(total, zd, generator=data)
    # micro-batch i of rank r holds global samples [(i * world + r) * b, ... + b)
    parts = [slice((i * world + rank) * b, (i * world + rank + 1) * b) for i in range(k)]
    trainer.d_step([{"image": reals[p], "label": None} for p in parts], [(z_d[p], None) for p in parts])
    trainer.g_step([(z_g[p], None) for p in parts])
if accelerator.is_main_process:
    torch.save(parameters(), out)
    torch.save(initial, os.path.join(os.path.dirname(out), "initial.pt"))
accelerator.wait_for_everyone()
