"""The DeepSpeed backend: G and D each in their own ZeRO engine (stages may differ per model).

The traps this avoids (measured with deepspeed 0.19.8, torch 2.13):
* A G loss computed through D's *engine* fires D's backward hooks; R1 / WGAN-GP through
  ``autograd.grad(create_graph=True)`` on the engine breaks ZeRO-1/2 and is wrong on ZeRO-3.
  The trainer calls ``d_module`` (the engine's inner module) for the G step and the penalty
  branch, and the D loss's gradients still reach D's engine through ``engine.backward``.
* DeepSpeed's bf16/fp16 modes cast the whole module (BatchNorm statistics, spectral-norm
  vectors): bigan keeps the engines in fp32 and autocasts the forwards itself.
* DeepSpeed >= 0.19.3 clips gradients at 1.0 unless told: bigan always writes
  ``gradient_clipping`` (train.grad_clip; 0 = off), and the batch and accumulation keys, into
  each engine's config, so train.* stays the one source of truth.
* Under ZeRO-3 a module's weights are partitioned: EMA, sample grids and export gather them
  on every rank (``plain_copy``), never on the main process alone.
"""
import contextlib
import copy
import json
from pathlib import Path

import torch


class DeepSpeedConfigError(Exception):
    pass


def load_ds_config(path, batch_size: int, grad_accum: int, grad_clip: float, world_size: int) -> dict:
    """A DeepSpeed JSON with bigan's batch, accumulation and clipping written in; refuses what would break."""
    path = Path(path)
    if not path.exists():
        raise DeepSpeedConfigError(f"DeepSpeed config not found: {path}")
    config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(f"{path}: expected a JSON object")
    for key in ("bf16", "fp16"):
        if config.get(key, {}).get("enabled"):
            raise DeepSpeedConfigError(f"{path}: '{key}' casts the whole model (BatchNorm and spectral-norm buffers "
                                       f"break); remove it and set train.precision (autocast, fp32 weights)")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise DeepSpeedConfigError(f"{path}: remove '{key}'; bigan builds Adam from train.* (TTUR, lazy R1)")
    config.update(train_micro_batch_size_per_gpu=batch_size, gradient_accumulation_steps=grad_accum,
                  train_batch_size=batch_size * grad_accum * world_size, gradient_clipping=grad_clip)
    if config.get("zero_optimization", {}).get("offload_optimizer"):
        config.setdefault("zero_force_ds_cpu_optimizer", False)  # bigan passes torch's Adam
    return config


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


class DeepSpeedBackend:
    """Same interface as PlainBackend; ``g``/``d`` are DeepSpeed engines, ``g_module``/``d_module`` their modules."""

    def __init__(self, accelerator, precision: str, config_g: dict, config_d: dict, channels_last: bool = False):
        if precision == "fp16":
            raise DeepSpeedConfigError("train.precision=fp16 is not supported with DeepSpeed in bigan "
                                       "(it needs per-engine loss scaling); use bf16")
        import deepspeed

        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="gloo" if accelerator.device.type == "cpu" else "nccl")
        self.accelerator, self.device = accelerator, accelerator.device
        self.dtype = torch.bfloat16 if precision == "bf16" else None
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.configs = {"g": config_g, "d": config_d}
        self.scalers = {k: torch.amp.GradScaler(self.device.type, enabled=False) for k in "gd"}

    def wrap(self, g, d, opt_g, opt_d):
        import deepspeed

        engines = {}
        for which, model, optimizer in (("g", g, opt_g), ("d", d, opt_d)):
            model = model.to(self.device, memory_format=self.memory_format)
            engines[which], *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.configs[which])
        self.g, self.d = engines["g"], engines["d"]
        self.g_module, self.d_module = self.g.module, self.d.module
        self.d_penalty = self.d_module  # autograd.grad(create_graph=True) through the engine breaks ZeRO
        self.opt_g, self.opt_d = self.g.optimizer, self.d.optimizer
        self.engines = engines

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss, which: str, sync: bool = True):
        """The trainer already divides by the micro-batch count; DeepSpeed steps at the accumulation boundary."""
        engine = self.engines[which]
        engine.backward(loss, scale_wrt_gas=False)
        if not sync:  # not the last micro-batch: let the engine count it (it only steps at the boundary)
            engine.step()

    def step(self, which: str) -> float:
        engine = self.engines[which]
        engine.step()
        norm = engine.get_global_grad_norm()
        # None means DeepSpeed did not compute a norm this step; that is not a non-finite step
        # (NaN here would make the trainer count it as bad and roll back again and again).
        return float(norm) if norm is not None else 0.0

    @contextlib.contextmanager
    def gathered(self, which: str):
        """The full weights of a model, on every rank (a collective under ZeRO-3)."""
        if zero_stage(self.configs[which]) == 3:
            import deepspeed

            module = self.engines[which].module
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                yield module
        else:
            yield self.engines[which].module

    def plain_copy(self, which: str) -> torch.nn.Module:
        """A full, unpartitioned copy of a model (every rank must call this)."""
        with self.gathered(which) as module:
            state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        plain = copy.deepcopy(self._template[which])
        plain.load_state_dict(state)
        return plain.to(self.device)

    def remember_architecture(self, g, d):
        """Unpartitioned templates of G and D (taken before ZeRO-3 partitions them), for plain_copy."""
        self._template = {"g": copy.deepcopy(g).cpu(), "d": copy.deepcopy(d).cpu()}

    def save(self, directory: Path):
        for which, engine in self.engines.items():
            engine.save_checkpoint(str(directory), tag=which.upper(), save_latest=False)

    def load(self, directory: Path):
        for which, engine in self.engines.items():
            engine.load_checkpoint(str(directory), tag=which.upper())

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass
