"""The training loop: D steps, a G step, EMA, logs, samples and checkpoints, counted in images.

    while not done:
        d_step(real micro-batches) x d_steps     # G frozen, bare; D trained, synced
        g_step(latent micro-batches)             # D frozen, bare; G trained, synced
        ema.update(); maybe_log(); maybe_images(); maybe_save()

G is called as G(input, condition) and D as D(image, condition). A noise model's input is a
latent and its condition a class label (or None); a paired model (pix2pix) takes the batch's
input images as both, and its G step also pulls G's output towards the batch's targets (L1).

Wrapping, precision and stepping belong to the backend (bigan.backends); this file only
says what a GAN step is.
"""
from __future__ import annotations

import functools
import json
import shutil
import signal
import socket
import time
from pathlib import Path

import torch

from bigan import checkpoint, losses, seeding
from bigan.backends import make_backend
from bigan.config import Config
from bigan.data.stream import DataError, Loader, StreamSpec, resolve_shards
from bigan.ema import EMA
from bigan.models import build_models, init_weights
from bigan.models.layers import update_spectral_norms
from bigan.step_stats import NonFiniteSteps, StepStats
from bigan.tracking import Tracker, memory_gib
from bigan.training.ranks import on_rank_zero
from bigan.training.stops import STOP_FILE, StopAgreement, StopWhileWaiting


class DivergedError(Exception):
    """Training produced non-finite steps with no checkpoint to roll back to."""


class TrainState:
    """Counters kept in every checkpoint."""

    def __init__(self, seed: int = 0):
        self.step = self.images_seen = self.d_steps = self.skipped = self.bad_in_row = self.rollbacks = 0
        self.best_fid = float("inf")
        self.seed = self.stream_seed = seed  # train.seed, and the data stream's (new after an elastic resume)

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        vars(self).update(state)


def data_source(config: Config, accelerator, held_out: bool = False) -> str:
    """data.shards (held_out: eval.data, else data.shards), with 'demo' rendered on first use (by rank 0;
    the others then find it): landscapes, or layout -> painting pairs for model.arch=pix2pix, whose
    held-out set is drawn with other seeds."""
    shards = (config.eval.data or config.data.shards) if held_out else config.data.shards
    if shards != "demo":
        return shards
    from bigan.data.demo import HELD_OUT_SEED, ensure_demo_shards

    paired = config.model.arch == "pix2pix"
    n, seed = (512, HELD_OUT_SEED) if paired and held_out else (config.data.demo_images, 0)
    with accelerator.main_process_first():
        return str(ensure_demo_shards(n, config.data.resolution, seed, progress=accelerator.is_main_process,
                                      paired=paired))


def build_loader(config: Config, accelerator, start: dict | None = None, seed: int | None = None) -> Loader:
    """This rank's loader, continuing from `start` (a checkpoint's position) with the stream seed `seed`
    (default train.seed)."""
    shard_set = resolve_shards(data_source(config, accelerator))
    paired = config.model.arch == "pix2pix"
    if paired and shard_set.paired is False:
        raise DataError(f"data.shards: model.arch=pix2pix trains on pairs, and {config.data.shards} holds single "
                        f"images; write pairs with bigan-shards TARGETS OUT --src-dir INPUTS")
    if config.model.num_classes and shard_set.labels is not None and len(shard_set.labels) != config.model.num_classes:
        raise DataError(f"model.num_classes={config.model.num_classes} but the shards have "
                        f"{len(shard_set.labels)} labels")
    if config.model.num_classes and shard_set.counts is not None and shard_set.labels is None:
        raise DataError(f"model.num_classes={config.model.num_classes} but the shards' manifest names no "
                        f"labels (write them with bigan-shards --labels-from-dirs or --label-column)")
    spec = StreamSpec(shard_set, config.train.batch_size, config.data.resolution, rank=accelerator.process_index,
                      world_size=accelerator.num_processes, seed=config.train.seed if seed is None else seed,
                      mode=config.data.mode,
                      shuffle_buffer=config.data.shuffle_buffer, shard_mix=config.data.shard_mix, flip=config.data.flip,
                      crop_scale=None if config.data.crop_scale_min >= 1 else (config.data.crop_scale_min, 1.0),
                      start=start or {}, paired=paired)
    return Loader(spec, workers=config.data.workers, device=accelerator.device)


class Trainer:
    def __init__(self, config: Config, accelerator, backend=None, models=None):
        """models: (G, D) to train instead of those config.model names (called as G(z, y), D(x, y))."""
        self.config, self.accelerator = config, accelerator
        self.run_dir = Path(config.run.dir)
        m, t, loss = config.model, config.train, config.loss
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        if models is None:
            g, d = build_models(m.arch, config.data.resolution, m.z_dim, m.g_channels, m.d_channels,
                                m.num_classes, m.d_norm, loss.pack, m.norm, m.dropout, m.g_upsample)
            if m.arch in ("dcgan", "pix2pix"):
                g.apply(init_weights), d.apply(init_weights)
        else:
            g, d = models
        self.backend = backend or make_backend(config, accelerator)
        d_lr, d_betas = losses.lazy_adam(t.d_lr, t.d_betas, loss.r1_interval if loss.r1 > 0 else 1)
        adam = functools.partial(torch.optim.Adam, eps=t.adam_eps, fused=self.backend.fused_adam or None)
        opt_g, opt_d = adam(g.parameters(), t.g_lr, betas=tuple(t.g_betas)), adam(d.parameters(), d_lr, betas=d_betas)
        # EMA and the backend's templates copy G before wrapping, while its weights are whole (ZeRO-3 partitions them)
        self.ema = EMA(g, t.ema_kimg, t.ema_rampup) if t.ema_kimg > 0 else None
        self.backend.remember_architecture(g, d)
        self.backend.wrap(g, d, opt_g, opt_d)
        seeding.seed_rank(t.seed, accelerator.process_index, seeding.FRESH)  # weights agree; from here, draws differ
        if self.ema is not None:
            self.ema.model.to(accelerator.device)
        self.state = TrainState(t.seed)
        self.checkpointed = {"train": self.state, "backend": self.backend, "ema": self.ema}  # named in checkpoint.json
        self.checkpointed = {name: obj for name, obj in self.checkpointed.items() if obj is not None}
        for obj in self.checkpointed.values():
            accelerator.register_for_checkpointing(obj)
        self.device = accelerator.device
        self.micro_batch_images = t.batch_size * accelerator.num_processes
        self.total_images = int(t.kimg * 1000)
        self.stops = StopAgreement(accelerator, self.run_dir)
        self.stats = StepStats()
        self.nonfinite = NonFiniteSteps(self.device)
        self.data_wait = 0.0  # seconds this process waited for batches since the last log step
        self.loader_position = None  # the stream's position to save when a stop interrupted a wait
        self.paired = m.arch == "pix2pix"
        generator = torch.Generator().manual_seed(t.seed)
        self.grid_z = torch.randn(config.run.grid_size, m.z_dim, generator=generator).to(self.device)
        self.grid_y = (torch.arange(config.run.grid_size) % max(m.num_classes, 1)).to(self.device) if m.num_classes else None
        self.grid_pairs = None  # pix2pix: (inputs, targets) of fixed held-out pairs, read at start

    # ------------------------------------------------------------ one GAN step

    def sample_z(self, n: int):
        z = torch.randn(n, self.config.model.z_dim, device=self.device)
        y = torch.randint(self.config.model.num_classes, (n,), device=self.device) if self.config.model.num_classes else None
        return z, y

    def g_inputs(self, batch: dict) -> tuple:
        """(G's input, condition) for generating a micro-batch like `batch`: a fresh latent and class,
        or, for pix2pix, the batch's input images as both."""
        if self.paired:
            return batch["source"], batch["source"]
        return self.sample_z(len(batch["image"]))

    def d_step(self, reals: list[dict], latents: list[tuple]):
        """One D optimizer step over micro-batches of reals and (G input, condition) pairs (gradients averaged)."""
        b, c = self.backend, self.config.loss
        regularize = c.r1 > 0 and self.state.d_steps % c.r1_interval == 0
        update_spectral_norms(b.d_module)
        for i, (real, (z, y_fake)) in enumerate(zip(reals, latents)):
            with torch.no_grad(), b.autocast():
                fake = b.frozen("g")(z, y_fake)  # bare G: no gradient, no DDP sync
            image = real["image"].detach().requires_grad_(True) if regularize else real["image"]
            condition = real["source"] if self.paired else real["label"]
            with b.autocast():
                real_logits = (b.d_penalty if regularize else b.d)(image, condition)
                fake_logits = b.d(fake, y_fake)
                loss, stats = losses.d_loss(c.name, real_logits, fake_logits, c.r)
                if regularize:
                    r1, r1_stats = losses.r1_penalty(image, real_logits, c.pack)
                    loss, stats = loss + (c.r1 / 2 * c.r1_interval) * r1, {**stats, **r1_stats}
                if c.name == "wgan" and c.gp > 0:
                    gp, gp_stats = losses.gradient_penalty(b.d_penalty, image, fake, condition, pack=c.pack)
                    loss, stats = loss + c.gp * gp, {**stats, **gp_stats}
            b.backward(loss / len(reals), "d", sync=i == len(reals) - 1)
            self._collect(stats, len(reals))
            self.state.images_seen += self.micro_batch_images
        self._after_step("d", b.step("d"))
        self.state.d_steps += 1

    def g_step(self, latents: list[tuple], targets: list | None = None):
        """One G optimizer step through a frozen, bare D (D gets no gradients and fires no hooks);
        with targets (pix2pix), plus loss.l1 times the L1 distance of G's output to them."""
        b = self.backend
        update_spectral_norms(b.g_module)
        b.d_module.requires_grad_(False)
        for i, (z, y) in enumerate(latents):
            with b.autocast():
                fake = b.g(z, y)
                loss, stats = losses.g_loss(self.config.loss.name, b.d_module(fake, y))
                if targets is not None:
                    l1, l1_stats = losses.l1_term(fake, targets[i])
                    loss, stats = loss + self.config.loss.l1 * l1, {**stats, **l1_stats}
            b.backward(loss / len(latents), "g", sync=i == len(latents) - 1)
            self._collect(stats, len(latents))
        b.d_module.requires_grad_(True)
        self._after_step("g", b.step("g"))

    def train_step(self, batches):
        t = self.config.train
        # every batch of the iteration first: a stop that interrupts the wait finds nothing half-done
        d_batches = [[self._next_batch(batches) for _ in range(t.grad_accum)] for _ in range(self.config.loss.d_steps)]
        for reals in d_batches:
            self.d_step(reals, [self.g_inputs(r) for r in reals])
        if self.paired:  # G learns from the same pairs D just saw, as in pix2pix
            self.g_step([self.g_inputs(r) for r in d_batches[-1]], [r["image"] for r in d_batches[-1]])
        else:
            self.g_step([self.sample_z(t.batch_size) for _ in range(t.grad_accum)])
        self.state.step += 1
        self.nonfinite.end_iteration()
        if self.ema is not None:
            batch_images = self.micro_batch_images * t.grad_accum * self.config.loss.d_steps
            with self.backend.gathered("g") as g:
                self.ema.update(g, self.state.images_seen, batch_images)

    def _next_batch(self, batches):
        start = time.perf_counter()
        self.stops.waiting_for_data = True
        try:
            batch = next(batches)
        finally:
            self.stops.waiting_for_data = False
        self.data_wait += time.perf_counter() - start
        return batch

    def _collect(self, stats: dict, parts: int = 1):
        """Add one micro-batch's stats (1/parts of a step) to the means logged at the next log step."""
        self.stats.add(stats, 1 / parts)

    def _after_step(self, which: str, grad_norm):
        """Count a skipped (non-finite) step, on the device (read at log steps and before saving)."""
        grad_norm = torch.as_tensor(grad_norm, device=self.device)
        self._collect({f"GradNorm/{which.upper()}": grad_norm})
        self.nonfinite.step(grad_norm, self.backend.settling(which))

    def sync_counters(self):
        """Bring the non-finite-step counters from the device into the state (one host read)."""
        skipped, self.state.bad_in_row = self.nonfinite.read()
        self.state.skipped += skipped

    # ------------------------------------------------------------ the loop

    def fit(self):
        batches = self._start()
        try:
            progress = self._progress()
            self._loop(batches, progress)
            self.save()
            self.export()
            progress.close()
        finally:  # also on errors: the workers ignore SIGTERM, so they are stopped here
            self.loader.close()
        self.tracker.close()
        if self.accelerator.is_main_process:
            if self.stops.agreed:  # deleting it tells slurm/train.sh the stop was honoured
                (self.run_dir / STOP_FILE).unlink(missing_ok=True)
            state = "stopped on request (signal or STOP file)" if self.stops.agreed else "done"
            seconds = max(time.perf_counter() - self._loop_start[0], 1e-9)
            rate = (self.state.images_seen - self._loop_start[1]) / seconds
            print(f"bigan: {state} at {self.state.images_seen / 1000:.1f} kimg after {seconds:.0f} s of training "
                  f"({rate:.0f} img/s, evaluation and checkpoints included); generator in {self.run_dir / 'export'}")

    def _start(self):
        """Resume (if asked), build the loader, trackers and signal handlers; the batch iterator."""
        c = self.config
        resume_from, notes = self._on_rank_zero(lambda: checkpoint.resolve(self.run_dir, c.run.resume))
        data_state = None
        if resume_from:
            wanted = self._optimizer_settings()
            saved_layout = self._on_rank_zero(lambda: checkpoint.data_layout(resume_from))
            elastic = self._changed_layout(saved_layout)
            self.backend.check_resumable_world(saved_layout["world_size"], self.accelerator.num_processes)
            data_state = checkpoint.load(self.accelerator, resume_from, self.backend, self.architecture(),
                                         data=not elastic)
            if self.state.seed != c.train.seed:
                raise checkpoint.CheckpointError(f"{resume_from} was trained with train.seed={self.state.seed} "
                                                 f"(now {c.train.seed}); resume with that seed or start a new run.dir")
            if elastic:
                notes.append(self._restart_stream(saved_layout, elastic))
                data_state = None
            notes += self._apply_optimizer_settings(wanted)
        self.nonfinite = NonFiniteSteps(self.device, self.state.bad_in_row)
        self.loader = build_loader(c, self.accelerator, data_state, self.state.stream_seed)
        self.extractor = self.classifier = None
        if c.eval.every_kimg > 0:  # fail now, not hours in, if the feature extractor is missing
            from bigan.metrics.features import Extractor, ModeClassifier

            if set(self.eval_metrics()) - {"l1", "psnr"}:
                self.extractor = Extractor(c.eval.extractor, self.device, c.eval.inception or None, c.data.resolution)
            if c.eval.modes:
                self.classifier = ModeClassifier(c.eval.modes, self.device, c.data.resolution)
        if self.paired and self.accelerator.is_main_process:  # grids of input | output | target
            from bigan.metrics.evaluate import held_out_pairs

            self.grid_pairs = held_out_pairs(data_source(c, self.accelerator, held_out=True), c.data.resolution,
                                             min(c.run.grid_size, 16), self.device)
        if self.accelerator.is_main_process:  # only now: a refused command leaves the run folder as it was
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(c.to_yaml())
        self.tracker = Tracker(self.accelerator, self.run_dir, c.to_yaml())
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
            for note in notes:
                print(f"bigan: {note}", flush=True)
            print(f"bigan: {where}; run dir {self.run_dir}: TensorBoard logs in {self.run_dir / 'logs'}, "
                  f"checkpoints in {self.run_dir / 'checkpoints'}, samples in {self.run_dir / 'samples'}", flush=True)
        return iter(self.loader)

    def _on_rank_zero(self, decide):
        return on_rank_zero(self.accelerator, decide)

    def _changed_layout(self, saved: dict) -> list[str]:
        """What changed since the checkpoint in how the stream is split (processes, workers), if anything;
        refused where the stream cannot restart (epoch mode) or must not (batch size, mode)."""
        c = self.config
        names = {"world_size": "processes", "workers": "data.workers", "batch_size": "train.batch_size",
                 "mode": "data.mode"}
        now = {"world_size": self.accelerator.num_processes, "workers": max(c.data.workers, 1),
               "batch_size": c.train.batch_size, "mode": c.data.mode}
        changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        fixed = [f"{names[k]} {a} -> {b}" for k, (a, b) in changed.items() if k in ("batch_size", "mode")]
        if fixed or (changed and c.data.mode == "epoch"):
            raise checkpoint.CheckpointError(
                "cannot continue the data stream: " + ", ".join(fixed or [f"{names[k]} {a} -> {b}" for k, (a, b)
                                                                          in changed.items()])
                + " since the checkpoint" + ("" if fixed else " (data.mode=epoch splits each epoch by processes and "
                                                              "workers; resume with those, or use data.mode=infinite)"))
        return [f"{names[k]} {a} -> {b}" for k, (a, b) in changed.items()]

    def _restart_stream(self, saved: dict, changed: list[str]) -> str:
        """An elastic resume: new stream and draw seeds, the same on no rank as before (infinite mode
        samples shards with replacement per round, so nothing is lost)."""
        self.state.stream_seed = seeding.rank_seed(self.config.train.seed, 0, seeding.ELASTIC,
                                                   self.state.images_seen) % 2**31
        seeding.seed_rank(self.config.train.seed, self.accelerator.process_index, seeding.ELASTIC,
                          self.state.images_seen)
        return (f"resuming on a new layout ({', '.join(changed)}): images seen, models, optimizers and EMA are "
                f"restored; the data stream restarts from new per-rank seeds")

    def _optimizer_settings(self) -> dict:
        """What each optimizer's parameter groups should hold now: learning rate, betas, eps from train.*
        (D's with the lazy-R1 correction)."""
        t, loss = self.config.train, self.config.loss
        d_lr, d_betas = losses.lazy_adam(t.d_lr, t.d_betas, loss.r1_interval if loss.r1 > 0 else 1)
        return {"G": {"lr": t.g_lr, "betas": tuple(t.g_betas), "eps": t.adam_eps},
                "D": {"lr": d_lr, "betas": tuple(d_betas), "eps": t.adam_eps}}

    def _apply_optimizer_settings(self, wanted: dict) -> list[str]:
        """After a resume, the optimizer settings of this command line replace the checkpoint's (which
        load_state restored with the optimizer state); returns a line naming what changed, if anything."""
        changes = []
        for name, optimizer in (("G", self.backend.opt_g), ("D", self.backend.opt_d)):
            for key, value in wanted[name].items():
                had = {tuple(g[key]) if isinstance(g[key], (list, tuple)) else g[key] for g in optimizer.param_groups}
                if had != {value}:
                    changes.append(f"{name} {key} {_shown(had)} -> {_shown({value})}")
                for group in optimizer.param_groups:
                    group[key] = value
        return [f"optimizer settings from this command line, not the checkpoint's: {'; '.join(changes)}"] if changes else []

    def _loop(self, batches, progress):
        c = self.config
        self._last_log, self._last_input_warning = (time.perf_counter(), self.state.images_seen, self.state.step), -1e9
        self._loop_start = self._last_log[:2]  # for the closing line's mean rate
        self.data_wait = 0.0
        self._reset_marks()
        # A stop that interrupts a wait for data leaves the batches this iteration already took to be
        # saved as untaken; with one batch per iteration none was taken, and nothing is copied per step.
        several = self.config.train.grad_accum * self.config.loss.d_steps > 1
        while self.state.images_seen < self.total_images and not self.stops.check(self.state.step + 1):
            position = self.loader.state_dict() if several else None
            try:
                self.train_step(batches)
            except StopWhileWaiting:  # nothing of this iteration ran; its batches go back to the stream
                self.stops.agreed, self.loader_position = True, position
                return
            if self.state.step % c.run.log_every == 0:
                self._log(progress)
                if self.state.bad_in_row >= c.train.max_bad_steps:  # counted on the device, read at log steps
                    self._roll_back()
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
            self.write_images()
            self.next_images = self._next_mark(self.config.run.image_every_kimg)
        # no periodic checkpoint in a run of non-finite steps: a roll-back should land before it
        if self.state.images_seen >= self.next_save:
            self.sync_counters()
            if self.state.bad_in_row == 0:
                self.save()
                self.next_save = self._next_mark(self.config.run.ckpt_every_kimg)

    def _maybe_evaluate(self):
        if self.next_eval is None or self.state.images_seen < self.next_eval:
            return
        self.next_eval = self._next_mark(self.config.eval.every_kimg)
        from bigan.metrics.features import ExtractorError

        try:
            results = self.evaluate()
        except ExtractorError:  # (raised on every rank alike) the training so far is kept before stopping
            self.save()
            raise
        scalars = {k: float(v) for k, v in results.items()
                   if isinstance(v, (int, float)) and k not in ("n", "n_ref", "modes_of")}
        self.tracker.scalars({f"Metrics/{k}": v for k, v in scalars.items()}, self.state.images_seen)
        if self.accelerator.is_main_process:  # in the job's log too (Slurm's output file, a pipe), beside any bar
            from tqdm import tqdm

            shown = ", ".join(f"{k} {v:.4g}" for k, v in scalars.items())
            tqdm.write(f"bigan: evaluation at {self.state.images_seen / 1000:.1f} kimg: {shown}")
        if "fid" in results and results["fid"] < self.state.best_fid:
            self.state.best_fid = results["fid"]
            self._keep_best(results)

    def evaluate(self) -> dict:
        """Metrics of EMA-G (else G) against eval.data, and its mode coverage under eval.modes; for
        pix2pix, on held-out pairs. On every rank (each generates its share)."""
        from bigan.metrics.evaluate import evaluate, evaluate_pairs, generated_images

        e, m = self.config.eval, self.config.model
        g = self.ema.model if self.ema is not None else self.backend.plain_copy("g")
        was_training = g.training
        g.eval()
        wanted = self.eval_metrics()
        # in fp32 (no autocast), as bigan-eval: the loop's scores and bigan-eval's are the same numbers,
        # and the cached reference statistics (computed in fp32) fit both
        if self.paired:  # on held-out pairs: eval.data, or the demo's held-out set
            results = evaluate_pairs(g, data_source(self.config, self.accelerator, held_out=True),
                                     self.config.data.resolution, self.extractor, self.accelerator, e.n, wanted)
        else:
            blocks = generated_images(g, m.z_dim, m.num_classes, self.accelerator, e.n, self.config.train.seed)
            results = evaluate(blocks, data_source(self.config, self.accelerator, held_out=True) if wanted else None,
                               self.config.data.resolution, self.extractor, self.accelerator, e.n, wanted,
                               classifier=self.classifier)
        g.train(was_training)
        return results

    def eval_metrics(self) -> list[str]:
        return [m.strip() for m in self.config.eval.metrics.split(",") if m.strip()]

    def _keep_best(self, results: dict):
        """Copy this step's checkpoint to RUN/best/ (outside rotation), with its metrics."""
        path = self.save()
        if self.accelerator.is_main_process:
            best, tmp = self.run_dir / "best", self.run_dir / ".tmp-best"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(path, tmp)
            (tmp / "metrics.json").write_text(json.dumps({**results, "step": self.state.step,
                                                           "images_seen": self.state.images_seen}, indent=1))
            shutil.rmtree(best, ignore_errors=True)
            tmp.rename(best)
        self.accelerator.wait_for_everyone()

    def _progress(self):
        from tqdm import tqdm

        return tqdm(total=self.total_images, initial=self.state.images_seen, unit="img", unit_scale=True,
                    disable=not (self.accelerator.is_main_process and self.config.run.progress), dynamic_ncols=True)

    def _log(self, progress):
        """Host-side logging every log_every steps: the means of the interval's stats over all ranks, and
        the ranks' corrupt samples (summed) and data waits (mean), in one all-reduce."""
        self.sync_counters()
        now, seen, step = time.perf_counter(), self.state.images_seen, self.state.step
        elapsed, steps = max(now - self._last_log[0], 1e-9), max(step - self._last_log[2], 1)
        world = self.accelerator.num_processes
        per_rank = {"Progress/corrupt_samples": self.loader.corrupt_samples, "Progress/data_wait_s": self.data_wait}
        values = self.stats.means(per_rank, self._sum_over_ranks if world > 1 else None, world)
        data_wait = values.pop("Progress/data_wait_s") / world
        values.update({
            "Progress/kimg": seen / 1000, "Progress/img_per_s": (seen - self._last_log[1]) / elapsed,
            "Progress/iteration_ms": elapsed / steps * 1e3, "Progress/data_wait_ms": data_wait / steps * 1e3,
            "Progress/step_share": 1 - min(data_wait / elapsed, 1.0),
            "Progress/skipped_steps": self.state.skipped,
            "LR/G": self.backend.opt_g.param_groups[0]["lr"], "LR/D": self.backend.opt_d.param_groups[0]["lr"],
            "Memory/peak_gib": memory_gib(self.device),
        })
        self.tracker.scalars(values, seen)
        progress.update(seen - progress.n)
        progress.set_postfix({"D": f"{values.get('Loss/D', 0):.3f}", "G": f"{values.get('Loss/G', 0):.3f}",
                              "img/s": f"{values['Progress/img_per_s']:.0f}",
                              "data": f"{1 - values['Progress/step_share']:.0%}"}, refresh=False)
        self._warn_if_input_bound(values["Progress/step_share"], now)
        self._last_log, self.data_wait = (now, seen, step), 0.0

    def _sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(values.to(self.device), "sum")

    def _warn_if_input_bound(self, step_share: float, now: float):
        """Say so (at most every 10 minutes) when this process spends most of its time waiting for data."""
        if step_share >= 0.5 or now - self._last_input_warning < 600 or not self.accelerator.is_main_process:
            return
        self._last_input_warning = now
        print(f"bigan: warning: {1 - step_share:.0%} of each iteration waits for data (input-bound); "
              f"raise data.workers (now {self.config.data.workers}) if this machine has idle cores", flush=True)

    @torch.no_grad()
    def write_images(self):
        g = self.backend.plain_copy("g")  # every rank: a collective under ZeRO-3
        if not self.accelerator.is_main_process:
            return
        g.eval()
        with self.backend.autocast():
            for name, model in (("samples/G", g), ("samples/G_ema", self.ema.model if self.ema else None)):
                if model is None:
                    continue
                if self.paired:  # held-out pairs as input | output | target, two triplets per row
                    inputs, targets = self.grid_pairs
                    images, columns = torch.stack([inputs, model(inputs, inputs).float(), targets], 1).flatten(0, 1), 6
                else:
                    images, columns = model(self.grid_z, self.grid_y), None
                self.tracker.images(name, images, self.state.images_seen, columns)
        g.train()

    # ------------------------------------------------------------ persistence

    def save(self):
        self.sync_counters()
        position = self.loader_position or self.loader.state_dict()
        return checkpoint.save(self.accelerator, self.run_dir, self.state.step, self.config.run.ckpt_limit,
                               position, self.backend, self.architecture(), list(self.checkpointed))

    def architecture(self) -> dict:
        """What the weights' shapes depend on (kept in checkpoints, compared on resume)."""
        return {**{f"model.{k}": v for k, v in self.config.to_dict()["model"].items() if k != "sync_batchnorm"},
                "data.resolution": self.config.data.resolution, "loss.pack": self.config.loss.pack}

    def _roll_back(self):
        """Back to the last checkpoint after train.max_bad_steps non-finite iterations in a row, on a new
        course: weights, optimizers, EMA and counters as they were, but the data stream goes on past the
        batches that diverged and every rank draws new latents (an exact replay would diverge again at
        the same step). At most train.max_rollbacks times per run."""
        t = self.config.train
        latest, _ = self._on_rank_zero(lambda: checkpoint.resolve(self.run_dir, "latest"))
        if latest is None:
            raise DivergedError(f"training diverged: {self.state.bad_in_row} non-finite iterations in a row before "
                                f"the first checkpoint; lower train.g_lr/d_lr or set train.grad_clip")
        if self.state.rollbacks >= t.max_rollbacks:
            raise DivergedError(f"training diverged again after {self.state.rollbacks} roll-back(s) "
                                f"(train.max_rollbacks={t.max_rollbacks}); lower train.g_lr/d_lr or set "
                                f"train.grad_clip, and resume from {latest}")
        if self.accelerator.is_main_process:
            print(f"bigan: {self.state.bad_in_row} non-finite steps in a row; rolling back to {latest} "
                  f"(roll-back {self.state.rollbacks + 1} of at most {t.max_rollbacks}): the stream goes on "
                  f"past the batches that diverged, and new latents are drawn", flush=True)
        kept = (self.state.skipped, self.state.rollbacks + 1, self.state.stream_seed)
        checkpoint.load(self.accelerator, latest, self.backend, self.architecture(), data=False)
        self.state.skipped, self.state.rollbacks, self.state.stream_seed = kept
        self.state.bad_in_row = 0
        seeding.seed_rank(t.seed, self.accelerator.process_index, seeding.ROLLBACK, self.state.rollbacks)
        self.nonfinite = NonFiniteSteps(self.device)
        self._reset_marks()

    def export(self):
        g = self.backend.plain_copy("g")  # every rank: a collective under ZeRO-3
        if not self.accelerator.is_main_process:
            return
        meta = {"resolution": self.config.data.resolution, "images_seen": self.state.images_seen,
                "step": self.state.step}
        checkpoint.export_generator(self.run_dir / "export", g, self.ema.model if self.ema else None,
                                    self.config.to_dict()["model"], meta)


def _shown(values: set) -> str:
    """A set of optimizer values as the user typed them: one value, or all of them."""
    shown = [str(list(v)) if isinstance(v, tuple) else f"{v:g}" for v in sorted(values)]
    return shown[0] if len(shown) == 1 else "{" + ", ".join(shown) + "}"
