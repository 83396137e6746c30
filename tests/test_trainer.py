"""The training loop through its real entry point: logs, checkpoints, resume, faults, equivalences."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bigan import checkpoint
from conftest import HELPERS, PIX2PIX, ROOT, free_port, run, tiny_args, train


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "logs" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_accelerate_launch_trains_logs_checkpoints_exports_and_samples(tiny_shards, tmp_path, env):
    run_dir = tmp_path / "run"
    result = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  "launch_configs/accelerate/cpu.yaml", "bigan/train.py",
                  *tiny_args(tiny_shards, run_dir, **{"train.kimg": 0.048})], env)
    assert f"checkpoints in {run_dir / 'checkpoints'}" in result.stdout

    events = _events(run_dir)
    scalars = events.Tags()["scalars"]
    for tag in ("Loss/D", "Loss/G", "D/real", "D/fake", "GradNorm/D", "GradNorm/G", "Progress/kimg",
                "Progress/img_per_s", "Progress/skipped_steps", "Progress/corrupt_samples", "LR/G", "Memory/peak_gib"):
        assert tag in scalars, tag
    assert events.Scalars("Progress/kimg")[-1].value == pytest.approx(0.048)
    assert {"samples/G", "samples/G_ema"} <= set(events.Tags()["images"])
    assert len(events.Images("samples/G")) >= 3
    assert any("config" in tag for tag in events.Tags()["tensors"])

    (latest,) = checkpoint.checkpoints(run_dir)
    assert latest.name == "ckpt-000000006"
    for name in ("model.safetensors", "model_1.safetensors", "optimizer.bin", "optimizer_1.bin",
                 "random_states_0.pkl", "custom_checkpoint_2.pkl", "data_rank_0.json"):
        assert (latest / name).exists(), name
    assert (run_dir / "config.yaml").exists()
    assert list((run_dir / "samples").glob("samples_G_ema_*.png"))

    out = tmp_path / "fakes.npz"
    run([sys.executable, "-m", "bigan.sample", "--checkpoint", str(run_dir), "--n", "5", "--out", str(out)], env)
    images = np.load(out)["images"]
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 0


@pytest.mark.parametrize("arch", ["dcgan", "resnet", "pix2pix"])
def test_resume_continues_bitwise(arch, tiny_shards, tiny_pairs, tmp_path, env):
    """2N steps straight == N steps, stop, resume, N more: parameters, optimizers, EMA, RNG, data position
    (pix2pix: the pairs' position and G's dropout draws too)."""
    common = {"model.arch": arch, "loss.name": "hinge" if arch == "resnet" else "bce"}
    if arch == "pix2pix":
        tiny_shards, common = tiny_pairs, {**common, "model.norm": "batch", "data.crop_scale_min": 0.5}
    train(tiny_args(tiny_shards, tmp_path / "straight", **common, **{"train.kimg": 0.048}), env)
    train(tiny_args(tiny_shards, tmp_path / "split", **common, **{"train.kimg": 0.024}), env)
    resumed = train(tiny_args(tiny_shards, tmp_path / "split", **common, **{"train.kimg": 0.048, "run.resume": "latest"}), env)
    assert "resuming from" in resumed.stdout

    a, b = (checkpoint.checkpoints(tmp_path / name)[-1] for name in ("straight", "split"))
    assert a.name == b.name == "ckpt-000000006"
    for name in ("model.safetensors", "model_1.safetensors"):
        left, right = load_file(str(a / name)), load_file(str(b / name))
        assert all(torch.equal(left[k], right[k]) for k in left), name
    for name in ("optimizer.bin", "optimizer_1.bin", "custom_checkpoint_0.pkl", "custom_checkpoint_2.pkl"):
        left, right = (torch.load(p / name, weights_only=False) for p in (a, b))
        assert _equal(left, right), name
    assert (a / "data_rank_0.json").read_text() == (b / "data_rank_0.json").read_text()


def _equal(x, y):
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_equal(i, j) for i, j in zip(x, y))
    if isinstance(x, torch.Tensor):
        return torch.equal(x, y)
    return x == y


def _params(path):
    return torch.load(path, weights_only=True)


def _assert_close(reference, other, initial, rtol=1e-5, update_rtol=1e-3):
    """Parameters within rtol, and the updates themselves (after - before) within update_rtol of each other."""
    for key, want in reference.items():
        if key not in initial:  # counters and loss scales (step_equivalence.py): exactly equal
            assert torch.equal(other[key], want), (key, other[key], want)
        elif want.is_floating_point():
            assert ((other[key] - want).abs().max() / want.abs().max().clamp_min(1e-12)) <= rtol, key
            update, other_update = want - initial[key], other[key] - initial[key]
            if update.abs().max() > 0:
                assert ((other_update - update).abs().max() / update.abs().max()) <= update_rtol, key


@pytest.mark.parametrize("loss", [
    {"loss.name": "hinge", "loss.r1": 0},
    {"loss.name": "bce", "loss.r1": 1.0, "loss.r1_interval": 1},
    {"loss.name": "wgan", "loss.gp": 10.0, "loss.r1": 0, "loss.pack": 2},  # PacGAN: packs never straddle a split
    {**PIX2PIX, "loss.name": "lsgan", "loss.l1": 100.0},  # U-Net and PatchGAN with instance norm, GAN + L1
])
def test_grad_accum_and_ddp_equal_one_big_batch(loss, tmp_path, env):
    """k x b accumulated, and 2 DDP ranks x b, match one step at the whole batch (resnet: D has no batch statistics).

    Adam's epsilon is set large so that its step is linear in the gradient: with the usual 1e-8
    the first step is about lr * sign(g), and float noise in near-zero gradients flips signs.
    """
    base = [f"--{k}={v}" for k, v in {"model.arch": "resnet", "data.resolution": 32, "model.dropout": 0, "model.g_channels": 4,
                                      "model.d_channels": 4, "model.z_dim": 8, "run.dir": str(tmp_path / "r"),
                                      "train.adam_eps": 1.0, "train.g_lr": 0.01, "train.d_lr": 0.01,
                                      **loss}.items()]
    helper = str(HELPERS / "step_equivalence.py")
    run([sys.executable, helper, str(tmp_path / "big.pt"), *base, "--train.batch_size=8"], env)
    run([sys.executable, helper, str(tmp_path / "accum.pt"), *base, "--train.batch_size=4", "--train.grad_accum=2"], env)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         helper, str(tmp_path / "ddp.pt"), *base, "--train.batch_size=4"], env)
    reference, initial = _params(tmp_path / "big.pt"), _params(tmp_path / "initial.pt")
    moved = [k for k in initial if not torch.equal(reference[k], initial[k])]
    assert any(k.startswith("D.") for k in moved) and any(k.startswith("G.") for k in moved)
    _assert_close(reference, _params(tmp_path / "accum.pt"), initial)
    _assert_close(reference, _params(tmp_path / "ddp.pt"), initial)


@pytest.mark.parametrize("precision, arch", [("bf16", "resnet"), ("fp16", "resnet"), ("bf16", "pix2pix"),
                                             ("fp16", "pix2pix")])
def test_mixed_precision_runs_on_cpu(precision, arch, tiny_shards, tiny_pairs, tmp_path, env):
    extra = {**PIX2PIX, "model.norm": "batch"} if arch == "pix2pix" else {"model.arch": arch}
    train(tiny_args(tiny_pairs if arch == "pix2pix" else tiny_shards, tmp_path / "run",
                    **{"train.kimg": 0.032, "train.precision": precision, **extra}), env)
    state = load_file(str(checkpoint.checkpoints(tmp_path / "run")[-1] / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert all(v.dtype == torch.float32 for k, v in state.items() if k.endswith(("weight", "bias", "original"))), \
        "master weights stay fp32"


def test_kill_during_checkpoint_write_leaves_previous_checkpoint_usable(tiny_shards, tmp_path, env):
    run_dir = tmp_path / "run"
    args = tiny_args(tiny_shards, run_dir, **{"train.kimg": 0.064, "run.ckpt_every_kimg": 0.016})
    killed = run([sys.executable, str(HELPERS / "train_with_faults.py"), "kill-on-save", "2", *args], env, check=False)
    assert killed.returncode == -9
    assert [p.name for p in checkpoint.checkpoints(run_dir)] == ["ckpt-000000002"]
    assert list((run_dir / "checkpoints").glob(".tmp-*")), "the interrupted write is left as a temp dir"
    assert checkpoint.resolve(run_dir, "latest").name == "ckpt-000000002"

    resumed = train(args + ["--run.resume=latest"], env)
    assert "resuming from" in resumed.stdout and "ckpt-000000002" in resumed.stdout
    assert checkpoint.checkpoints(run_dir)[-1].name == "ckpt-000000008"
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_non_finite_losses_are_skipped_then_rolled_back(tiny_shards, tmp_path, env):
    run_dir = tmp_path / "run"
    args = tiny_args(tiny_shards, run_dir, **{"train.kimg": 0.08, "run.ckpt_every_kimg": 0.016,
                                               "train.max_bad_steps": 3})
    # call 3: one NaN (skipped); calls 6-8: three iterations in a row (roll back to the step-4 checkpoint)
    result = run([sys.executable, str(HELPERS / "train_with_faults.py"), "nan-d-loss", "3,6,7,8", *args], env)
    assert "rolling back to" in result.stdout and "ckpt-000000004" in result.stdout
    final = checkpoint.checkpoints(run_dir)[-1]
    state = torch.load(final / "custom_checkpoint_0.pkl", weights_only=False)
    assert state["images_seen"] == 80 and state["skipped"] == 4
    weights = load_file(str(final / "model_1.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert "Progress/skipped_steps" in _events(run_dir).Tags()["scalars"]


@pytest.mark.parametrize("args, message", [
    (["--model.arch=stylegan"], "model.arch: must be one of dcgan, resnet, pix2pix, got 'stylegan'"),
    (["--train.batchsize=4"], "unknown config key 'train.batchsize'"),
    (["--train.kimg=-1"], "train.kimg: must be positive"),
    (["--data.shards=/nowhere/data-{0..3}.tar", "--train.kimg=0.01"], "shard not found: /nowhere/data-0.tar"),
])
def test_bad_config_and_missing_shards_are_one_line_errors(args, message, tmp_path, env):
    result = train(args + [f"--run.dir={tmp_path / 'run'}"], env, check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("bigan: error:") and message in last


def test_logged_scalars_are_means_over_the_log_interval(tiny_shards, tmp_path, env):
    """With the same seed, the value logged every 3 steps is the mean of the 3 per-step values."""
    for every in (1, 3):
        train(tiny_args(tiny_shards, tmp_path / f"every{every}", **{"train.kimg": 0.048, "run.log_every": every}), env)
    for tag in ("Loss/D", "D/real", "GradNorm/G"):
        per_step = [e.value for e in _events(tmp_path / "every1").Scalars(tag)]
        per_three = [e.value for e in _events(tmp_path / "every3").Scalars(tag)]
        assert len(per_step) == 6 and len(per_three) == 2
        assert per_three == pytest.approx([np.mean(per_step[:3]), np.mean(per_step[3:])], rel=1e-5), tag


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_signal_checkpoints_and_exits_zero(signum, tiny_shards, tmp_path, env):
    run_dir = tmp_path / "run"
    args = tiny_args(tiny_shards, run_dir, **{"train.kimg": 50, "run.log_every": 1})
    process = subprocess.Popen([sys.executable, "-m", "bigan.train", *args], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    for line in process.stdout:
        if "starting fresh" in line:
            break
    while not list((run_dir / "samples").glob("*.png")):  # the first step is done
        time.sleep(0.2)
    process.send_signal(signum)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and "stopped on request" in out
    (saved,) = checkpoint.checkpoints(run_dir)
    steps = int(saved.name.split("-")[1])
    assert 1 <= steps < 50_000 // 8
    resumed = train(args[:-2] + ["--train.kimg=0.008", "--run.log_every=1", "--run.resume=latest"], env)
    assert "resuming from" in resumed.stdout and "done at" in resumed.stdout


def test_two_processes_through_accelerate_launch(tiny_shards, tmp_path, env):
    run_dir = tmp_path / "run"
    run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
         f"--main_process_port={free_port()}", "bigan/train.py",
         *tiny_args(tiny_shards, run_dir, **{"train.kimg": 0.064})], env)
    final = checkpoint.checkpoints(run_dir)[-1]
    assert final.name == "ckpt-000000004", "64 images = 4 steps of 8 images on each of 2 ranks"
    for name in ("data_rank_0.json", "data_rank_1.json", "random_states_0.pkl", "random_states_1.pkl"):
        assert (final / name).exists(), name
    ranks = [json.loads((final / f"data_rank_{r}.json").read_text()) for r in range(2)]
    assert [s["rank"] for s in ranks] == [0, 1] and all(s["world_size"] == 2 for s in ranks)


def test_pix2pix_trains_from_pairs_shows_held_out_triplets_translates_and_evaluates(tiny_pairs, tmp_path, env):
    """accelerate launch -> TensorBoard input | output | target grids and held-out L1/PSNR ->
    bigan-sample --input (a folder of images) -> bigan-eval on held-out pairs."""
    from bigan.data.demo import write_pair_folders

    held_out = tmp_path / "held_out"
    write_pair_folders(held_out, 10, 32, seed=7)
    shards = tmp_path / "held_out_shards"
    run([sys.executable, "-m", "bigan.data.shards", str(held_out / "paintings"), str(shards),
         "--src-dir", str(held_out / "layouts"), "--format", "png"], env)
    run_dir = tmp_path / "run"
    run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch_configs/accelerate/cpu.yaml",
         "bigan/train.py", *tiny_args(tiny_pairs, run_dir, **PIX2PIX, **{
             "train.kimg": 0.048, "eval.every_kimg": 0.024, "eval.metrics": "l1,psnr", "eval.data": shards,
             "eval.n": 10, "run.grid_size": 4})], env)
    events = _events(run_dir)
    assert {"Loss/L1", "Metrics/l1", "Metrics/psnr"} <= set(events.Tags()["scalars"])
    assert 0 < events.Scalars("Metrics/l1")[-1].value < 2 and events.Scalars("Metrics/psnr")[-1].value > 0
    grid = events.Images("samples/G_ema")[-1]
    assert (grid.width, grid.height) == (6 * 32, 2 * 32), "4 held-out pairs as input | output | target, 2 per row"
    grid_png = np.asarray(Image.open(sorted((run_dir / "samples").glob("samples_G_ema_*"))[-1]))
    layout = np.asarray(Image.open(held_out / "layouts" / "000000.png"))
    assert np.array_equal(grid_png[:32, :32], layout), "the first column shows the held-out inputs"

    out = tmp_path / "translated"
    result = run([sys.executable, "-m", "bigan.sample", "--checkpoint", str(run_dir), "--input",
                  str(held_out / "layouts"), "--out", f"{out}/"], env)
    assert "translated 10 images" in result.stdout
    no_input = run([sys.executable, "-m", "bigan.sample", "--checkpoint", str(run_dir), "--out", str(tmp_path / "g.png")],
                   env, check=False)
    assert no_input.returncode == 2 and "give --input DIR" in no_input.stderr.strip().splitlines()[-1]
    images = sorted(out.glob("*.png"))
    assert [p.name for p in images] == [f"{i:06d}.png" for i in range(10)]
    assert np.asarray(Image.open(images[0])).shape == (32, 32, 3)

    result = run([sys.executable, "-m", "bigan.metrics.evaluate", "--checkpoint", str(run_dir), "--data", str(shards),
                  "--metrics", "l1,psnr"], env)
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["n"] == 10 and 0 < metrics["l1"] < 2 and metrics["psnr"] > 0
    assert metrics["l1"] == pytest.approx(events.Scalars("Metrics/l1")[-1].value, rel=1e-6), \
        "bigan-eval and the loop score the same EMA-G on the same pairs"


def test_pix2pix_on_single_images_and_noise_models_with_input_are_one_line_errors(tiny_shards, tmp_path, env):
    single = run([sys.executable, "-m", "bigan.train", *tiny_args(tiny_shards, tmp_path / "r", **PIX2PIX)],
                 env, check=False)
    assert single.returncode == 2 and not (tmp_path / "r").exists()
    assert "model.arch=pix2pix needs pairs" in single.stderr.strip().splitlines()[-1]
