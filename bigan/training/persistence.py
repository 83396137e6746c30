"""Checkpoints of a run: resume (exact, or on a new layout), save, roll back, keep the best, export."""
from __future__ import annotations

import json
import shutil

from bigan import checkpoint, seeding
from bigan.training.ranks import on_rank_zero


class DivergedError(Exception):
    """Training produced non-finite steps with no checkpoint (or no roll-back) left to return to."""


class Persistence:
    def __init__(self, trainer):
        self.t = trainer  # the orchestrator's parts: accelerator, run dir, family, backend, state, stream
        self.rolled_back = 0  # roll-backs of this invocation (a resume after lowering lr starts anew)
        self.current = []     # checkpoints holding the state as it is now (resumed from, written since)

    def _rank_zero(self, decide):
        return on_rank_zero(self.t.accelerator, decide)

    def resume(self) -> tuple:
        """(the checkpoint resumed from or None, this rank's stream position or None, notes to print)."""
        t, c = self.t, self.t.config
        resume_from, notes = self._rank_zero(lambda: checkpoint.resolve(t.run_dir, c.run.resume))
        if not resume_from:
            return None, None, notes
        self.current = [resume_from]
        wanted = {name: net.settings() for name, net in t.networks.items()}
        saved_layout = self._rank_zero(lambda: checkpoint.data_layout(resume_from))
        elastic = self._changed_layout(saved_layout)
        t.backend.check_resumable_world(saved_layout["world_size"], t.accelerator.num_processes)
        data_state = checkpoint.load(t.accelerator, resume_from, t.backend, t.family.architecture(), data=not elastic,
                                     defaults=t.family.architecture_defaults)
        if t.state.seed != c.train.seed:
            raise checkpoint.CheckpointError(f"{resume_from} was trained with train.seed={t.state.seed} "
                                             f"(now {c.train.seed}); resume with that seed or start a new run.dir")
        if elastic:
            notes.append(self._restart_stream(elastic))
        return resume_from, data_state, notes + self._apply_optimizer_settings(wanted)

    def _changed_layout(self, saved: dict) -> list[str]:
        """What changed since the checkpoint in how the stream is split (processes, workers), if anything;
        refused where the stream cannot restart (epoch mode) or must not (batch size, mode)."""
        c = self.t.config
        names = {"world_size": "processes", "workers": "data.workers", "batch_size": "train.batch_size",
                 "mode": "data.mode"}
        now = {"world_size": self.t.accelerator.num_processes, "workers": max(c.data.workers, 1),
               "batch_size": c.train.batch_size, "mode": c.data.mode}
        changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        shown = {k: f"{names[k]} {a} -> {b}" for k, (a, b) in changed.items()}
        fixed = [shown[k] for k in changed if k in ("batch_size", "mode")]
        if fixed or (changed and c.data.mode == "epoch"):
            raise checkpoint.CheckpointError(
                "cannot continue the data stream: " + ", ".join(fixed or shown.values()) + " since the checkpoint"
                + ("" if fixed else " (data.mode=epoch splits each epoch by processes and workers; resume with "
                                    "those, or use data.mode=infinite)"))
        return list(shown.values())

    def _restart_stream(self, changed: list[str]) -> str:
        """An elastic resume: new stream and draw seeds, the same on no rank as before (infinite mode
        samples shards with replacement per round, so nothing is lost)."""
        t = self.t
        t.state.stream_seed = seeding.rank_seed(t.config.train.seed, 0, seeding.ELASTIC, t.state.images_seen) % 2**31
        seeding.seed_rank(t.config.train.seed, t.accelerator.process_index, seeding.ELASTIC, t.state.images_seen)
        return (f"resuming on a new layout ({', '.join(changed)}): images seen, models, optimizers and EMA are "
                f"restored; the data stream restarts from new per-rank seeds")

    def _apply_optimizer_settings(self, wanted: dict) -> list[str]:
        """After a resume, the optimizer settings of this command line replace the checkpoint's (which
        load_state restored with the optimizer state); a line naming what changed, if anything."""
        changes = []
        for name, groups in wanted.items():
            optimizer = self.t.backend.optimizer(name)
            for key in ("lr", "betas", "eps"):
                had = {tuple(g[key]) if isinstance(g[key], (list, tuple)) else g[key] for g in optimizer.param_groups}
                if had != {g[key] for g in groups}:
                    changes.append(f"{name.upper()} {key} {_shown(had)} -> {_shown({g[key] for g in groups})}")
                for group, want in zip(optimizer.param_groups, groups):
                    group[key] = want[key]
        return [f"optimizer settings from this command line, not the checkpoint's: {'; '.join(changes)}"] if changes else []

    def save(self):
        t = self.t
        t.steps.sync_counters()
        position = t.loader_position or t.loader.state_dict()
        path = checkpoint.save(t.accelerator, t.run_dir, t.state.step, t.config.run.ckpt_limit, position, t.backend,
                               t.family.architecture(), t.checkpointed, self.current)
        self.current = [path]
        return path

    def roll_back(self):
        """Back to the last checkpoint after train.max_bad_steps non-finite iterations in a row, on a new
        course: weights, optimizers, EMA and counters as they were, but the data stream goes on past the
        batches that diverged and every rank draws new latents (an exact replay would diverge again at
        the same step). The optimizer settings of this command line apply again (load_state restored the
        checkpoint's). At most train.max_rollbacks times per invocation."""
        t, train = self.t, self.t.config.train
        latest, _ = self._rank_zero(lambda: checkpoint.resolve(t.run_dir, "latest"))
        if latest is None:
            raise DivergedError(f"training diverged: {t.state.bad_in_row} non-finite iterations in a row before "
                                f"the first checkpoint; lower train.g_lr/d_lr or set train.grad_clip")
        if self.rolled_back >= train.max_rollbacks:
            raise DivergedError(f"training diverged again after {self.rolled_back} roll-back(s) "
                                f"(train.max_rollbacks={train.max_rollbacks}); lower train.g_lr/d_lr or set "
                                f"train.grad_clip, and resume from {latest}")
        if t.accelerator.is_main_process:
            print(f"bigan: {t.state.bad_in_row} non-finite steps in a row; rolling back to {latest} "
                  f"(roll-back {self.rolled_back + 1} of at most {train.max_rollbacks}): the stream goes on "
                  f"past the batches that diverged, and new latents are drawn", flush=True)
        kept = (t.state.skipped, t.state.rollbacks + 1, t.state.stream_seed)
        checkpoint.load(t.accelerator, latest, t.backend, t.family.architecture(), data=False,
                        defaults=t.family.architecture_defaults)
        self.current = []  # the stream went on: no checkpoint holds this state
        self._apply_optimizer_settings({name: net.settings() for name, net in t.networks.items()})
        self.rolled_back += 1
        t.state.skipped, t.state.rollbacks, t.state.stream_seed = kept  # (rollbacks: all of the run's, a seed salt)
        t.state.bad_in_row = 0
        seeding.seed_rank(train.seed, t.accelerator.process_index, seeding.ROLLBACK, t.state.rollbacks)
        t.steps.nonfinite.reset()

    def keep_best(self, results: dict):
        """Copy this step's checkpoint to RUN/best/ (outside rotation), with its metrics."""
        t = self.t
        path = self.save()
        if t.accelerator.is_main_process:
            best, tmp = t.run_dir / "best", t.run_dir / ".tmp-best"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(path, tmp)
            (tmp / "metrics.json").write_text(json.dumps({**results, "step": t.state.step,
                                                           "images_seen": t.state.images_seen}, indent=1))
            shutil.rmtree(best, ignore_errors=True)
            tmp.rename(best)
        t.accelerator.wait_for_everyone()

    def export(self):
        """The generator and its EMA as safetensors, with what bigan-sample rebuilds them from."""
        t = self.t
        name = t.family.generator
        meta = {"resolution": t.config.data.resolution, "images_seen": t.state.images_seen, "step": t.state.step,
                "architecture": t.family.architecture()}
        # one whole copy at a time, on the main process (every rank takes part in ZeRO-3's gathers)
        g = t.backend.plain_copy(name, everywhere=False)
        if t.accelerator.is_main_process:
            checkpoint.export_generator(t.run_dir / "export", g, None, t.config.to_dict()["model"], meta)
        g = None
        if name in t.emas:
            g_ema = t.emas[name].whole(everywhere=False)
            if t.accelerator.is_main_process:
                checkpoint.export_generator(t.run_dir / "export", None, g_ema, t.config.to_dict()["model"], meta)


def _shown(values: set) -> str:
    """A set of optimizer values as the user typed them: one value, or all of them."""
    shown = [str(list(v)) if isinstance(v, tuple) else f"{v:g}" for v in sorted(values)]
    return shown[0] if len(shown) == 1 else "{" + ", ".join(shown) + "}"
