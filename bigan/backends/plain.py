"""The Accelerate backend: one device or DDP; autocast with fp32 weights and a GradScaler per network."""
import contextlib

import torch

from bigan.backends.precision import DTYPES, NAMES, autocast


class PlainBackend:
    fused_adam = True  # step() skips non-finite updates through fused Adam's found_inf

    def __init__(self, accelerator, precision: str, grad_clip: float = 0.0, channels_last: bool = False,
                 sync_batchnorm: bool = False, compile: bool = False):
        self.accelerator, self.grad_clip = accelerator, grad_clip
        self.device = accelerator.device
        self.dtype, self.precision = DTYPES[precision], precision
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.sync_batchnorm, self.compile = sync_batchnorm, compile

    def wrap(self, networks: dict):
        """networks: name -> (module, optimizer), in the order their checkpoint files are numbered."""
        self.names = names = list(networks)
        modules = [networks[n][0] for n in names]
        if self.sync_batchnorm and self.accelerator.num_processes > 1:
            modules = [torch.nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in modules]
        modules = [m.to(self.device, memory_format=self.memory_format) for m in modules]
        prepared = self.accelerator.prepare(*modules, *[networks[n][1] for n in names])
        self.wrapped = dict(zip(names, prepared[:len(names)]))  # DDP itself (for no_sync, and penalties)
        self.prepared_optimizers = dict(zip(names, prepared[len(names):]))  # what Accelerate checkpoints
        # unwrapped once: unwrap_model asks importlib.metadata whether DeepSpeed is installed on every
        # call (4 ms, measured: the EMA update did it every step). Never compiled: EMA, copies, exports.
        self.bare = {n: self.accelerator.unwrap_model(m) for n, m in self.wrapped.items()}
        self.runs, self.modules = dict(self.wrapped), dict(self.bare)
        if self.compile:  # penalties (double backward, which aot_autograd refuses) keep the eager DDP module
            self.runs = {n: torch.compile(m) for n, m in self.wrapped.items()}
            self.modules = {n: torch.compile(m) for n, m in self.bare.items()}
        self.params = {n: list(m.parameters()) for n, m in self.bare.items()}
        # stepped directly, not through Accelerate's wrapper: fused Adam's found_inf is an attribute of the
        # torch optimizer itself (checkpoints still go through the prepared ones)
        self.optimizers = {n: o.optimizer for n, o in self.prepared_optimizers.items()}
        # fp16 needs loss scaling, separately per network (their gradients live on different scales)
        self.scalers = {n: torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16") for n in names}

    def remember_architecture(self, networks: dict):
        pass  # weights are never partitioned here

    def ema_partitioned(self, name: str) -> bool:
        return False  # bigan.ema.EMA keeps a whole copy

    def trained(self, name: str):
        """The network as the phase that trains it runs it: DDP syncs its gradients."""
        return self.runs[name]

    def module(self, name: str):
        """The bare network, for forwards that must not sync it (a frozen network in another's phase)."""
        return self.modules[name]

    def inference(self, name: str):
        """The network for forwards under no_grad (G in the D step)."""
        return self.modules[name]

    def penalty(self, name: str):
        """What gradient penalties differentiate through: DDP handles double backward (tested), eager."""
        return self.wrapped[name]

    def optimizer(self, name: str):
        return self.optimizers[name]

    @contextlib.contextmanager
    def gathered(self, name: str):
        yield self.bare[name]

    def whole(self, name: str):
        """A phase's forwards and backwards with the network's weights whole throughout: they always are here."""
        return contextlib.nullcontext()

    def begin_micro_batch(self, name: str):
        """Before each micro-batch of a phase that trains `name`: nothing to do here."""

    def plain_copy(self, name: str, everywhere: bool = True):
        """The network itself: its weights are whole on every rank."""
        return self.bare[name]

    def check_resumable_world(self, saved: int, now: int):
        pass  # Accelerate saves whole models and optimizers: any number of processes can load them

    def save(self, directory):
        pass  # models and optimizers are in Accelerate's save_state

    def load(self, directory):
        pass

    def autocast(self):
        return autocast(self.device, self.dtype)

    def backward(self, loss, name: str, sync: bool = True):
        """Backward of one micro-batch; sync=False skips the DDP all-reduce (gradient accumulation)."""
        context = contextlib.nullcontext() if sync else self.accelerator.no_sync(self.wrapped[name])
        with context:
            self.scalers[name].scale(loss).backward()

    def step(self, name: str) -> torch.Tensor:
        """Clip, step and zero one network's optimizer; returns the gradient norm, on the device.

        Nothing here reads the device from the host: a step whose gradients are not finite is
        skipped by fused Adam itself, which takes a found_inf flag (GradScaler's mechanism, used
        for fp32 and bf16 too), so the host can queue the next step while this one runs.
        Gradients are identical on all ranks after the all-reduce, so all ranks agree.
        """
        scaler, optimizer, params = self.scalers[name], self.optimizers[name], self.params[name]
        scaler.unscale_(optimizer)
        norm = total_norm([p.grad for p in params if p.grad is not None])
        if self.grad_clip > 0:
            clip_with_norm_(params, self.grad_clip, norm)
        if scaler.is_enabled():
            scaler.step(optimizer)  # passes its found_inf to fused Adam
            scaler.update()
        else:
            optimizer.grad_scale, optimizer.found_inf = None, (~norm.isfinite()).float()
            optimizer.step()
            del optimizer.grad_scale, optimizer.found_inf
        optimizer.zero_grad(set_to_none=True)
        return norm

    def settling(self, name: str):
        """Whether a non-finite step is fp16's loss scale still settling (not a bad step); on the device."""
        scaler = self.scalers[name]
        return scaler._get_scale_async() >= 1 if scaler.is_enabled() else False

    def describe(self) -> str:
        n = self.accelerator.num_processes
        where = f"DDP over {n} processes" if n > 1 else "one process"
        scaling = ", GradScaler per network" if self.dtype == torch.float16 else ""
        return f"plain PyTorch ({where}); {NAMES[self.dtype]}{scaling}, fp32 weights"

    def state_dict(self):
        return {k: s.state_dict() for k, s in self.scalers.items()}

    def load_state_dict(self, state):
        for k, s in self.scalers.items():
            s.load_state_dict(state[k])


def total_norm(grads: list) -> torch.Tensor:
    """The 2-norm of all the gradients together, on their device (no host read): torch's get_total_norm
    (torch >= 2.6), or the same from per-tensor norms on the pyproject's older torch."""
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm(grads)
    if not grads:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))


def clip_with_norm_(params, max_norm: float, norm: torch.Tensor):
    """Scales the gradients by min(1, max_norm / (norm + 1e-6)), as torch's clip_grads_with_norm_ (torch >= 2.6)."""
    if hasattr(torch.nn.utils, "clip_grads_with_norm_"):
        return torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0).to(grads[0].device))
