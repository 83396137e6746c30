"""Run a family's phases (bigan's own iteration) on a fixed global batch and save the resulting parameters.

    python step_equivalence.py OUT.pt [--section.key=value ...]             # one process
    torchrun --nproc_per_node 2 step_equivalence.py OUT.pt [...]           # DDP: each rank its slice

Every run sees the same global batch of reals and latents, or for pix2pix of targets and
inputs, and captions for text-to-image (train.batch_size per rank per
micro-batch, train.grad_accum micro-batches, WORLD_SIZE ranks), so the parameters after the
steps must agree whatever the split. G's BatchNorm layers are put in eval mode so that G's
output does not depend on the split either (BatchNorm over micro-batches is another function).

BIGAN_TEST_NAN_D_STEP=k makes the D loss of D step k NaN on every rank: that step must be
skipped (and fp16's loss scale halved) the same way on every backend. OUT also holds the
final loss scales, the number of skipped steps, the dtype G's and D's convolutions and linear
layers computed in during the steps (``compute_dtype.g``/``.d``: inside DeepSpeed's engines
too) and, under ZeRO-3, whether each engine's module trace is complete.
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
import bigan.losses

original_gp = bigan.losses.gradient_penalty


def gradient_penalty(discriminator, real, fake, labels=None, generator=None, pack=1):
    """WGAN-GP with each sample's mixing weight taken from its own pixels, so it does not depend on the split."""
    alpha = (real.flatten(1).sum(1) * 997).frac().abs()[:, None, None, None]
    return original_gp(discriminator, real, fake, labels, pack=pack, alpha=alpha)


bigan.losses.gradient_penalty = gradient_penalty
nan_step = int(os.environ.get("BIGAN_TEST_NAN_D_STEP", "-1"))
original_d_loss = bigan.losses.d_loss


def d_loss(*args, **kwargs):
    loss, stats = original_d_loss(*args, **kwargs)
    return (loss * float("nan") if trainer.state.phase_steps.get("D", 0) == nan_step else loss), stats


bigan.losses.d_loss = d_loss
trainer = Trainer(config, accelerator)
if world > 1:  # gradients are only averaged across ranks when DDP or DeepSpeed wraps the models
    from deepspeed import DeepSpeedEngine

    for model in (trainer.backend.trained("g"), trainer.backend.trained("d")):
        assert isinstance(model, (torch.nn.parallel.DistributedDataParallel, DeepSpeedEngine)), type(model)
for module in trainer.backend.module("g").modules():
    if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.Dropout)):  # (pix2pix's dropout draws per split)
        module.eval()
import bigan.models.stylegan2  # noqa: E402

noisy = bigan.models.stylegan2.SynthesisLayer.forward  # StyleGAN2's noise inputs: the same whatever the split
bigan.models.stylegan2.SynthesisLayer.forward = lambda self, x, w, noise_mode="random": noisy(self, x, w, "const")

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # 3: mixed
compute_dtypes = {"g": set(), "d": set()}
for which, module in (("g", trainer.backend.module("g")), ("d", trainer.backend.module("d"))):
    for layer in module.modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
            layer.register_forward_hook(lambda m, i, output, which=which: compute_dtypes[which].add(output.dtype))


def parameters():
    """Full weights on every rank (plain_copy gathers ZeRO-3 partitions), and G's EMA (gathered where the EMA is
    partitioned; its checkpoint state, which Accelerate asks every rank for, too)."""
    g, d = trainer.backend.plain_copy("g"), trainer.backend.plain_copy("d")
    out = {**{f"G.{k}": v.clone() for k, v in g.state_dict().items()}, **{f"D.{k}": v.clone() for k, v in d.state_dict().items()}}
    if "g" in trainer.emas:
        out.update({f"EMA.{k}": v.clone() for k, v in trainer.emas["g"].whole().state_dict().items()})
        saved = trainer.emas["g"].state_dict()  # (a collective when partitioned; whole on the main process)
        if accelerator.is_main_process:
            assert saved.keys() == g.state_dict().keys(), sorted(saved.keys() ^ g.state_dict().keys())[:4]
            out.update({f"EMA_state.{k}": v.clone() for k, v in saved.items()})
    return out


initial = parameters()
b, k, rank, res, zd = config.train.batch_size, config.train.grad_accum, accelerator.process_index, config.data.resolution, config.model.z_dim
total = b * k * world
data = torch.Generator().manual_seed(1234)
# Latents: each phase step's draws come from one global tensor per (iteration, phase), micro-batch i of
# rank r taking samples [(i * world + r) * n, ... + n), as the reals: every split draws the same.
current = {"iteration": 0, "phase": "", "micro": 0}
original_run = trainer.steps.run


def run(phase, reals):
    current.update(phase=phase.name, micro=0)
    return original_run(phase, reals)


def draw(n, device):
    i = current["micro"]
    current["micro"] += 1
    seed = 7919 * current["iteration"] + sum(map(ord, current["phase"]))
    z = torch.randn(n * world * k, zd, generator=torch.Generator().manual_seed(seed))
    return z[(i * world + rank) * n:(i * world + rank + 1) * n].to(device), None


trainer.steps.run, trainer.family.draw = run, draw
if hasattr(trainer.family, "path_noise"):  # StyleGAN2's path-length noise: from each image's own pixels
    trainer.family.path_noise = lambda images: torch.sin(images.detach() * 1000) / images.shape[-1]
# text-to-image: captions repeating every BIGAN_TEST_CAPTION_PERIOD samples, a divisor of each rank's micro-batch
# in both runs compared, so that the batch's captions rolled by one (the mismatched pairs, drawn per micro-batch)
# are the same whatever the split. The runs compared set it alike: a default from each run's own micro-batch
# would give two splits different captions. Other families read no captions.
if trainer.family.captioned:
    assert "BIGAN_TEST_CAPTION_PERIOD" in os.environ, "text-to-image: set BIGAN_TEST_CAPTION_PERIOD in both runs"
period = int(os.environ.get("BIGAN_TEST_CAPTION_PERIOD", 1))
assert b % period == 0, f"BIGAN_TEST_CAPTION_PERIOD={period} must divide the micro-batch of {b}"
CAPTIONS = ["a red sun over still water", "three ridges under a white moon", "a meadow at dusk, no trees",
            "a golden sun above two ridges, woods"][:period]
# loss.d_steps D steps per iteration, each on a global batch of its own (the same latents: they are drawn per phase)
d_steps = config.loss.d_steps
for step in range(3):
    current["iteration"] = step
    reals = torch.rand(total * d_steps, 3, res, res, generator=data) * 2 - 1
    inputs = torch.rand(total * d_steps, 3, res, res, generator=data) * 2 - 1  # pix2pix: its input beside each real
    # micro-batch i of rank r in D step j holds global samples [((j * k + i) * world + r) * b, ... + b)
    parts = [slice(((j * k + i) * world + rank) * b, ((j * k + i) * world + rank + 1) * b)
             for j in range(d_steps) for i in range(k)]
    batches = [{"image": reals[p], "label": None, "source": inputs[p] if trainer.family.paired else None,
                "caption": [CAPTIONS[j % len(CAPTIONS)] for j in range(p.start, p.stop)]} for p in parts]
    trainer.steps.iteration(iter(batches))
final = parameters()  # every rank: a collective under ZeRO-3
trainer.steps.sync_counters()
for name, state in trainer.family.state().items():  # (ADA's p, the path-length mean: equal on every split)
    final.update({f"{name}.{key}": torch.as_tensor(value).cpu() for key, value in state.state_dict().items()
                  if torch.is_tensor(value)})
final.update({f"scale.{k}": torch.tensor(float(s.get_scale())) for k, s in trainer.backend.scalers.items()},
             skipped=torch.tensor(trainer.state.skipped))
final.update({f"compute_dtype.{k}": torch.tensor(DTYPE_CODES[next(iter(v))] if len(v) == 1 else 3)
              for k, v in compute_dtypes.items()})
if "g" in trainer.emas and trainer.emas["g"].partitioned:  # how much of G's EMA this rank holds (whole: 1)
    held = sum(s.numel() for s in trainer.emas["g"].shards)
    final["ema_share.g"] = torch.tensor(held / sum(p.numel() for p in trainer.backend.plain_copy("g").parameters()))
for k, engine in getattr(trainer.backend, "engines", {}).items():  # ZeRO-3: can DeepSpeed prefetch from its trace?
    if hasattr(engine.optimizer, "parameter_offload"):
        coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
        final[f"zero3_trace_complete.{k}"] = torch.tensor(coordinator.is_complete_trace())
if accelerator.is_main_process:
    torch.save(final, out)
    torch.save(initial, os.path.join(os.path.dirname(out), "initial.pt"))
accelerator.wait_for_everyone()
# torn down before exit, as bigan.train does (Accelerator.end_training): a ZeRO-3 rank that left with its
# process group alive once aborted at exit in CI ("terminate called without an active exception", -6)
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
