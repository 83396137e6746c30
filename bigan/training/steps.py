"""One training iteration: the family's phases in order, each one optimizer step of one network.

    for phase in family.phases (due this iteration, `repeat` times):
        for each of train.grad_accum micro-batches:   loss, stats = phase.loss(step, real)
                                                        backward(loss / k)      (sync on the last)
        step(phase.trains); count a non-finite step on the device
    EMA of the family's EMA networks

Every real batch of the iteration is taken from the stream first, so a stop that interrupts the
wait finds nothing half-done. Nothing here reads the device from the host (bigan.step_stats).
"""
from __future__ import annotations

import contextlib
import time

import torch

from bigan.models.layers import update_spectral_norms
from bigan.step_stats import NonFiniteSteps, StepStats


class StepContext:
    """What a phase's loss runs its networks through, and how many times the phase has stepped."""

    def __init__(self, backend, phase, count: int, accelerator):
        self.backend, self.phase, self.count = backend, phase, count
        self.accelerator, self.device = accelerator, accelerator.device

    def mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a device tensor over all ranks (a collective: every rank's phase calls it alike)."""
        return self.accelerator.reduce(value, "mean") if self.accelerator.num_processes > 1 else value

    def sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(value, "sum") if self.accelerator.num_processes > 1 else value

    def train(self, name: str):
        """The network this phase trains, as its backend wraps it (DDP, a ZeRO engine)."""
        return self.backend.trained(name)

    def frozen(self, name: str):
        """A network in phase.frozen: gradients flow through it, none into it, none of its hooks fire."""
        return self.backend.module(name)

    def fixed(self, name: str):
        """Another network with its current weights, for forwards under no_grad."""
        return self.backend.inference(name)

    def penalty(self, name: str):
        """The trained network as gradient penalties (double backward) differentiate through it."""
        return self.backend.penalty(name)


class Steps:
    def __init__(self, family, backend, state, emas: dict, accelerator):
        self.family, self.backend, self.state, self.emas = family, backend, state, emas
        self.phases = family.phases
        self.accelerator, self.device = accelerator, accelerator.device
        self.grad_accum = family.config.train.grad_accum
        self.micro_batch_images = family.config.train.batch_size * accelerator.num_processes
        self.stats = StepStats()
        self.nonfinite = NonFiniteSteps(self.device, state.bad_in_row)
        self.data_wait = 0.0  # seconds this process waited for batches since the last log step
        self.stops = None     # a StopAgreement, told when this process waits for data

    def due(self) -> list:
        return [p for p in self.phases if self.state.step % p.every == 0]

    def batches_per_iteration(self) -> int:
        """Real micro-batches an iteration takes from the stream (more than one: a stop that interrupts
        the wait must put those already taken back)."""
        return sum(p.repeat for p in self.due() if p.reals == "new") * self.grad_accum

    def iteration(self, batches):
        due = self.due()
        groups = [[self._next_batch(batches) for _ in range(self.grad_accum)]
                  for p in due for _ in range(p.repeat) if p.reals == "new"]
        last, taken = None, iter(groups)
        for phase in due:
            for _ in range(phase.repeat):
                reals = next(taken) if phase.reals == "new" else last if phase.reals == "last" else None
                self.run(phase, reals)
                last = reals if reals is not None else last
        self.state.step += 1
        self.nonfinite.end_iteration()
        self._update_emas(sum(self.micro_batch_images * p.repeat * self.grad_accum for p in due if p.reals == "new"))

    def run(self, phase, reals: list | None):
        """One optimizer step of phase.trains over its micro-batches (gradients averaged)."""
        b = self.backend
        count = self.state.phase_steps.get(phase.name, 0)
        step = StepContext(b, phase, count, self.accelerator)
        update_spectral_norms(b.module(phase.trains))  # one power iteration per optimizer step
        for name in phase.frozen:
            b.module(name).requires_grad_(False)
        micro = reals if reals is not None else [None] * self.grad_accum
        with b.whole(phase.trains) if phase.whole else contextlib.nullcontext():
            for i, real in enumerate(micro):
                b.begin_micro_batch(phase.trains)  # (a phase's forwards may all skip the engine: penalty)
                with b.autocast():
                    loss, stats = phase.loss(step, real)
                b.backward(loss / len(micro), phase.trains, sync=i == len(micro) - 1)
                self.stats.add(stats, 1 / len(micro))
                if phase.reals == "new":
                    self.state.images_seen += self.micro_batch_images
        for name in phase.frozen:
            b.module(name).requires_grad_(True)
        grad_norm = torch.as_tensor(b.step(phase.trains), device=self.device)
        self.stats.add({f"GradNorm/{phase.trains.upper()}": grad_norm})
        self.nonfinite.step(grad_norm, b.settling(phase.trains))
        self.state.phase_steps[phase.name] = count + 1
        if phase.after is not None:
            phase.after(step)

    def _update_emas(self, batch_images: int):
        for name, ema in self.emas.items():
            if ema.partitioned:  # (ZeRO-3: each rank averages its own partition, nothing gathered)
                ema.update(None, self.state.images_seen, batch_images)
                continue
            with self.backend.gathered(name) as module:
                ema.update(module, self.state.images_seen, batch_images)

    def _next_batch(self, batches):
        start = time.perf_counter()
        if self.stops is not None:
            self.stops.waiting_for_data = True
        try:
            batch = next(batches)
        finally:
            if self.stops is not None:
                self.stops.waiting_for_data = False
        self.data_wait += time.perf_counter() - start
        return batch

    def sync_counters(self):
        """Bring the non-finite-step counters from the device into the state (one host read)."""
        skipped, self.state.bad_in_row = self.nonfinite.read()
        self.state.skipped += skipped
