"""What a run tells its user: scalars to TensorBoard every run.log_every iterations, the progress bar,
a warning when it waits for data, sample grids, and the closing line."""
from __future__ import annotations

import time

import torch

from bigan.tracking import Tracker, memory_gib


class Logs:
    def __init__(self, accelerator, family, state, tracker: Tracker):
        from tqdm import tqdm

        self.accelerator, self.family, self.state, self.tracker = accelerator, family, state, tracker
        self.config = family.config
        self.total_images = int(self.config.train.kimg * 1000)
        self.progress = tqdm(total=self.total_images, initial=state.images_seen, unit="img", unit_scale=True,
                             disable=not (accelerator.is_main_process and self.config.run.progress),
                             dynamic_ncols=True)
        self.last = (time.perf_counter(), state.images_seen, state.step)
        self.start = self.last[:2]  # for the closing line's mean rate
        self.last_input_warning = -1e9
        self.rates_lost = 0  # images a roll-back took back, for the closing line's rate

    def restart(self):
        """After a roll-back: rates measured from here (step and images seen went back)."""
        self.rates_lost += self.last[1] - self.state.images_seen
        self.last = (time.perf_counter(), self.state.images_seen, self.state.step)

    def log(self, steps, loader, backend):
        """The interval's stat means over all ranks, the ranks' corrupt samples (summed) and data waits
        (mean), in one all-reduce; then TensorBoard and the progress bar."""
        steps.sync_counters()
        now, seen, step = time.perf_counter(), self.state.images_seen, self.state.step
        elapsed, iterations = max(now - self.last[0], 1e-9), max(step - self.last[2], 1)
        world = self.accelerator.num_processes
        per_rank = {"Progress/corrupt_samples": loader.corrupt_samples, "Progress/data_wait_s": steps.data_wait}
        values = steps.stats.means(per_rank, self._sum_over_ranks if world > 1 else None, world)
        data_wait = values.pop("Progress/data_wait_s") / world
        values.update({
            "Progress/kimg": seen / 1000, "Progress/img_per_s": (seen - self.last[1]) / elapsed,
            "Progress/iteration_ms": elapsed / iterations * 1e3, "Progress/data_wait_ms": data_wait / iterations * 1e3,
            "Progress/step_share": 1 - min(data_wait / elapsed, 1.0), "Progress/skipped_steps": self.state.skipped,
            **{f"LR/{name.upper()}": backend.optimizer(name).param_groups[0]["lr"] for name in backend.names},
            "Memory/peak_gib": memory_gib(self.accelerator.device),
        })
        self.tracker.scalars(values, seen)
        self.progress.update(seen - self.progress.n)
        self.progress.set_postfix({"D": f"{values.get('Loss/D', 0):.3f}", "G": f"{values.get('Loss/G', 0):.3f}",
                                   "img/s": f"{values['Progress/img_per_s']:.0f}",
                                   "data": f"{1 - values['Progress/step_share']:.0%}"}, refresh=False)
        self._warn_if_input_bound(values["Progress/step_share"], now)
        self.last, steps.data_wait = (now, seen, step), 0.0

    def _sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(values.to(self.accelerator.device), "sum")

    def _warn_if_input_bound(self, step_share: float, now: float):
        """Say so (at most every 10 minutes) when this process spends most of its time waiting for data."""
        if step_share >= 0.5 or now - self.last_input_warning < 600 or not self.accelerator.is_main_process:
            return
        self.last_input_warning = now
        print(f"bigan: warning: {1 - step_share:.0%} of each iteration waits for data (input-bound); "
              f"raise data.workers (now {self.config.data.workers}) if this machine has idle cores", flush=True)

    @torch.no_grad()
    def images(self, backend, emas: dict, grid_inputs):
        """Sample grids of the generator and its EMA (every rank calls this: a collective under ZeRO-3)."""
        name = self.family.generator
        copies = ((f"samples/{name.upper()}", lambda: backend.plain_copy(name, everywhere=False)),
                  (f"samples/{name.upper()}_ema", (lambda: emas[name].whole(everywhere=False)) if name in emas else None))
        for tag, whole in copies:  # one whole copy at a time, on the main process (ZeRO-3 gathers each afresh)
            model = None  # (the last one's dropped first)
            if whole is None:
                continue
            model = whole()  # every rank: a collective under ZeRO-3
            if not self.accelerator.is_main_process:
                continue
            was_training = model.training
            model.eval()
            with backend.autocast():
                images, columns = self.family.grid(model, grid_inputs)
            model.train(was_training)
            self.tracker.images(tag, images, self.state.images_seen, columns)

    def evaluation(self, scalars: dict):
        self.tracker.scalars({f"Metrics/{k}": v for k, v in scalars.items()}, self.state.images_seen)
        if self.accelerator.is_main_process:  # in the job's log too (Slurm's output file, a pipe), beside any bar
            from tqdm import tqdm

            shown = ", ".join(f"{k} {v:.4g}" for k, v in scalars.items())
            tqdm.write(f"bigan: evaluation at {self.state.images_seen / 1000:.1f} kimg: {shown}")

    def close(self, stopped: bool, export_dir):
        self.progress.close()
        self.tracker.close()
        if self.accelerator.is_main_process:
            state = "stopped on request (signal or STOP file)" if stopped else "done"
            seconds = max(time.perf_counter() - self.start[0], 1e-9)
            rate = (self.state.images_seen + self.rates_lost - self.start[1]) / seconds
            print(f"bigan: {state} at {self.state.images_seen / 1000:.1f} kimg after {seconds:.0f} s of training "
                  f"({rate:.0f} img/s, evaluation and checkpoints included); generator in {export_dir}")

