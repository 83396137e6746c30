"""The training loop, counted in images: a family's phases, then logs, grids, checkpoints, evaluation.

    trainer = Trainer(config, accelerator)      # the family's networks, wrapped by the backend
    trainer.fit():
        resume or start; build the stream
        while images seen < train.kimg and no stop is agreed:
            steps.iteration(batches)             # every phase due: one optimizer step of one network
            log / roll back / grids / checkpoint / evaluate, each when due
        checkpoint, export

What a GAN step is belongs to the family (bigan.families); wrapping, precision and stepping to the
backend (bigan.backends); each other concern to its module in bigan.training.
"""
from __future__ import annotations

import functools
import socket
from pathlib import Path

import torch

from bigan import families, seeding
from bigan.backends import make_backend
from bigan.backends.precision import cpu_note
from bigan.config import Config
from bigan.ema import EMA
from bigan.tracking import Tracker
from bigan.training.data import build_loader
from bigan.training.evaluation import Evaluation, scalars
from bigan.training.logs import Logs
from bigan.training.persistence import DivergedError, Persistence  # noqa: F401 (DivergedError: bigan.train)
from bigan.training.ranks import together
from bigan.training.steps import Steps
from bigan.training.stops import STOP_FILE, StopAgreement, StopWhileWaiting


class TrainState:
    """Counters kept in every checkpoint."""

    def __init__(self, seed: int = 0):
        self.step = self.images_seen = self.skipped = self.bad_in_row = self.rollbacks = 0
        self.phase_steps = {}  # phase name -> optimizer steps so far (lazy regularization counts these)
        self.best_fid = float("inf")
        self.seed = self.stream_seed = seed  # train.seed, and the data stream's (new after an elastic resume)

    def state_dict(self):
        return {**vars(self), "phase_steps": dict(self.phase_steps)}

    def load_state_dict(self, state):
        state = dict(state)
        if "d_steps" in state:  # checkpoints from before phases counted D steps alone
            state.setdefault("phase_steps", {"D": state.pop("d_steps")})
        vars(self).update(state)


class Trainer:
    def __init__(self, config: Config, accelerator, family=None):
        """family: a bigan.families.base.Family instance to train instead of the one model.arch names."""
        self.config, self.accelerator = config, accelerator
        self.run_dir = Path(config.run.dir)
        t = config.train
        self.family = family or families.build(config)
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.networks = self.family.networks()
        self.backend = make_backend(config, accelerator, list(self.networks))
        adam = functools.partial(torch.optim.Adam, fused=self.backend.fused_adam or None)
        optimizers = {name: adam(net.param_groups(), betas=tuple(net.betas), eps=net.eps)
                      for name, net in self.networks.items()}
        # EMA and the backend's templates copy the networks before wrapping, while their weights are whole
        # (ZeRO-3 partitions them, and the EMA with them: the backend builds that one after wrapping)
        ema_names = [name for name in self.family.ema if t.ema_kimg > 0]
        whole = {name: EMA(self.networks[name].module, t.ema_kimg, t.ema_rampup) for name in ema_names
                 if not self.backend.ema_partitioned(name)}
        self.backend.remember_architecture({name: net.module for name, net in self.networks.items()})
        self.backend.wrap({name: (net.module, optimizers[name]) for name, net in self.networks.items()})
        self.emas = {name: whole[name] if name in whole else self.backend.ema(name, t.ema_kimg, t.ema_rampup)
                     for name in ema_names}
        seeding.seed_rank(t.seed, accelerator.process_index, seeding.FRESH)  # weights agree; from here, draws differ
        self.family.to(accelerator.device)
        for ema in self.emas.values():
            if not ema.partitioned:
                ema.model.to(accelerator.device)
        self.state = TrainState(t.seed)
        # registered in this order with Accelerate (custom_checkpoint_N.pkl) and named in checkpoint.json
        self.checkpointed = {"train": self.state, "backend": self.backend,
                             **{"ema" if name == self.family.generator else f"ema.{name}": ema for name, ema in self.emas.items()},
                             **{f"family.{name}": obj for name, obj in self.family.state().items()}}
        for obj in self.checkpointed.values():
            accelerator.register_for_checkpointing(obj)
        self.device = accelerator.device
        self.steps = Steps(self.family, self.backend, self.state, self.emas, accelerator)
        self.stops = StopAgreement(accelerator, self.run_dir)
        self.steps.stops = self.stops
        self.persistence = Persistence(self)
        self.loader_position = None  # the stream's position to save when a stop interrupted a wait

    def train_step(self, batches):
        """One iteration of the family's phases (what the benchmarks time)."""
        self.steps.iteration(batches)

    def fit(self):
        batches = self._start()
        try:
            self._loop(batches)
            self.persistence.save()
            self.persistence.export()
        finally:  # also on errors: the workers ignore SIGTERM, so they are stopped here
            self.loader.close()
        if self.accelerator.is_main_process and self.stops.agreed:  # deleting it tells slurm/train.sh the stop
            (self.run_dir / STOP_FILE).unlink(missing_ok=True)            # was honoured
        self.logs.close(self.stops.agreed, self.run_dir / "export")

    def _start(self):
        """Resume (if asked), the loader, the evaluation's networks, the run folder, trackers and signal
        handlers; the batch iterator. Nothing is written into the run folder before all of it stands."""
        c = self.config
        resume_from, data_state, notes = self.persistence.resume()
        self.steps.nonfinite.reset(self.state.bad_in_row)

        def prepare():  # what may fail on one rank alone (a file a node cannot see): every rank stops then
            self.loader = build_loader(self.family, self.accelerator, data_state, self.state.stream_seed)
            self.evaluation = Evaluation(self.family, self.accelerator)
            self.grid_inputs = self.family.grid_inputs(self.device) if self.accelerator.is_main_process else None

        together(self.accelerator, prepare)
        if self.accelerator.is_main_process:  # only now: a refused command leaves the run folder as it was
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(c.to_yaml())
        self.logs = Logs(self.accelerator, self.family, self.state, Tracker(self.accelerator, self.run_dir, c.to_yaml()))
        self.stops.install_handlers()
        print(f"bigan: rank {self.accelerator.process_index}/{self.accelerator.num_processes} on "
              f"{socket.gethostname()}, device {self.device}", flush=True)
        if self.accelerator.is_main_process:
            where = f"resuming from {resume_from} with the settings in {self.run_dir / 'config.yaml'}" if resume_from \
                else "starting fresh" + (f" (run.resume=latest: no checkpoint in {self.run_dir / 'checkpoints'})"
                                         if c.run.resume == "latest" else "")
            print(f"bigan: {self.backend.describe()}", flush=True)
            if c.loss.pack > 1:
                print(f"bigan: D judges packs of {c.loss.pack} samples (PacGAN; loss.pack=1 turns it off)", flush=True)
            precision = cpu_note(self.device, c.train.precision)
            for note in [*([precision] if precision else []), *self.family.notes(), *notes]:
                print(f"bigan: {note}", flush=True)
            print(f"bigan: {where}; run dir {self.run_dir}: TensorBoard logs in {self.run_dir / 'logs'}, "
                  f"checkpoints in {self.run_dir / 'checkpoints'}, samples in {self.run_dir / 'samples'}", flush=True)
        return iter(self.loader)

    def _loop(self, batches):
        c, total = self.config, int(self.config.train.kimg * 1000)
        self.steps.data_wait = 0.0
        self._reset_marks()
        while self.state.images_seen < total and not self.stops.check(self.state.step + 1):
            # a stop that interrupts a wait for data puts back the batches this iteration already took;
            # with one batch per iteration none was taken, and nothing is copied per step
            position = self.loader.state_dict() if self.steps.batches_per_iteration() > 1 else None
            try:
                self.train_step(batches)
            except StopWhileWaiting:  # nothing of this iteration ran; its batches go back to the stream
                self.stops.agreed, self.loader_position = True, position
                return
            if self.state.step % c.run.log_every == 0:
                self.logs.log(self.steps, self.loader, self.backend)
                if self.state.bad_in_row >= c.train.max_bad_steps:  # counted on the device, read at log steps
                    self.persistence.roll_back()  # (step and images seen go back: so do the marks)
                    self._reset_marks()
                    self.stops.restart()
                    self.logs.restart()
            self._maybe_images_and_save()
            self._maybe_evaluate()

    def _next_mark(self, every_kimg: float) -> int:
        every = max(int(every_kimg * 1000), 1)
        return (self.state.images_seen // every + 1) * every

    def _reset_marks(self):
        self.next_images = self._next_mark(self.config.run.image_every_kimg)
        self.next_save = self._next_mark(self.config.run.ckpt_every_kimg)
        self.next_eval = self._next_mark(self.config.eval.every_kimg) if self.config.eval.every_kimg > 0 else None

    def _maybe_images_and_save(self):
        if self.state.images_seen >= self.next_images or self.state.step == 1:
            self.logs.images(self.backend, self.emas, self.grid_inputs)
            self.next_images = self._next_mark(self.config.run.image_every_kimg)
        # no periodic checkpoint in a run of non-finite steps: a roll-back should land before it
        if self.state.images_seen >= self.next_save:
            self.steps.sync_counters()
            if self.state.bad_in_row == 0:
                self.persistence.save()
                self.next_save = self._next_mark(self.config.run.ckpt_every_kimg)

    def _maybe_evaluate(self):
        if self.next_eval is None or self.state.images_seen < self.next_eval:
            return
        self.next_eval = self._next_mark(self.config.eval.every_kimg)
        from bigan.metrics.features import ExtractorError

        name = self.family.generator
        try:  # EMA-G, else G (a full copy on every rank)
            results = self.evaluation.run(self.emas[name].whole() if name in self.emas else self.backend.plain_copy(name))
        except ExtractorError:  # (raised on every rank alike) the training so far is kept before stopping
            self.persistence.save()
            raise
        self.logs.evaluation(scalars(results))
        if "fid" in results and results["fid"] < self.state.best_fid:
            self.state.best_fid = results["fid"]
            self.persistence.keep_best(results)
