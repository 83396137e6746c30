"""The DeepSpeed backend: G and D each in their own ZeRO engine (stages may differ per model).

The traps this avoids (measured with deepspeed 0.19.8, torch 2.13):
* A G loss computed through D's *engine* fires D's backward hooks; R1 / WGAN-GP through
  ``autograd.grad(create_graph=True)`` on the engine breaks ZeRO-1/2 and is wrong on ZeRO-3.
  The trainer calls ``d_module`` (the engine's inner module) for the G step and the penalty
  branch, and the D loss's gradients still reach D's engine through ``engine.backward``.
* Under ZeRO-3 a second-order penalty's gradients reach the weights through the graph of a
  gradient taken in the forward, outside the modules whose backward gathers them: autograd would
  accumulate them into released (empty) weights. Such a phase (Phase.whole) holds its network's
  weights gathered from its first forward to its last backward (``whole``). And a micro-batch whose
  forwards all skip the engine does first what an engine forward does (``begin_micro_batch``):
  without it ZeRO-3 overwrites the previous micro-batch's gradient partition instead of adding.
* DeepSpeed's bf16/fp16 modes cast the whole module (BatchNorm statistics, spectral-norm
  vectors): bigan keeps the engines in fp32 and autocasts the forwards itself.
* ``engine.forward`` switches an outer CUDA autocast *off* around the module unless the
  engine's own ``torch_autocast`` section is on (``autocast_if_enabled``; it asks about CUDA
  only, so CPU runs never meet it). Each engine's module re-enters bigan's autocast inside
  its own forward (``reenter_autocast``). DeepSpeed's ``torch_autocast`` section is refused
  rather than used: it marks Linear/Conv weights to have their gradients reduced in the low
  dtype (bf16 all-reduce, unlike the plain path's fp32 DDP), holds one dtype for the whole
  process, and would be a second precision setting beside train.precision.
* DeepSpeed >= 0.19.3 clips gradients at 1.0 unless told: bigan always writes
  ``gradient_clipping`` (train.grad_clip; 0 = off), and the batch and accumulation keys, into
  each engine's config, so train.* stays the one source of truth.
* DeepSpeed's ZeRO optimizers skip a step whose global gradient norm is not finite (fp32
  weights, every stage; measured), so non-finite steps are skipped as on the plain path.
  fp16 gets one dynamic loss scale per engine (``DynamicLossScale``), handed to the ZeRO
  optimizer with ``override_loss_scale``: DeepSpeed multiplies the loss by it in
  ``engine.backward`` and divides it out before clipping and Adam.
* Under ZeRO-3 a module's weights are partitioned: sample grids, evaluation and export gather
  them with every rank taking part (``plain_copy``; grids and export keep the copy on the main
  process only), never on the main process alone. The EMA is partitioned
  like the weights (``PartitionedEMA``: each rank averages its own partition). G's fakes for the
  D step come from a gathered copy of G (``inference``, the "shadow"), which keeps G's module
  trace intact; ``shadow=False`` (train.zero3_shadow) runs them through the partitioned module
  instead, for networks too large for a whole copy per rank.
"""
import contextlib
import copy
import functools
import json
import math
from pathlib import Path

import torch

from bigan.backends.precision import DTYPES, NAMES, autocast
from bigan.ema import EMA


HOLD_ID = -0x6B16  # a submodule id no module has (DeepSpeed numbers them from 0): DeepSpeedBackend.whole's hold


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
    if config.get("torch_autocast", {}).get("enabled"):
        raise DeepSpeedConfigError(f"{path}: remove 'torch_autocast' and set train.precision (bigan autocasts "
                                   f"inside each engine; DeepSpeed's section would reduce gradients in 16 bits)")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise DeepSpeedConfigError(f"{path}: remove '{key}'; bigan builds Adam from train.* (TTUR, lazy R1)")
    config.update(train_micro_batch_size_per_gpu=batch_size, gradient_accumulation_steps=grad_accum,
                  train_batch_size=batch_size * grad_accum * world_size, gradient_clipping=grad_clip)
    if zero_stage(config) == 3:
        # ZeRO-3's memory-efficient linear replaces torch.nn.functional.linear, process-wide, with
        # an autograd function that rounds bf16 differently from torch's (measured: up to 2.6% of
        # an update off the plain path, vs 0.03% without it); a GAN's linear layers are small.
        config["zero_optimization"].setdefault("memory_efficient_linear", False)
    if config.get("zero_optimization", {}).get("offload_optimizer"):
        config.setdefault("zero_force_ds_cpu_optimizer", False)  # bigan passes torch's Adam
    return config


class DynamicLossScale:
    """torch.amp.GradScaler's schedule for a ZeRO engine: halve on a skipped (non-finite) step,
    double after ``growth_interval`` finite steps in a row. One per engine, as G's and D's
    gradients live on different scales."""

    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 16, growth_interval: int = 2000):
        self.enabled, self.scale, self.growth_interval, self.good_steps = enabled, init_scale, growth_interval, 0

    def is_enabled(self) -> bool:
        return self.enabled

    def get_scale(self) -> float:
        return self.scale if self.enabled else 1.0

    def update(self, finite: bool):
        if not self.enabled:
            return
        if not finite:
            self.scale, self.good_steps = self.scale * 0.5, 0
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale, self.good_steps = self.scale * 2.0, 0

    def state_dict(self):
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state):
        self.scale, self.good_steps = state["scale"], state["good_steps"]


def reenter_autocast(module: torch.nn.Module, device: torch.device, dtype) -> torch.nn.Module:
    """Make module's forward run under bigan's autocast again inside ``engine.forward``.

    DeepSpeed's ``autocast_if_enabled`` disables an outer autocast around the module call (on
    CUDA; measured on an H200: D's fp32 weights then refused G's bf16 fakes). The forward is
    replaced on the instance, so parameter names, state dicts and checkpoints are unchanged,
    and ZeRO's module hooks still run around it. fp32 (dtype None) leaves the module as it is.
    """
    if dtype is None:
        return module
    forward = module.forward

    @functools.wraps(forward)
    def autocast_forward(*args, **kwargs):
        with autocast(device, dtype):
            return forward(*args, **kwargs)

    module.forward = autocast_forward
    return module


GATHER_CHUNK = 10_000_000  # parameters gathered at once to refresh a ZeRO-3 shadow (40 MB of fp32)


def _pairs(mine, theirs) -> list:
    """(copy's tensor, network's tensor) by name; a copy built from the template has exactly the network's
    names (tied weights listed under each of their names: to_empty unties them, and each gets its values)."""
    mine, theirs = dict(mine), dict(theirs)
    if mine.keys() != theirs.keys():
        raise RuntimeError(f"the template and the network differ in {sorted(mine.keys() ^ theirs.keys())[:5]}")
    return [(tensor, theirs[name]) for name, tensor in mine.items()]


def _chunks(pairs: list, limit: int):
    """(shadow, partitioned) parameter pairs in runs of at most `limit` elements (at least one pair each)."""
    chunk, size = [], 0
    for pair in pairs:
        numel = getattr(pair[1], "ds_numel", pair[1].numel())
        if chunk and size + numel > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(pair)
        size += numel
    if chunk:
        yield chunk


def _meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deepcopy of module whose parameters and buffers are meta tensors (no copy of the weights is made)."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in module.buffers()})
    return copy.deepcopy(module, memo)


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


class DeepSpeedBackend:
    """Same interface as PlainBackend, keyed by network name; each network is a DeepSpeed engine."""

    fused_adam = False  # the ZeRO optimizer checks for overflow itself (a host read inside engine.step)

    def __init__(self, accelerator, precision: str, configs: dict, channels_last: bool = False,
                 compile: bool = False, shadow: bool = True):
        """configs: network name -> its DeepSpeed config (ZeRO stages may differ per network). shadow: keep a
        whole copy of each ZeRO-3 network per rank for its no-grad forwards (see ``inference``)."""
        if precision == "fp16" and min(zero_stage(c) for c in configs.values()) == 0:
            raise DeepSpeedConfigError("train.precision=fp16 with DeepSpeed needs ZeRO stage 1, 2 or 3 "
                                       "(bigan's loss scaling goes through the ZeRO optimizer)")
        from bigan.backends import ds_build

        if accelerator.device.type == "cpu":  # only CPU runs JIT-build an op (DeepSpeed's shm communication)
            ds_build.prepare_builds()
            ds_build.clear_stale_locks()
        with ds_build.LockWatch():
            import deepspeed

            if not torch.distributed.is_initialized():
                deepspeed.init_distributed(dist_backend="gloo" if accelerator.device.type == "cpu" else "nccl")
        self.accelerator, self.device = accelerator, accelerator.device
        self.dtype = DTYPES[precision]
        # channels_last weights cannot survive ZeRO: stages 1-2 make every weight a contiguous view
        # of one flat buffer, stage 3 gathers them contiguous, and DeepSpeed's start-up broadcast
        # (p.data.view(torch.uint8)) refuses channels_last tensors. The weights stay contiguous.
        self.channels_last_ignored = channels_last
        self.compile_ignored = compile  # not tried inside ZeRO's module hooks
        self.configs = dict(configs)
        self.shadow = shadow
        self._shadows, self._stale = {}, {name: True for name in configs}
        self.scalers = {name: DynamicLossScale(enabled=precision == "fp16") for name in configs}

    def wrap(self, networks: dict):
        """networks: name -> (module, optimizer); one engine each, its checkpoint under the name's upper case."""
        import deepspeed

        from bigan.backends.ds_build import LockWatch

        self.names, self.engines = list(networks), {}
        for name, (model, optimizer) in networks.items():
            model = reenter_autocast(model.to(self.device), self.device, self.dtype)
            with LockWatch():  # the first engine builds DeepSpeed's communication op on CPUs
                self.engines[name], *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                              config=self.configs[name])

    def trained(self, name: str):
        return self.engines[name]

    def module(self, name: str):
        """The engine's module: forwards through it fire none of the engine's hooks."""
        return self.engines[name].module

    def penalty(self, name: str):
        return self.engines[name].module  # autograd.grad(create_graph=True) through the engine breaks ZeRO

    def optimizer(self, name: str):
        return self.engines[name].optimizer

    @contextlib.contextmanager
    def whole(self, name: str):
        """A phase's forwards and backwards with the network's weights gathered throughout, for a phase whose
        backward reaches them outside their modules' hooks: a second-order penalty (the path length) runs its
        backward through the graph of a gradient taken inside the forward, whose nodes belong to no module;
        ZeRO-3 gathers a module's weights again only in that module's own backward, and autograd would
        accumulate their gradients into released (empty) weights ("output with shape [0] doesn't match the
        broadcast shape"). ZeRO-3 releases a weight only when no submodule holds it (ds_active_sub_modules): this
        holds every weight for the phase, the forwards gather them as usual, the gradient hooks reduce-scatter
        as usual, and all are partitioned again at the end. Costs a whole copy of the network per rank for the
        phase's length (as the shadow does for G's no-grad forwards). ZeRO-1/2: nothing to do."""
        if not self.partitioned(name):
            yield
            return
        params = list(self.engines[name].module.parameters())
        if not all(hasattr(p, "ds_active_sub_modules") for p in params):
            raise RuntimeError("this DeepSpeed's ZeRO-3 weights have no ds_active_sub_modules, which bigan holds them "
                               "whole with (tested with deepspeed 0.19.8)")
        for p in params:
            p.ds_active_sub_modules.add(HOLD_ID)
        try:
            yield
        finally:
            for p in params:
                p.ds_active_sub_modules.discard(HOLD_ID)
            # every weight released (what stage3.step() also does at each step): ds_active_sub_modules cleared,
            # in-flight gathers waited for
            self.engines[name].optimizer.parameter_offload.partition_all_parameters()

    def begin_micro_batch(self, name: str):
        """What an engine's forward does first, for a micro-batch whose forwards skip the engine (a penalty
        through the inner module, `penalty`): DeepSpeed (0.19.8) ends the previous backward's gradient
        bookkeeping at the next engine forward (clear_backward_seen_flag): ZeRO-3 only then counts the
        micro-batch (micro_step_id), and a second micro-batch's gradient partition would overwrite the first's
        instead of adding to it; ZeRO-1/2 only then drop the last backward's grad_accum. Called before every
        micro-batch of every phase; twice in one micro-batch (here and in an engine forward) does it once."""
        optimizer = self.engines[name].optimizer
        if hasattr(optimizer, "clear_backward_seen_flag"):
            optimizer.clear_backward_seen_flag()

    def autocast(self):
        return autocast(self.device, self.dtype)

    def backward(self, loss, name: str, sync: bool = True):
        """The trainer already divides by the micro-batch count; DeepSpeed steps at the accumulation boundary."""
        engine = self.engines[name]
        if self.scalers[name].is_enabled():
            engine.optimizer.override_loss_scale(self.scalers[name].get_scale())
        engine.backward(loss, scale_wrt_gas=False)
        if not sync:  # not the last micro-batch: let the engine count it (it only steps at the boundary)
            engine.step()

    def step(self, name: str) -> torch.Tensor:
        engine = self.engines[name]
        engine.step()  # skips the update by itself when the global norm is not finite
        self._stale[name] = True
        norm = engine.get_global_grad_norm()
        # None means DeepSpeed did not compute a norm this step; that is not a non-finite step
        # (NaN here would make the trainer count it as bad and roll back again and again).
        norm = float(norm) if norm is not None else 0.0
        self.scalers[name].update(math.isfinite(norm))
        return torch.tensor(norm)

    def settling(self, name: str) -> bool:
        """Whether a non-finite step is fp16's loss scale still settling (not a bad step)."""
        scaler = self.scalers[name]
        return scaler.is_enabled() and scaler.get_scale() >= 1

    def describe(self) -> str:
        def one(name):
            zero = self.configs[name].get("zero_optimization", {})
            offload = [k.split("_")[1] for k in ("offload_optimizer", "offload_param")
                       if zero.get(k, {}).get("device", "none") != "none"]
            return f"ZeRO-{zero_stage(self.configs[name])}" + (f" (offload: {', '.join(offload)})" if offload else "")

        ignored = " (train.channels_last ignored: ZeRO keeps weights contiguous)" if self.channels_last_ignored else ""
        ignored += " (train.compile ignored: not supported inside DeepSpeed engines)" if self.compile_ignored else ""
        scaling = ", loss scale per engine" if self.dtype == torch.float16 else ""
        if not self.shadow and any(self.partitioned(n) for n in self.configs):
            ignored += (" (train.zero3_shadow=false: no whole copy of a ZeRO-3 network on any rank, but in a phase"
                        " with a second-order penalty, which holds its network whole)")
        engines = ", ".join(f"{name.upper()} {one(name)}" for name in self.configs)
        return f"DeepSpeed engines: {engines}; {NAMES[self.dtype]}{scaling}, fp32 weights{ignored}"

    def partitioned(self, name: str) -> bool:
        """Whether the network's weights are partitioned over the ranks (ZeRO-3)."""
        return zero_stage(self.configs[name]) == 3

    def inference(self, name: str) -> torch.nn.Module:
        """The network with its current weights, for forwards under no_grad (G in the D step).

        ZeRO-1/2: the engine's module itself. ZeRO-3: a full copy ("shadow"), refreshed by one
        gather after each optimizer step of that network (every rank calls this at the same points).
        Running G's own module in the D step would gather it layer by layer once more and, worse,
        break ZeRO-3's module trace: DeepSpeed records the submodule order of one forward (with
        its backward) and prefetches from it only while each forward repeats it, which a no_grad
        forward between G steps never does; every forward then re-records the trace and checks it
        across ranks (host syncs) and nothing is prefetched. The shadow shares the module's buffers
        (BatchNorm statistics, spectral-norm vectors; ZeRO-3 does not partition buffers), so it
        updates them exactly as the module would.

        With shadow=False (train.zero3_shadow=false) the partitioned module itself runs these forwards,
        layer by layer: no whole copy on any rank (4 bytes a parameter), at the cost of the trace above.

        D in the G step still runs D's own module: a shadow there was measured wrong (ZeRO-3 D
        with R1 and grad_accum 2 drifted by up to 57% from the plain path, inside DeepSpeed).
        """
        module = self.engines[name].module
        if not self.partitioned(name) or not self.shadow:
            return module
        if name not in self._shadows:
            self._shadows[name] = copy.deepcopy(self._template[name]).to_empty(device=self.device)
        shadow = self._shadows[name]
        if self._stale[name]:
            self._fill(shadow, module, name)
            for key, buffer in module.named_buffers():  # shared, not copied (again: a load may replace them)
                owner, _, leaf = key.rpartition(".")
                shadow.get_submodule(owner)._buffers[leaf] = buffer
            for mine, theirs in zip(shadow.modules(), module.modules()):
                mine.training = theirs.training
            self._stale[name] = False
        return shadow

    def _fill(self, target, module: torch.nn.Module, name: str):
        """target's parameters take a ZeRO-3 module's whole weights, gathered a chunk at a time (no second
        whole copy in flight; every rank calls this). target None: this rank takes part and keeps nothing."""
        import deepspeed

        mine = (self._template[name] if target is None else target).named_parameters(remove_duplicate=False)
        pairs = _pairs(mine, module.named_parameters(remove_duplicate=False))
        for chunk in _chunks(pairs, GATHER_CHUNK):
            gathered = list({id(theirs): theirs for _, theirs in chunk}.values())  # (a tied weight once)
            with deepspeed.zero.GatheredParameters(gathered, modifier_rank=None), torch.no_grad():
                if target is not None:
                    for mine, theirs in chunk:
                        mine.copy_(theirs)

    @contextlib.contextmanager
    def gathered(self, name: str):
        """The full weights of a network, on every rank (a collective under ZeRO-3), to read only."""
        if not self.partitioned(name) or self.shadow:
            yield self.inference(name)
            return
        import deepspeed

        module = self.engines[name].module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield module

    def plain_copy(self, name: str, everywhere: bool = True):
        """A full, unpartitioned copy of a network (every rank must call this); everywhere=False: on the main
        process only (None elsewhere), for what only it uses (grids, the export)."""
        module = self.engines[name].module
        if not everywhere and not self.accelerator.is_main_process:
            if self.partitioned(name):
                self._fill(None, module, name)
            return None
        with torch.no_grad():
            plain = copy.deepcopy(self._template[name]).to_empty(device=self.device)
            if self.partitioned(name):
                self._fill(plain, module, name)
            else:
                for mine, theirs in _pairs(plain.named_parameters(remove_duplicate=False),
                                           module.named_parameters(remove_duplicate=False)):
                    mine.copy_(theirs)
            for mine, theirs in _pairs(plain.named_buffers(), module.named_buffers()):  # (non-persistent ones too)
                mine.copy_(theirs)
        return plain

    def ema_partitioned(self, name: str) -> bool:
        """Whether the network's EMA is partitioned (PartitionedEMA, from ``ema``) rather than a whole copy
        made before wrapping (bigan.ema.EMA): ZeRO-3, unless its weights are offloaded to NVMe, where a
        partition is not always in memory, or with ZeRO++'s quantized weights."""
        zero = self.configs[name].get("zero_optimization", {})
        quantized = zero.get("zero_quantized_weights") or zero.get("zero_quantized_nontrainable_weights")
        return (self.partitioned(name) and zero.get("offload_param", {}).get("device", "none") != "nvme"
                and not quantized)  # (ZeRO++ may keep a partition in int8)

    def ema(self, name: str, half_life_kimg: float, rampup: float):
        """The EMA of a network whose EMA is partitioned (ema_partitioned), built after wrap()."""
        return PartitionedEMA(self.engines[name].module, self._template[name], half_life_kimg, rampup, self.device)

    def remember_architecture(self, networks: dict):
        """The networks' structure with no storage (meta tensors), taken before ZeRO-3 partitions them, for
        plain_copy, the shadows and the EMA's copies: a CPU copy of the weights would cost every rank a whole
        model of memory."""
        self._template = {name: _meta_copy(module) for name, module in networks.items()}

    def check_resumable_world(self, saved: int, now: int):
        """ZeRO checkpoints hold one partition of each optimizer (stage 3: of the weights too) per process."""
        if saved != now:
            raise DeepSpeedConfigError(f"this DeepSpeed checkpoint holds ZeRO partitions of {saved} processes and this "
                                       f"run has {now}: resume it with {saved} (DeepSpeed's universal checkpoints, "
                                       f"ds_to_universal.py, can re-partition it)")

    def save(self, directory: Path):
        for name, engine in self.engines.items():
            engine.save_checkpoint(str(directory), tag=name.upper(), save_latest=False)

    def load(self, directory: Path):
        for name, engine in self.engines.items():
            engine.load_checkpoint(str(directory), tag=name.upper())
            self._stale[name] = True

    def state_dict(self):
        return {k: s.state_dict() for k, s in self.scalers.items()}

    def load_state_dict(self, state):
        for k, s in self.scalers.items():
            if k in state:  # checkpoints from before fp16 support hold no scales
                s.load_state_dict(state[k])


class PartitionedEMA(EMA):
    """bigan.ema.EMA of a ZeRO-3 network, partitioned as the network is: each rank averages its own
    partition of every weight (``param.ds_tensor``, which the ZeRO optimizer updates), so the EMA costs a rank
    4/W bytes a parameter instead of 4, and its update needs no gather. Buffers (BatchNorm statistics,
    spectral-norm vectors; not partitioned) are the network's own, as the whole EMA copies them after each
    update. ``whole()`` (grids, evaluation, export) and ``state_dict()`` (checkpoints: the same whole state
    dict as EMA's, so bigan-sample and resumes on any backend read it) gather it, one parameter at a time;
    every rank calls them."""

    partitioned = True

    def __init__(self, module: torch.nn.Module, template: torch.nn.Module, half_life_kimg: float, rampup: float,
                 device):
        self.half_life_kimg, self.rampup = half_life_kimg, rampup
        self.module, self.template, self.device = module, template, device
        self.params = list(module.parameters())  # (a tied weight once)
        self.index = {id(p): i for i, p in enumerate(self.params)}  # a parameter -> its place in params, shards
        self.shards = [p.ds_tensor.detach().clone() for p in self.params]
        self.version, self._prepared = 0, None  # (updates and loads so far; a state gathered by before_save)

    @property
    def model(self):
        raise AttributeError("a PartitionedEMA has no whole model on any rank; whole() gathers one (every rank)")

    @torch.no_grad()
    def update(self, model, images_seen: int, batch_images: int):
        """model: unused (the network's partitions are read directly: nothing is gathered)."""
        self.version += 1
        torch._foreach_lerp_(self.shards, [p.ds_tensor for p in self.params], 1 - self.beta(images_seen, batch_images))

    def _gathered(self, i: int) -> torch.Tensor:
        """The whole value of parameter i's EMA (a collective over its partition group)."""
        import torch.distributed as dist

        p, shard = self.params[i], self.shards[i]
        group = p.ds_process_group
        # on the training device: with offload_param to the CPU the shards live there, and NCCL takes device
        # tensors only (DeepSpeed's own gathers move the partitions too)
        whole = torch.empty(shard.numel() * dist.get_world_size(group=group), dtype=shard.dtype, device=self.device)
        dist.all_gather(list(whole.chunk(dist.get_world_size(group=group))), shard.to(self.device), group=group)
        return whole[:p.ds_numel].view(p.ds_shape)

    @torch.no_grad()
    def whole(self, everywhere: bool = True):
        """A whole copy of the EMA network in eval mode, on every rank (everywhere=False: on the main process
        only, None elsewhere); every rank must call this."""
        import torch.distributed as dist

        if not everywhere and dist.get_rank() != 0:
            for i in range(len(self.params)):
                self._gathered(i)  # (the collectives alone)
            return None
        plain = copy.deepcopy(self.template).to_empty(device=self.device)
        mine = dict(plain.named_parameters(remove_duplicate=False))
        names = [[] for _ in self.params]  # parameter i's names in the copy (a tied weight has several)
        for name, theirs in self.module.named_parameters(remove_duplicate=False):
            names[self.index[id(theirs)]].append(name)
        for i, tied in enumerate(names):  # one parameter gathered at a time, in the order every rank gathers
            value = self._gathered(i)
            for name in tied:
                mine[name].copy_(value)
            del value
        for mine, buffer in _pairs(plain.named_buffers(), self.module.named_buffers()):
            mine.copy_(buffer)
        return plain.eval().requires_grad_(False)

    @torch.no_grad()
    def before_save(self):
        """Gather the checkpoint's state now, every rank, before Accelerate's save_state asks for it: then
        save_state runs no collective of the EMA's, and a rank that fails writing there leaves no other rank
        waiting in one (bigan.checkpoint.save agrees on failures after it)."""
        self._prepared = self.version, self._gathered_state()

    def state_dict(self) -> dict:
        """EMA's whole state dict (as bigan.ema.EMA writes it), on the main process; {} elsewhere. Every rank
        calls it (Accelerate's save_state does); unless before_save gathered it since the last update, the
        gathers are collectives."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[0] == self.version:  # (the same on every rank)
            return prepared[1]
        return self._gathered_state()

    def _gathered_state(self) -> dict:
        import torch.distributed as dist

        main = dist.get_rank() == 0
        state, done = {}, {}
        for key, tensor in self.module.state_dict(keep_vars=True).items():
            if id(tensor) in self.index:
                i = self.index[id(tensor)]
                if i not in done:  # (every rank gathers: a collective; the main process keeps it)
                    value = self._gathered(i)
                    done[i] = value.to("cpu", copy=True) if main else None
                value = done[i]
            else:
                value = tensor.detach().to("cpu", copy=True) if main else None
            if main:
                state[key] = value
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict):
        """Each rank takes its partition of a whole EMA state dict (written by EMA or PartitionedEMA, with any
        number of processes); its buffers are the network's, restored with the network."""
        import torch.distributed as dist

        mine = self.module.state_dict(keep_vars=True)
        unknown = sorted(set(state) - set(mine))
        if unknown:
            raise KeyError(f"EMA state holds {len(unknown)} keys the network lacks, e.g. {unknown[0]}")
        self.version += 1
        for key, tensor in mine.items():
            if id(tensor) not in self.index:
                continue
            i = self.index[id(tensor)]
            p, shard = self.params[i], self.shards[i]
            if key not in state:
                raise KeyError(f"EMA state lacks {key}")
            if state[key].numel() != p.ds_numel:
                raise ValueError(f"EMA state's {key} has {state[key].numel()} elements, the network's {p.ds_numel}")
            flat = state[key].reshape(-1).to(shard.dtype)
            start = dist.get_rank(group=p.ds_process_group) * shard.numel()
            part = flat[start:start + shard.numel()]
            shard.zero_()
            shard[:part.numel()].copy_(part)
