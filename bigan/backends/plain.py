"""The Accelerate backend: one device or DDP; autocast with fp32 weights and a GradScaler per model."""
import contextlib
import math

import torch

from bigan.backends.precision import DTYPES, NAMES, autocast


class PlainBackend:
    fused_adam = True  # step() skips non-finite updates through fused Adam's found_inf

    def __init__(self, accelerator, precision: str, grad_clip: float = 0.0, channels_last: bool = False,
                 sync_batchnorm: bool = False, compile: bool = False):
        self.accelerator, self.grad_clip = accelerator, grad_clip
        self.device = accelerator.device
        self.dtype = DTYPES[precision]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.sync_batchnorm, self.compile = sync_batchnorm, compile
        # fp16 needs loss scaling, separately per model (their gradients live on different scales)
        self.scalers = {k: torch.amp.GradScaler(self.device.type, enabled=precision == "fp16") for k in "gd"}

    def wrap(self, g, d, opt_g, opt_d):
        if self.sync_batchnorm and self.accelerator.num_processes > 1:
            g, d = (torch.nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in (g, d))
        g, d = (m.to(self.device, memory_format=self.memory_format) for m in (g, d))
        self.g, self.d, self.opt_g, self.opt_d = self.accelerator.prepare(g, d, opt_g, opt_d)
        # unwrapped once: unwrap_model asks importlib.metadata whether DeepSpeed is installed on
        # every call (4 ms, measured: the EMA update did it every step)
        self.g_module = self.accelerator.unwrap_model(self.g)
        self.d_module = self.accelerator.unwrap_model(self.d)
        self.bare = {"g": self.g_module, "d": self.d_module}  # never compiled: EMA, copies and exports
        # R1 and WGAN-GP differentiate D's gradient (a double backward), which torch.compile's
        # aot_autograd refuses: penalties run D eager (DDP handles double backward, tested)
        self.d_penalty = self.d
        self.wrapped = {"g": self.g, "d": self.d}  # DDP itself, for no_sync
        if self.compile:
            self.g, self.d = torch.compile(self.g), torch.compile(self.d)
            self.g_module, self.d_module = torch.compile(self.g_module), torch.compile(self.d_module)
        self.params = {k: list(m.parameters()) for k, m in self.bare.items()}
        # stepped directly, not through Accelerate's wrapper: fused Adam's found_inf is an attribute
        # of the torch optimizer itself (checkpoints still go through the prepared ones)
        self.optimizers = {"g": self.opt_g.optimizer, "d": self.opt_d.optimizer}

    def remember_architecture(self, g, d):
        pass  # weights are never partitioned here

    def frozen(self, which: str):
        """The bare model, for forwards that must not train it or sync it (G in the D step)."""
        return {"g": self.g_module, "d": self.d_module}[which]

    @contextlib.contextmanager
    def gathered(self, which: str):
        yield self.bare[which]

    def plain_copy(self, which: str):
        """The model itself: its weights are whole on every rank."""
        return self.bare[which]

    def check_resumable_world(self, saved: int, now: int):
        pass  # Accelerate saves whole models and optimizers: any number of processes can load them

    def save(self, directory):
        pass  # models and optimizers are in Accelerate's save_state

    def load(self, directory):
        pass

    def autocast(self):
        return autocast(self.device, self.dtype)

    def backward(self, loss, which: str, sync: bool = True):
        """Backward of one micro-batch; sync=False skips the DDP all-reduce (gradient accumulation)."""
        context = contextlib.nullcontext() if sync else self.accelerator.no_sync(self.wrapped[which])
        with context:
            self.scalers[which].scale(loss).backward()

    def step(self, which: str) -> torch.Tensor:
        """Clip, step and zero one model's optimizer; returns the gradient norm, on the device.

        Nothing here reads the device from the host: a step whose gradients are not finite is
        skipped by fused Adam itself, which takes a found_inf flag (GradScaler's mechanism, used
        for fp32 and bf16 too), so the host can queue the next step while this one runs.
        Gradients are identical on all ranks after the all-reduce, so all ranks agree.
        """
        scaler, optimizer, params = self.scalers[which], self.optimizers[which], self.params[which]
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)
        if scaler.is_enabled():
            scaler.step(optimizer)  # passes its found_inf to fused Adam
            scaler.update()
        else:
            optimizer.grad_scale, optimizer.found_inf = None, (~norm.isfinite()).float()
            optimizer.step()
            del optimizer.grad_scale, optimizer.found_inf
        optimizer.zero_grad(set_to_none=True)
        return norm

    def settling(self, which: str):
        """Whether a non-finite step is fp16's loss scale still settling (not a bad step); on the device."""
        scaler = self.scalers[which]
        return scaler._get_scale_async() >= 1 if scaler.is_enabled() else False

    def describe(self) -> str:
        n = self.accelerator.num_processes
        where = f"DDP over {n} processes" if n > 1 else "one process"
        scaling = ", GradScaler per model" if self.dtype == torch.float16 else ""
        return f"plain PyTorch ({where}); {NAMES[self.dtype]}{scaling}, fp32 weights"

    def state_dict(self):
        return {k: s.state_dict() for k, s in self.scalers.items()}

    def load_state_dict(self, state):
        for k, s in self.scalers.items():
            s.load_state_dict(state[k])
