"""What the loop counts between log steps, kept on the device so that the host never waits for it.

Losses, logits and gradient norms, and the counts of non-finite steps, stay device tensors
until a log step (or a checkpoint) reads them all at once: a host read in every step would
make the host wait for the device there, and a small model, whose kernels take less time than
Python takes to queue them, would then run at the speed of the two added together.
"""
from __future__ import annotations

import torch


class StepStats:
    """Means over a log interval of per-step scalars; nothing is computed until ``means()``."""

    def __init__(self):
        self.values: dict[str, list] = {}

    def add(self, stats: dict, weight: float = 1.0):
        """One micro-batch's stats, counted as ``weight`` of a step (1 / number of micro-batches)."""
        for key, value in stats.items():
            self.values.setdefault(key, []).append((value, weight))

    def means(self, totals: dict | None = None, sum_over_ranks=None, ranks: int = 1) -> dict[str, float]:
        """The weighted mean of each key since the last call, then reset; with `sum_over_ranks` (an
        all-reduce sum; every rank calls this at the same step, with the same keys) the mean over the
        `ranks` ranks, and `totals` (numbers of this rank) summed over them. One collective and one
        host read for all."""
        keys, means = list(self.values), []
        for key in keys:
            values = torch.stack([torch.as_tensor(v).float().reshape(()) for v, _ in self.values[key]])
            weights = torch.tensor([w for _, w in self.values[key]], device=values.device)
            means.append((values * weights).sum() / weights.sum())
        self.values = {}
        totals = totals or {}
        devices = {m.device for m in means}
        device = next(iter(devices)) if len(devices) == 1 else torch.device("cpu")
        vector = torch.cat([torch.stack([m.to(device) for m in means]) if means else torch.zeros(0, device=device),
                            torch.tensor([float(v) for v in totals.values()], device=device)])
        if not len(vector):
            return {}
        if sum_over_ranks is not None:
            vector = sum_over_ranks(vector)
            vector[:len(means)] /= ranks
        return dict(zip(keys + list(totals), vector.tolist()))


class NonFiniteSteps:
    """Optimizer steps skipped as non-finite, and the current run of bad iterations, on the device.

    An iteration is bad when one of its steps was not finite, unless fp16's loss scale was
    still settling (halving from its start value is expected, not a divergence).
    """

    def __init__(self, device, bad_in_row: int = 0):
        self.device = device
        self.reset(bad_in_row)

    def reset(self, bad_in_row: int = 0):
        """Counting from here on (after a resume or a roll-back), with this many bad iterations in a row."""
        self.skipped = torch.zeros((), dtype=torch.int64, device=self.device)
        self.bad_in_row = torch.tensor(bad_in_row, dtype=torch.int64, device=self.device)
        self.iteration_bad = torch.zeros((), dtype=torch.bool, device=self.device)

    def step(self, grad_norm: torch.Tensor, settling):
        """After an optimizer step; ``settling`` is a bool or a device bool tensor."""
        nonfinite = ~torch.isfinite(grad_norm)
        self.skipped += nonfinite
        if isinstance(settling, torch.Tensor):
            self.iteration_bad |= nonfinite & ~settling
        elif not settling:
            self.iteration_bad |= nonfinite

    def end_iteration(self):
        self.bad_in_row = torch.where(self.iteration_bad, self.bad_in_row + 1, 0)
        self.iteration_bad.zero_()

    def read(self) -> tuple[int, int]:
        """(steps skipped since the last read, bad iterations in a row now): one host read."""
        skipped, bad_in_row = torch.stack([self.skipped, self.bad_in_row]).tolist()
        self.skipped.zero_()
        return skipped, bad_in_row
