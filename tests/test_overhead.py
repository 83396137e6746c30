"""What an iteration costs beyond the model: no host reads of the device, no per-step lookups.

On a GPU a small model's step is launch-bound: the host queues kernels faster than nothing
only while it never waits for the device. A host read (``.item()``, ``float()``, ``bool()``)
makes it wait, so the iteration then costs host time plus device time instead of the larger
of the two (bench/RESULTS.md, issue 15). These tests catch such reads on the CPU.
"""
import importlib.metadata
import sys

import pytest
import torch
from accelerate import Accelerator

from bigan.config import load_config
from bigan.trainer import Trainer
from conftest import HELPERS, run, tiny_args

@pytest.mark.parametrize("extra", [
    {"train.precision": "no"},
    {"train.precision": "bf16", "loss.r1": 1.0, "loss.r1_interval": 2, "loss.name": "bce"},
    {"train.precision": "fp16", "train.grad_clip": 1.0, "model.arch": "resnet", "train.grad_accum": 2},
    # StyleGAN2 with ADA: all four phases within the 3 steps (Greg and Dreg every 2), p's update after each D step
    {"train.precision": "bf16", "model.arch": "stylegan2", "loss.pack": 1, "stylegan2.channel_base": 128,
     "stylegan2.channel_max": 8, "stylegan2.w_dim": 16, "stylegan2.mbstd_group": 2, "stylegan2.pl_interval": 2,
     "loss.r1_interval": 2, "augment.kind": "ada", "augment.interval": 1},
    # DF-GAN: tokenized captions, the text encoder, MA-GP, G's encoder copy after each D step
    {"train.precision": "no", "model.arch": "dfgan", "dfgan.text_encoder": "joint", "dfgan.vocabulary": "a red sun over still water",
     "dfgan.cond_dim": 16, "dfgan.text_width": 16, "dfgan.text_heads": 2},
])
def test_train_step_never_waits_for_the_device(extra, count_host_reads, monkeypatch, tmp_path):
    counting, reads = count_host_reads
    lookups = []
    monkeypatch.setattr(importlib.metadata, "distribution",
                        lambda name, _d=importlib.metadata.distribution: lookups.append(name) or _d(name))
    overrides = {"data.resolution": 32, "model.g_channels": 4, "model.d_channels": 4, "model.z_dim": 8,
                 "train.batch_size": 2, "run.dir": str(tmp_path), **extra}
    trainer = Trainer(load_config(None, [f"--{k}={v}" for k, v in overrides.items()]), Accelerator(cpu=True))
    reals = [{"image": torch.rand(2, 3, 32, 32) * 2 - 1, "label": None,
              "caption": ["a red sun", "still water"]}] * 4

    def batches():
        while True:
            yield from reals

    stream = batches()
    trainer.train_step(stream)  # first steps may set things up
    counting[0] = True
    lookups.clear()
    for _ in range(3):
        trainer.train_step(stream)
    counting[0] = False
    assert reads == [], f"host reads in train_step: {reads}"
    assert lookups == [], f"package metadata looked up in train_step: {lookups}"
    if extra["train.precision"] != "fp16":  # (fp16 on the CPU overflows at GradScaler's first scales)
        trainer.steps.sync_counters()  # counted on the device, read once
        assert trainer.state.skipped == 0


def test_input_bound_runs_say_so_and_log_the_wait(tiny_shards, tmp_path, env):
    """Data wait and the step's share of time are logged; a run that mostly waits for data warns once,
    naming data.workers."""
    from test_trainer import _events

    run_dir = tmp_path / "run"
    args = tiny_args(tiny_shards, run_dir, **{"train.kimg": 0.08, "data.workers": 0})
    result = run([sys.executable, str(HELPERS / "train_with_faults.py"), "slow-data", "0.05", *args], env)
    assert result.stdout.count("waits for data (input-bound); raise data.workers (now 0)") == 1, result.stdout
    scalars = _events(run_dir).Tags()["scalars"]
    for tag in ("Progress/data_wait_ms", "Progress/step_share", "Progress/iteration_ms"):
        assert tag in scalars
    waits = [e.value for e in _events(run_dir).Scalars("Progress/data_wait_ms")]
    assert min(waits) >= 45, waits  # 50 ms of sleep per batch
