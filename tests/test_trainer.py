"""The training loop through its real entry point: logs, checkpoints, resume, faults, equivalences."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bigan import checkpoint
from conftest import (HELPERS, PIX2PIX, ROOT, descendants, free_port, kill_group, run, straight_and_resumed, tiny_args,
                      train)


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
    """2N steps straight (a checkpoint at N) == resumed from its checkpoint at N: parameters, optimizers, EMA, RNG,
    data position
    (pix2pix: the pairs' position, G's dropout draws and ADA's p and paired draws too)."""
    common = {"model.arch": arch, "loss.name": "hinge" if arch == "resnet" else "bce"}
    if arch == "pix2pix":
        tiny_shards, common = tiny_pairs, {**common, "model.norm": "batch", "data.crop_scale_min": 0.5,
                                           "augment.kind": "ada", "augment.p": 0.5, "augment.interval": 1}
    straight_and_resumed(lambda run_dir, **more: train(tiny_args(tiny_shards, run_dir, **common, **more), env),
                         tmp_path, 0.048)

    a, b = (checkpoint.checkpoints(tmp_path / name)[-1] for name in ("straight", "split"))
    assert a.name == b.name == "ckpt-000000006"
    assert_same_checkpoint(a, b, tuple(sorted(p.name for p in a.glob("custom_checkpoint_*.pkl"))))
    # lazy R1 (bigan's default loss.r1, every 16) is its own Dreg step in every family, pix2pix's too
    assert torch.load(a / "custom_checkpoint_0.pkl", weights_only=False)["phase_steps"]["Dreg"] == 1


def _equal(x, y):
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_equal(i, j) for i, j in zip(x, y))
    if isinstance(x, torch.Tensor):
        return torch.equal(x, y)
    return x == y


def assert_same_checkpoint(a, b, states=("custom_checkpoint_0.pkl", "custom_checkpoint_2.pkl")):
    """Two checkpoint dirs hold the same weights (bitwise), optimizers, the given custom states and stream position."""
    for name in ("model.safetensors", "model_1.safetensors"):
        left, right = load_file(str(a / name)), load_file(str(b / name))
        assert all(torch.equal(left[k], right[k]) for k in left), name
    for name in ("optimizer.bin", "optimizer_1.bin", *states):
        left, right = (torch.load(p / name, weights_only=False) for p in (a, b))
        assert _equal(left, right), name
    assert (a / "data_rank_0.json").read_text() == (b / "data_rank_0.json").read_text()


def _params(path):
    return torch.load(path, weights_only=True)


def _assert_close(reference, other, initial, rtol=1e-5, update_rtol=1e-3, per_network=False):
    """Parameters within rtol, and the updates themselves (after - before) within update_rtol of each other:
    of each tensor's own largest update, or (per_network) of the largest update in its network, where a
    family's double backward (StyleGAN2's path length) sums in another order on each split and tensors
    whose gradient nearly cancels (a noise strength) then differ by float noise alone."""
    largest = {}
    for key in initial:
        if reference[key].is_floating_point():
            net = key.split(".")[0]
            largest[net] = max(largest.get(net, 0.0), (reference[key] - initial[key]).abs().max().item())
    for key, want in reference.items():
        if key not in initial:  # counters and loss scales (step_equivalence.py): exactly equal; a family's
            if key.startswith("path_length."):  # running means within rtol (of a noisy statistic: 1e-2)
                assert torch.allclose(other[key], want, rtol=rtol, atol=0), (key, other[key], want)
            else:
                assert torch.equal(other[key], want), (key, other[key], want)
        elif want.is_floating_point():
            update, other_update = want - initial[key], other[key] - initial[key]
            scale = largest[key.split(".")[0]] if per_network else update.abs().max()
            if not per_network:  # (per network, the updates' check below is the check: after = before + update;
                # a tensor that starts at zero, a BatchNorm bias, is its own update: it is held to the updates' check)
                bound = rtol * want.abs().max() if initial[key].any() else update_rtol * scale
                assert (other[key] - want).abs().max() <= bound, key
            if scale > 0:  # (+ 2 ulps of the weights: after - before is rounded to the weights' own precision)
                ulps = 2 * torch.finfo(want.dtype).eps * want.abs().max()
                assert (other_update - update).abs().max() <= update_rtol * scale + ulps, key


# StyleGAN2 small, with what depends on the split held still: one-image minibatch-std groups, no style
# mixing, constant noise inputs (step_equivalence.py); ADA on with a p that moves by 1e-9 per step (it
# then stays an identity, and its all-reduced sign counts are checked exactly)
STYLEGAN2 = {"model.arch": "stylegan2", "model.z_dim": 8, "stylegan2.w_dim": 16, "stylegan2.mapping_layers": 2,
             "stylegan2.channel_base": 128, "stylegan2.channel_max": 8, "stylegan2.mbstd_group": 1,
             "stylegan2.style_mixing": 0, "stylegan2.pl_interval": 1, "stylegan2.pl_weight": 0.2, "loss.name": "bce",
             "loss.r1": 1.0,
             "loss.r1_interval": 2, "loss.pack": 1, "augment.kind": "ada", "augment.kimg": 1e6, "augment.interval": 1}


@pytest.mark.parametrize("loss", [
    {"loss.name": "hinge", "loss.r1": 0},
    {"loss.name": "bce", "loss.r1": 1.0, "loss.r1_interval": 1},
    {"loss.name": "wgan", "loss.gp": 10.0, "loss.r1": 0, "loss.pack": 2},  # PacGAN: packs never straddle a split
    {**PIX2PIX, "loss.name": "lsgan", "loss.l1": 100.0},  # U-Net and PatchGAN with instance norm, GAN + L1
    STYLEGAN2,  # four phases: Gmain, Greg (path length) and D every step, Dreg (R1) every 2; ADA's p, w_avg
    {**STYLEGAN2, "loss.pack": 2},  # its D judging pairs, R1 over each pair (micro-batches of 4: 2 packs)
], ids=["hinge", "bce-r1", "wgan-gp-packed", "pix2pix", "stylegan2", "stylegan2-packed"])
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
    # StyleGAN2: float noise of the path length's double backward, summed in another order per split,
    # reaches 6e-3 of G's largest update in 3 steps at pl_weight 2 (without it 3e-6), 2e-4 at 0.2 (measured)
    stylegan2 = loss.get("model.arch") == "stylegan2"
    tolerance = {"rtol": 1e-2, "update_rtol": 2e-3, "per_network": True} if stylegan2 else {}
    _assert_close(reference, _params(tmp_path / "accum.pt"), initial, **tolerance)
    _assert_close(reference, _params(tmp_path / "ddp.pt"), initial, **tolerance)


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
    assert checkpoint.resolve(run_dir, "latest")[0].name == "ckpt-000000002"

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


def test_a_roll_back_changes_course_instead_of_replaying_the_divergence(tiny_shards, tmp_path, env):
    """Batches 6-8 of the stream diverge whatever the weights: an exact replay from the step-4 checkpoint
    would meet them again at the same step, for ever. The roll-back goes on past them (and draws new
    latents), so the run rolls back once and finishes."""
    run_dir = tmp_path / "run"
    args = tiny_args(tiny_shards, run_dir, **{"train.kimg": 0.096, "run.ckpt_every_kimg": 0.032,
                                               "train.max_bad_steps": 3, "run.log_every": 1})
    result = run([sys.executable, str(HELPERS / "train_with_faults.py"), "nan-on-batches", "6-8", *args], env)
    assert result.stdout.count("rolling back to") == 1 and "ckpt-000000004" in result.stdout, result.stdout
    assert "done at 0.1 kimg" in result.stdout
    state = torch.load(checkpoint.checkpoints(run_dir)[-1] / "custom_checkpoint_0.pkl", weights_only=False)
    assert state["images_seen"] == 96 and state["rollbacks"] == 1 and state["skipped"] == 3
    data = json.loads((checkpoint.checkpoints(run_dir)[-1] / "data_rank_0.json").read_text())
    assert data["batches"] == 12 + 4, "steps 5-8 (batches 5-8) rolled back and not replayed: 4 batches more"


def test_roll_backs_are_bounded_then_one_line_and_exit_2(tiny_shards, tmp_path, env):
    """A divergence that follows every roll-back: after train.max_rollbacks of them, one line and exit 2."""
    args = tiny_args(tiny_shards, tmp_path / "run", **{"train.kimg": 10, "run.ckpt_every_kimg": 0.016,
                                                        "train.max_bad_steps": 2, "train.max_rollbacks": 2,
                                                        "run.log_every": 1})
    result = run([sys.executable, str(HELPERS / "train_with_faults.py"), "nan-d-loss-from", "3", *args], env,
                 check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stdout.count("rolling back to") == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "training diverged again after 2 roll-back(s) (train.max_rollbacks=2)" in last, last


@pytest.mark.parametrize("args, message", [
    (["--model.arch=stylegan"], "model.arch: must be one of dcgan, resnet, pix2pix, stylegan2"),
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
    layouts = [np.asarray(Image.open(p)) for p in sorted((held_out / "layouts").glob("*.png"))]
    assert any(np.array_equal(grid_png[:32, :32], layout) for layout in layouts), \
        "the first column shows a held-out input (bigan-shards shuffles them into its shards)"

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


# Adam with eps 1 steps linearly in the gradient (see above); lr 0.1 makes each update large beside the
# float32 spacing of the weights it moves
DRAWS = {"model.arch": "resnet", "model.g_channels": 4, "model.d_channels": 4, "model.z_dim": 8, "train.adam_eps": 1.0,
         "train.g_lr": 0.1, "train.d_lr": 0.1, "loss.name": "hinge", "loss.r1": 1.0, "loss.r1_interval": 2,
         "data.workers": 1, "train.ema_kimg": 0, "run.image_every_kimg": 1000}


def ranks_draw_their_own_and_match_one_big_batch(launch: list, tiny_shards, tmp_path, env, d_steps: int = 1):
    """Through bigan.train's own data stream and sampling on 2 ranks (launched by `launch`): the ranks'
    latents and reals differ and look like what they are drawn from, each of D's loss.d_steps steps takes
    reals of its own, and the weights after 3 iterations equal one process's after the same phases on the
    concatenated reals and latents (resnet: D has no batch statistics; G's BatchNorm in eval mode)."""
    draws = tmp_path / "draws"
    draws.mkdir()
    extra = {**DRAWS, "loss.d_steps": d_steps, "train.kimg": 0.024 * d_steps}  # (3 iterations: kimg counts D's reals)
    run([*launch, str(HELPERS / "trainer_draws.py"), str(draws), *tiny_args(tiny_shards, tmp_path / "run", **extra,
                                                                             **{"train.batch_size": 4})], env)
    ranks = [torch.load(draws / f"draws_rank{r}.pt", weights_only=False) for r in range(2)]
    phases = [(r["phase"], r["iteration"]) for r in ranks[0]]
    assert phases == [(name, i) for i in range(3)
                      for name in ["D"] * d_steps + ["Dreg"] * (i % 2 == 0) + ["G"]], phases  # (r1_interval 2)
    for name in ("D", "G"):
        z = [torch.stack([r["latents"][0][0] for r in rank if r["phase"] == name]) for rank in ranks]
        assert not torch.equal(z[0], z[1]), f"both ranks drew the same latents for {name}"
        assert all(abs(x.mean()) < 0.5 and 0.7 < x.std() < 1.3 for x in z), name  # 48+ draws of N(0, 1) each
    reals = [[r["reals"][0]["image"] for r in rank if r["phase"] == "D"] for rank in ranks]
    assert not torch.equal(reals[0][0], reals[1][0]), "both ranks read the same reals"
    seen = [x for rank in reals for x in rank]
    assert all(not torch.equal(a, b) for i, a in enumerate(seen) for b in seen[i + 1:]), \
        "each D step of each rank reads reals of its own"
    assert all(torch.equal(r["reals"][0]["image"], rank[i - 1]["reals"][0]["image"])
               for rank in ranks for i, r in enumerate(rank) if r["phase"] == "Dreg"), "Dreg: the last D step's reals"
    reference = tmp_path / "replayed.pt"
    run([sys.executable, str(HELPERS / "replay_draws.py"), str(draws), str(reference),
         *tiny_args(tiny_shards, tmp_path / "replay", **extra, **{"train.batch_size": 8})], env)
    _assert_close(_params(reference), _params(draws / "final.pt"), _params(tmp_path / "initial.pt"))


@pytest.mark.parametrize("d_steps", [1, 2])
def test_ddp_ranks_draw_their_own_latents_and_match_one_big_batch(d_steps, tiny_shards, tmp_path, env):
    ranks_draw_their_own_and_match_one_big_batch(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch_configs/accelerate/cpu_multi.yaml",
         "--num_processes", "2", "--main_process_port", str(free_port())], tiny_shards, tmp_path, env, d_steps)


def test_compile_trains_with_r1_and_wgan_gp_and_its_export_loads(tiny_shards, tmp_path, env):
    """train.compile: the penalties' double backward runs D eager (aot_autograd refuses it), the rest
    compiled; the export holds plain parameter names (no '_orig_mod.'), so bigan-sample --no-ema loads it."""
    run_dir = tmp_path / "run"
    train(tiny_args(tiny_shards, run_dir, **{"train.compile": "true", "loss.name": "wgan", "loss.gp": 10.0,
                                             "loss.r1": 1.0, "loss.r1_interval": 2, "train.kimg": 0.032,
                                             "data.workers": 0}), env)
    exported = load_file(str(run_dir / "export" / "generator.safetensors"))
    assert not any("_orig_mod" in key for key in exported), sorted(exported)[:3]
    assert all(torch.isfinite(v).all() for v in exported.values() if v.is_floating_point())
    out = tmp_path / "g.npz"
    run([sys.executable, "-m", "bigan.sample", "--checkpoint", str(run_dir), "--no-ema", "--n", "4", "--out", str(out)],
        env)
    assert np.load(out)["images"].shape == (4, 32, 32, 3)


def test_resume_applies_new_optimizer_settings_and_says_which(tiny_shards, tmp_path, env):
    """--train.g_lr / d_betas / adam_eps on resume replace what the checkpoint's optimizer state holds."""
    run_dir = tmp_path / "run"
    train(tiny_args(tiny_shards, run_dir, **{"train.kimg": 0.016, "loss.r1": 0}), env)
    resumed = train([f"--run.dir={run_dir}", "--run.resume=latest", "--train.kimg=0.032", "--train.g_lr=1e-4",
                     "--train.d_betas=[0.5, 0.9]", "--train.adam_eps=1e-6"], env)
    line = next(x for x in resumed.stdout.splitlines() if "optimizer settings from this command line" in x)
    assert "G lr 0.0002 -> 0.0001" in line and "D betas [0.0, 0.99] -> [0.5, 0.9]" in line, line
    assert "G eps 1e-08 -> 1e-06" in line and "D lr" not in line, line
    optimizers = [torch.load(checkpoint.checkpoints(run_dir)[-1] / name, weights_only=False)
                  for name in ("optimizer.bin", "optimizer_1.bin")]
    g_group, d_group = (o["param_groups"][0] for o in optimizers)
    assert g_group["lr"] == 1e-4 and tuple(d_group["betas"]) == (0.5, 0.9) and d_group["eps"] == 1e-6
    again = train([f"--run.dir={run_dir}", "--run.resume=latest", "--train.kimg=0.04"], env)
    assert "optimizer settings from this command line" not in again.stdout, "config.yaml now holds the new ones"


def _rank_pid(launcher: int, rank: int) -> int:
    """The trainer process of one rank among those `accelerate launch` started (each in a session of its own)."""
    for pid in descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"bigan/train.py" in cmdline and os.getpgid(pid) == pid:
            return pid
    raise AssertionError(f"no rank {rank} under process {launcher}")


def test_a_signal_to_one_rank_stops_both_within_seconds_whatever_log_every(tiny_shards, tmp_path, env):
    """Stops are agreed on a wall-clock cadence: with run.log_every far beyond the run, SIGUSR1 to rank 1
    alone (Slurm's warning can reach one node first) still stops both ranks at one step, with a checkpoint."""
    run_dir = tmp_path / "run"
    log = tmp_path / "train.log"
    args = tiny_args(tiny_shards, run_dir, **{"train.kimg": 1000, "run.log_every": 10**6, "data.workers": 1,
                                               "run.image_every_kimg": 1000})
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                    "launch_configs/accelerate/cpu_multi.yaml", "--num_processes", "2",
                                    "--main_process_port", str(free_port()), "bigan/train.py", *args],
                                   cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while "starting fresh" not in log.read_text():
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(3)  # some steps
        os.kill(_rank_pid(process.pid, 1), signal.SIGUSR1)
        signalled = time.time()
        process.wait(timeout=120)
        took = time.time() - signalled
    finally:
        kill_group(process.pid)
    text = log.read_text()
    assert process.returncode == 0 and "stopped on request" in text, text[-3000:]
    (saved,) = checkpoint.checkpoints(run_dir)
    assert {json.loads((saved / f"data_rank_{r}.json").read_text())["batches"] for r in range(2)} == \
        {int(saved.name.split("-")[1])}, "both ranks stopped after the same step"
    assert took < 60, took


def test_resume_on_another_number_of_processes_or_workers_restarts_the_stream(tiny_shards, tmp_path, env):
    """Infinite mode: 2 ranks -> 1 process, then 1 worker -> 2: one line says the stream restarts from new
    seeds; images seen and the models carry on (and the run after that resumes exactly again)."""
    run_dir = tmp_path / "run"
    args = tiny_args(tiny_shards, run_dir, **{"data.workers": 1})
    run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch_configs/accelerate/cpu_multi.yaml",
         "--num_processes", "2", "--main_process_port", str(free_port()), "bigan/train.py", *args,
         "--train.kimg=0.032"], env)
    one = train([f"--run.dir={run_dir}", "--run.resume=latest", "--train.kimg=0.048"], env)
    assert "resuming on a new layout (processes 2 -> 1)" in one.stdout and "restarts from new per-rank seeds" in one.stdout
    two = train([f"--run.dir={run_dir}", "--run.resume=latest", "--train.kimg=0.064", "--data.workers=2"], env)
    assert "resuming on a new layout (data.workers 1 -> 2)" in two.stdout, two.stdout
    final = checkpoint.checkpoints(run_dir)[-1]
    state = torch.load(final / "custom_checkpoint_0.pkl", weights_only=False)
    assert state["images_seen"] == 64 and state["step"] == 2 + 2 + 2
    data = json.loads((final / "data_rank_0.json").read_text())
    assert data["seed"] == state["stream_seed"] != 0 and data["world_size"] == 1 and data["workers"] == 2
    exact = train([f"--run.dir={run_dir}", "--run.resume=latest", "--train.kimg=0.08"], env)
    assert "new layout" not in exact.stdout and "done at 0.1 kimg" in exact.stdout


def test_epoch_mode_refuses_a_resume_on_another_layout_in_one_line(tiny_shards, tmp_path, env):
    run_dir = tmp_path / "run"
    train(tiny_args(tiny_shards, run_dir, **{"data.workers": 1, "data.mode": "epoch", "train.kimg": 0.016}), env)
    refused = train([f"--run.dir={run_dir}", "--run.resume=latest", "--train.kimg=0.032", "--data.workers=2"], env,
                    check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "data.workers 1 -> 2" in refused.stderr.strip().splitlines()[-1] and "data.mode=epoch" in refused.stderr


def _launch_two(args: list, env, script: str = "bigan/train.py", check=True):
    return run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                "launch_configs/accelerate/cpu_multi.yaml", "--num_processes", "2", "--main_process_port",
                str(free_port()), script, *args], env, check=check)


def test_logged_corrupt_samples_are_summed_over_ranks(tmp_path, env):
    """Every shard has unreadable samples, so both ranks count some: TensorBoard shows their sum."""
    import io
    import webdataset as wds

    folder = tmp_path / "shards"
    folder.mkdir()
    good = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 30, 200)).save(good, format="JPEG")
    for shard in range(4):
        with wds.TarWriter(str(folder / f"data-{shard}.tar")) as sink:
            for i in range(40):
                sink.write({"__key__": f"{shard}-{i}", "jpg": b"\xff\xd8broken" if i % 5 == 0 else good.getvalue()})
    run_dir = tmp_path / "run"
    _launch_two(tiny_args(folder, run_dir, **{"train.kimg": 0.064, "data.workers": 1, "run.log_every": 2}), env)
    logged = _events(run_dir).Scalars("Progress/corrupt_samples")[-1].value
    final = checkpoint.checkpoints(run_dir)[-1]
    per_rank = [sum(role[3] for role in json.loads((final / f"data_rank_{r}.json").read_text())["roles"].values())
                for r in range(2)]
    assert min(per_rank) > 0 and logged == sum(per_rank), (logged, per_rank)


def test_the_latest_checkpoint_is_rank_0s_choice(tiny_shards, tmp_path, env):
    """Rank 1's file system lags and lists no checkpoint: rank 1 resumes from the one rank 0 found, rather
    than starting fresh beside a resumed rank 0 (which would then wait in a collective for ever)."""
    run_dir = tmp_path / "run"
    args = tiny_args(tiny_shards, run_dir, **{"data.workers": 1})
    _launch_two([*args, "--train.kimg=0.032"], env)
    resumed = _launch_two(["lagging-listing", "1", *args, "--train.kimg=0.064", "--run.resume=latest"], env,
                          script=str(HELPERS / "train_with_faults.py"))
    assert "resuming from" in resumed.stdout and "done at 0.1 kimg" in resumed.stdout
    assert checkpoint.checkpoints(run_dir)[-1].name == "ckpt-000000004"


ODD = {"model.arch": "odd_family:Odd", "odd.q_every": 3}


@pytest.fixture
def odd_env(env):
    """tests/helpers on PYTHONPATH: the odd family is a file of the tests', not of bigan."""
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(HELPERS), env.get("PYTHONPATH")]))}


def test_a_family_of_ones_own_trains_resumes_bitwise_and_runs_on_ddp(tiny_shards, tmp_path, odd_env):
    """tests/helpers/odd_family.py: three networks (G, D and an encoder Q), Q stepped every 3 iterations, its
    own config section and checkpointed state, and nothing of it outside its file."""
    straight_and_resumed(lambda run_dir, **more: train(tiny_args(tiny_shards, run_dir, **ODD, **more), odd_env),
                         tmp_path, 0.048)
    a, b = (checkpoint.checkpoints(tmp_path / name)[-1] for name in ("straight", "split"))
    for name in ("model.safetensors", "model_1.safetensors", "model_2.safetensors"):  # G, D, Q
        left, right = load_file(str(a / name)), load_file(str(b / name))
        assert all(torch.equal(left[k], right[k]) for k in left), name
    states = checkpoint.states(a)
    assert set(states) == {"train", "backend", "ema", "family.q_counter"}
    for name in ("optimizer.bin", "optimizer_1.bin", "optimizer_2.bin", *states.values()):
        left, right = (torch.load(p / name, weights_only=False) for p in (a, b))
        assert _equal(left, right), name
    train_state = torch.load(a / states["train"], weights_only=False)
    assert train_state["phase_steps"] == {"D": 6, "Dreg": 1, "G": 6, "Q": 2}, \
        "Q steps at iterations 0 and 3 (Dreg: bigan's lazy R1, every 16)"
    assert torch.load(a / states["family.q_counter"], weights_only=False) == {"images": 2 * 8}
    assert json.loads((a / "architecture.json").read_text())["odd.q_every"] == 3
    assert "Loss/Q" in _events(tmp_path / "straight").Tags()["scalars"]
    ddp = tmp_path / "ddp"
    _launch_two(tiny_args(tiny_shards, ddp, **ODD, **{"train.kimg": 0.032, "data.workers": 1}), odd_env)
    _launch_two(tiny_args(tiny_shards, ddp, **ODD, **{"train.kimg": 0.064, "data.workers": 1, "run.resume": "latest"}),
                odd_env)
    assert checkpoint.checkpoints(ddp)[-1].name == "ckpt-000000004"
    wrong = train(tiny_args(tiny_shards, tmp_path / "w", **{"model.arch": "odd_family:Odd", "odd.q_every": 0}), odd_env,
                  check=False)
    assert wrong.returncode == 2 and "odd.q_every: must be >= 1" in wrong.stderr.strip().splitlines()[-1]
    elsewhere = train(tiny_args(tiny_shards, tmp_path / "x", **{"odd.q_every": 2}), odd_env, check=False)
    assert elsewhere.returncode == 2 and "unknown config key 'odd.q_every'" in elsewhere.stderr


def test_a_roll_back_keeps_the_optimizer_settings_of_the_resume(tiny_shards, tmp_path, env):
    """Resumed with a lower train.g_lr, then rolled back to the checkpoint written before: the lower rate
    stays (the checkpoint's optimizer state holds the old one)."""
    run_dir = tmp_path / "run"
    args = tiny_args(tiny_shards, run_dir, **{"run.ckpt_every_kimg": 0.032, "train.max_bad_steps": 2,
                                               "run.log_every": 1})
    train(args + ["--train.kimg=0.032"], env)
    result = run([sys.executable, str(HELPERS / "train_with_faults.py"), "nan-on-batches", "6-7", *args,
                  "--train.kimg=0.08", "--run.resume=latest", "--train.g_lr=1e-5"], env)
    assert "rolling back to" in result.stdout and "ckpt-000000004" in result.stdout
    optimizer = torch.load(checkpoint.checkpoints(run_dir)[-1] / "optimizer.bin", weights_only=False)
    assert optimizer["param_groups"][0]["lr"] == 1e-5


def test_a_resume_from_an_earlier_checkpoint_replaces_the_later_ones_it_reaches(tiny_shards, tmp_path, env):
    """Resumed from ckpt-2 of a run that had gone on to ckpt-6, with another learning rate: the checkpoints it
    writes at steps 4 and 6 are its own, not the old history's kept under the same names."""
    run_dir = tmp_path / "run"
    args = tiny_args(tiny_shards, run_dir, **{"run.ckpt_every_kimg": 0.016, "train.kimg": 0.048})
    train(args, env)
    old = load_file(str(run_dir / "checkpoints" / "ckpt-000000006" / "model.safetensors"))
    train(args + [f"--run.resume={run_dir / 'checkpoints' / 'ckpt-000000002'}", "--train.g_lr=0.01"], env)
    new = load_file(str(run_dir / "checkpoints" / "ckpt-000000006" / "model.safetensors"))
    assert not all(torch.equal(old[k], new[k]) for k in old), "ckpt-6 still holds the old history"
    assert not list((run_dir / "checkpoints").glob(".old-*"))


def test_fake_classes_are_drawn_as_often_as_the_shards_hold_them(tmp_path, env):
    """Conditional training on a 5:1 class split (bigan-shards --labels-from-dirs): the classes the trainer
    itself draws for D's and G's fakes follow the shards' label counts (stylegan2-ada-pytorch draws a random
    training image's label), not a uniform draw that would show G the rare class five times as often as D's
    reals; and evaluation labels its samples in the reference set's proportions."""
    from bigan.data import shards as shards_mod
    from bigan import families
    from bigan.config import load_config
    from bigan.data.stream import DataError
    from bigan.metrics.evaluate import generated_labels

    for name, n, color in (("common", 30, (200, 40, 40)), ("rare", 6, (40, 40, 200))):
        (tmp_path / "folder" / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (32, 32), tuple(c + i for c in color)).save(tmp_path / "folder" / name / f"{i}.png")
    shards = tmp_path / "shards"
    assert shards_mod.main([str(tmp_path / "folder"), str(shards), "--resolution", "32", "--labels-from-dirs",
                            "--workers", "1", "--no-progress"]) == 0
    draws = tmp_path / "draws"
    draws.mkdir()
    run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch_configs/accelerate/cpu_multi.yaml",
         "--num_processes", "2", "--main_process_port", str(free_port()), str(HELPERS / "trainer_draws.py"), str(draws),
         *tiny_args(shards, tmp_path / "run", **{"model.num_classes": 2, "loss.pack": 1, "train.kimg": 0.8,
                                                 "data.workers": 0})], env)
    ranks = [torch.load(draws / f"draws_rank{r}.pt", weights_only=False) for r in range(2)]
    for key in ("D", "G"):  # 2 ranks x 50 iterations x 8: each rank its own draws, both as the data
        y = [torch.cat([pair[1] for run in runs if run["phase"] == key for pair in run["latents"]]) for runs in ranks]
        assert not torch.equal(y[0], y[1]), f"both ranks drew the same {key} classes"
        for rank in y:
            assert len(rank) == 400 and 0.09 < rank.float().mean() < 0.26, (key, rank.float().mean())  # 1/6; uniform 1/2
    family = families.build(load_config(None, ["--model.num_classes=2", "--loss.pack=1"]))
    assert family.reference_label_counts(str(shards)) == [30, 6]
    with pytest.raises(DataError, match="holds labels up to 1, and the model has model.num_classes=1"):
        families.build(load_config(None, ["--model.num_classes=1", "--loss.pack=1"])).reference_label_counts(str(shards))
    # evaluation: exact proportions, and every stretch of indices mixed as the whole (IS scores 10 splits
    # apart, KID and pr keep the first 10,000 of 50,000)
    y = generated_labels(torch.arange(50_000), 50_000, 3, [30, 6, 24])
    assert torch.bincount(y).tolist() == [25_000, 5_000, 20_000]
    for part in y.view(10, -1):
        assert (torch.bincount(part, minlength=3) - torch.tensor([2500, 500, 2000])).abs().max() <= 5
    assert generated_labels(torch.arange(7), 7, 2, [0, 1]).tolist() == [1] * 7
    # refused at start, in one line: eval.data with other class names, shards with more classes than the model
    for name in ("common", "other"):
        (tmp_path / "held" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "held" / name / "0.png")
    assert shards_mod.main([str(tmp_path / "held"), str(tmp_path / "held_shards"), "--resolution", "32",
                            "--labels-from-dirs", "--workers", "1", "--no-progress"]) == 0
    for extra, words in ((["--model.num_classes=2", f"--eval.data={tmp_path / 'held_shards'}"],
                          "eval.data: its classes ['common', 'other'] are not data.shards' ['common', 'rare']"),
                         (["--model.num_classes=1"], "holds labels up to 1, and the model has model.num_classes=1")):
        result = run([sys.executable, "-m", "bigan.train", f"--data.shards={shards}", "--data.resolution=32",
                      "--loss.pack=1", f"--run.dir={tmp_path / 'refused'}", *extra], env, check=False)
        assert result.returncode == 2 and words in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]
        assert not (tmp_path / "refused").exists()
