"""Stopping on request: signals and RUN_DIR/STOP, agreed by every rank on a wall-clock cadence.

SIGTERM or SIGUSR1 (Slurm's preemption, ``scancel`` and time-limit warnings, supervisors; to the
trainer alone or to its whole process group) and a first Ctrl-C ask this rank to stop after the
current step with a checkpoint; ``RUN_DIR/STOP`` (created by slurm/train.sh, or by hand) asks the
whole run. The ranks must stop at the same iteration, so they agree in one small all-reduce
every ``period_s`` seconds or so, whatever ``run.log_every`` is: at each agreement they also agree
on how many iterations make the next ``period_s`` seconds (from the slowest rank's pace), so that
every rank calls the all-reduce at the same iterations without reading the device in between.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

import torch

STOP_FILE = "STOP"  # created in the run dir (e.g. by slurm/train.sh on preemption): checkpoint and exit 0
PERIOD_S = 2.0      # how often the ranks agree on a stop: well inside Slurm's 120 s warning
MAX_ITERATIONS = 10_000  # between two agreements, however fast the iterations


class StopWhileWaiting(Exception):
    """A stop was requested while this process was blocked waiting for its next batch."""


class StopAgreement:
    """Whether to stop, the same answer on every rank at the same iteration."""

    def __init__(self, accelerator, run_dir: Path, period_s: float = PERIOD_S):
        self.accelerator, self.run_dir, self.period_s = accelerator, Path(run_dir), period_s
        self.signalled = False     # a signal reached this rank
        self.agreed = False        # all ranks have agreed to stop
        self.waiting_for_data = False  # set around each wait for a batch, for the signal handler
        self.restart()

    def restart(self):
        """Agree at the next check, and measure the pace from there (at start, after a roll-back: the
        time since start-up or the iteration number say nothing of how fast iterations go)."""
        self.next_check, self.last = 0, None

    def check(self, iteration: int) -> bool:
        """True once the ranks have agreed to stop; cheap between agreements (no collective, no host read)."""
        if self.signalled and self.accelerator.num_processes == 1:  # nobody to agree with: at once
            self.agreed = True
        if iteration < self.next_check or self.agreed:
            return self.agreed
        now = time.perf_counter()
        # seconds per iteration here; none yet at the first check, which then comes again at the next iteration
        pace = (now - self.last[0]) / max(iteration - self.last[1], 1) if self.last else 0.0
        asked = self.signalled or (self.accelerator.is_main_process and (self.run_dir / STOP_FILE).exists())
        if self.accelerator.num_processes > 1:  # one all-reduce: anyone asked, and the slowest pace
            flags = torch.tensor([float(asked), pace], device=self.accelerator.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            asked, pace = flags.tolist()
        self.agreed = bool(asked)
        ahead = int(self.period_s / pace) if pace > 0 else 1
        self.next_check = iteration + max(1, min(ahead, MAX_ITERATIONS))
        self.last = (now, iteration)
        return self.agreed

    def install_handlers(self):
        """SIGTERM/SIGUSR1 and a first Ctrl-C: finish the step, checkpoint, exit 0.

        Slurm and most supervisors signal the whole process group; the DataLoader workers ignore
        these signals (bigan.data.stream) and leave the shutdown to this process. A second Ctrl-C
        stops at once (KeyboardInterrupt). While a single process is blocked waiting for a batch,
        the stop takes effect at once too: the handler interrupts the wait (StopWhileWaiting); with
        several ranks the others would wait in a collective for this one, so it waits its turn.
        """
        def request_stop(signum, frame):
            if signum == signal.SIGINT:
                if self.signalled:
                    raise KeyboardInterrupt
                if self.accelerator.is_main_process:
                    print("\nbigan: stopping after this step with a checkpoint (Ctrl-C again to stop at once)",
                          flush=True)
            self.signalled = True
            if self.waiting_for_data and self.accelerator.num_processes == 1:
                raise StopWhileWaiting

        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, request_stop)
