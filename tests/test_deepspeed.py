"""DeepSpeed ZeRO 1/2/3 for G and D on 2 CPU processes (gloo), against the plain single-process path.

Accelerate cannot launch DeepSpeed on CPU (its DeepSpeed launcher wants GPUs), so the tests
start ranks with torchrun and name the DeepSpeed JSON with train.deepspeed(_g/_d): bigan then
builds both engines through the same make_backend / DeepSpeedBackend code that
`accelerate launch --config_file launch_configs/accelerate/deepspeed_zero*.yaml` reaches on GPUs.
"""
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

from conftest import HELPERS, free_port, run, tiny_args  # noqa: E402
from test_trainer import _assert_close, _params  # noqa: E402

PENALTIES = {
    "none": {"loss.name": "hinge"},
    "r1": {"loss.name": "bce", "loss.r1": 1.0, "loss.r1_interval": 1},
    "gp": {"loss.name": "wgan", "loss.gp": 10.0},
}
BASE = {"model.arch": "resnet", "data.resolution": 32, "model.g_channels": 4, "model.d_channels": 4,
        "model.z_dim": 8, "train.adam_eps": 1.0, "train.g_lr": 0.01, "train.d_lr": 0.01}


def _args(run_dir, penalty, **extra):
    return [f"--{k}={v}" for k, v in {**BASE, "run.dir": run_dir, **PENALTIES[penalty], **extra}.items()]


@pytest.fixture(scope="module")
def references(tmp_path_factory, env):
    """The plain single-process path on the whole batch of 8, per penalty."""
    out = tmp_path_factory.mktemp("reference")
    refs = {}
    for penalty in PENALTIES:
        target = out / f"{penalty}.pt"
        run([sys.executable, str(HELPERS / "step_equivalence.py"), str(target),
             *_args(out / "run", penalty, **{"train.batch_size": 8})], env)
        refs[penalty] = (_params(target), _params(out / "initial.pt"))
    return refs


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("penalty", list(PENALTIES))
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_match_the_plain_path(stage, penalty, accum, references, tmp_path, env):
    target = tmp_path / "zero.pt"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(HELPERS / "step_equivalence.py"), str(target),
         *_args(tmp_path / "run", penalty, **{"train.batch_size": 8 // (2 * accum), "train.grad_accum": accum,
                                              "train.deepspeed": f"launch_configs/deepspeed/zero{stage}.json"})], env)
    reference, initial = references[penalty]
    _assert_close(reference, _params(target), initial)


def _torchrun_train(args, env):
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                "bigan/train.py", *args], env)


def test_per_model_stages_train_resume_identically_and_export_from_zero3(tiny_shards, tmp_path, env):
    """D on ZeRO-2, G on ZeRO-3: 2N steps straight == N, resume, N; a ZeRO-3 checkpoint exports on CPU."""
    stages = {"train.deepspeed_g": "launch_configs/deepspeed/zero3.json",
              "train.deepspeed_d": "launch_configs/deepspeed/zero2.json", "model.arch": "resnet",
              "data.workers": 1, "train.ema_kimg": 0.01}
    _torchrun_train(tiny_args(tiny_shards, tmp_path / "straight", **stages, **{"train.kimg": 0.064}), env)
    _torchrun_train(tiny_args(tiny_shards, tmp_path / "split", **stages, **{"train.kimg": 0.032}), env)
    resumed = _torchrun_train(tiny_args(tiny_shards, tmp_path / "split", **stages,
                                        **{"train.kimg": 0.064, "run.resume": "latest"}), env)
    assert "resuming from" in resumed.stdout

    for name in ("generator.safetensors", "generator_ema.safetensors"):
        a, b = (load_file(str(tmp_path / run_dir / "export" / name)) for run_dir in ("straight", "split"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    d_a, d_b = (get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / r / "checkpoints" / "ckpt-000000004"), tag="D")
                for r in ("straight", "split"))
    assert all(torch.equal(d_a[k], d_b[k]) for k in d_a)

    checkpoint_dir = tmp_path / "straight" / "checkpoints" / "ckpt-000000004"
    for source, out in ((checkpoint_dir, "from_zero3.npz"), (tmp_path / "straight" / "export" / "generator.safetensors",
                                                             "from_live.npz")):
        run([sys.executable, "-m", "bigan.sample", "--checkpoint", str(source), "--no-ema", "--n", "6",
             "--out", str(tmp_path / out), "--device", "cpu"], env)
    assert np.array_equal(np.load(tmp_path / "from_zero3.npz")["images"], np.load(tmp_path / "from_live.npz")["images"])


def test_deepspeed_configs_that_would_break_are_refused(tmp_path, env):
    import json

    bad = tmp_path / "bf16.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    result = run([sys.executable, "-m", "bigan.train", f"--train.deepspeed={bad}", f"--run.dir={tmp_path / 'r'}"],
                 env, check=False)
    assert result.returncode == 2
    assert "'bf16' casts the whole model" in result.stderr.strip().splitlines()[-1]
