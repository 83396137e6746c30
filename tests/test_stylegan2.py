"""The StyleGAN2 family through bigan's own entry points: its four phases, ADA, exact resume, sampling with
truncation, evaluation, precision, its config. (Its networks: test_stylegan2_models.py; augmentation:
test_augment.py; DDP and ZeRO against one process: test_trainer.py and test_deepspeed.py.)"""
import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bigan import checkpoint
from bigan.augment import DiffAugment
from bigan.config import ConfigError, load_config
from conftest import PIX2PIX, run, straight_and_resumed, tiny_args, train
from test_trainer import _events, assert_same_checkpoint

SMALL = {"model.arch": "stylegan2", "model.z_dim": 16, "stylegan2.w_dim": 32, "stylegan2.mapping_layers": 2,
         "stylegan2.channel_base": 256, "stylegan2.channel_max": 16, "stylegan2.mbstd_group": 4,
         "train.batch_size": 4, "loss.pack": 1, "loss.r1": 1.0, "loss.r1_interval": 2, "stylegan2.pl_interval": 2,
         "augment.kind": "ada", "augment.p": 0.5, "augment.kimg": 2, "augment.interval": 1, "train.ema_kimg": 0.01,
         "data.workers": 1}


def test_trains_all_four_phases_with_ada_and_resumes_bit_for_bit(tiny_shards, tmp_path, env):
    """Gmain, Greg (path length), D and Dreg (R1) stepped on their intervals; ADA's p moves and is logged;
    2N iterations straight (a checkpoint at N) == resumed from it at N: weights, optimizers, EMA (with w_avg), the
    path-length mean, ADA's p and sign counts, RNG and stream."""
    straight_and_resumed(lambda run_dir, **more: train(tiny_args(tiny_shards, run_dir, **SMALL, **more), env),
                         tmp_path, 0.032)
    a, b = (checkpoint.checkpoints(tmp_path / name)[-1] for name in ("straight", "split"))
    assert a.name == b.name == "ckpt-000000008"
    states = checkpoint.states(a)
    assert set(states) == {"train", "backend", "ema", "family.ada", "family.path_length"}
    assert_same_checkpoint(a, b, states.values())
    train_state = torch.load(a / states["train"], weights_only=False)
    assert train_state["phase_steps"] == {"Gmain": 8, "Greg": 4, "D": 8, "Dreg": 4}
    ada = torch.load(a / states["family.ada"], weights_only=False)
    assert 0 <= float(ada["p"]) <= 1 and float(ada["p"]) != 0.5, "p started at 0.5 and moved"
    ema = torch.load(a / states["ema"], weights_only=False)
    assert ema["mapping.w_avg"].abs().sum() > 0, "w_avg tracked (and kept in the EMA generator)"
    assert float(torch.load(a / states["family.path_length"], weights_only=False)["mean"]) > 0
    events = _events(tmp_path / "straight")
    p_logged = [e.value for e in events.Scalars("Augment/p")]
    assert len(set(p_logged)) > 1 and all(0 <= p <= 1 for p in p_logged)
    for tag in ("Augment/rt", "Penalty/PL", "Penalty/R1", "Loss/G", "Loss/D"):
        assert tag in events.Tags()["scalars"], tag


def test_samples_truncate_towards_w_avg_and_evaluates(tiny_shards, small_extractor, tmp_path, env):
    run_dir = tmp_path / "run"
    train(tiny_args(tiny_shards, run_dir, **{**SMALL, "train.kimg": 0.016}), env)
    outputs = {}
    for psi in ("0.001", "0.5", "1"):
        out = tmp_path / f"psi{psi}.npz"
        run([sys.executable, "-m", "bigan.sample", "--checkpoint", str(run_dir), "--n", "4", "--truncation", psi,
             "--out", str(out)], env)
        outputs[psi] = np.load(out)["images"].astype(np.int64)
    spread = {psi: outputs[psi].std(axis=0).mean() for psi in outputs}
    assert spread["0.001"] < 0.5 and spread["0.001"] < spread["0.5"] < spread["1"], spread  # psi -> 0: w_avg's image
    walk = tmp_path / "walk.png"
    run([sys.executable, "-m", "bigan.sample", "--checkpoint", str(run_dir), "--interpolate", "4", "--out", str(walk)], env)
    result = run([sys.executable, "-m", "bigan.metrics.evaluate", "--checkpoint", str(run_dir), "--data",
                  str(tiny_shards), "--n", "32", "--extractor", str(small_extractor), "--metrics", "fid"], env)
    assert json.loads(result.stdout.strip().splitlines()[-1])["fid"] > 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_finite(precision, tiny_shards, tmp_path, env):
    run_dir = tmp_path / "run"
    train(tiny_args(tiny_shards, run_dir, **{**SMALL, "train.kimg": 0.016, "train.precision": precision}), env)
    state = load_file(str(checkpoint.checkpoints(run_dir)[-1] / "model.safetensors"))
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


def test_a_packed_d_trains_with_r1_through_ada(tiny_shards, tmp_path, env):
    """loss.pack=4 (PacGAN, not in the official StyleGAN2): D reads 4 images at once, R1's norm is over the
    pack, ADA augments each image before packing; config.yaml records the pack, so sampling rebuilds D."""
    run_dir = tmp_path / "run"
    train(tiny_args(tiny_shards, run_dir, **{**SMALL, "train.batch_size": 8, "loss.pack": 4,
                                             "stylegan2.mbstd_group": 2, "train.kimg": 0.032}), env)
    last = checkpoint.checkpoints(run_dir)[-1]
    d = load_file(str(last / "model_1.safetensors"))
    assert d["b32.fromrgb.weight"].shape[1] == 12
    assert all(torch.isfinite(v).all() for v in d.values() if v.is_floating_point())
    scalars = _events(run_dir).Tags()["scalars"]
    assert "Penalty/R1" in scalars and "Augment/p" in scalars
    run([sys.executable, "-m", "bigan.sample", "--checkpoint", str(run_dir), "--n", "4", "--out",
         str(tmp_path / "s.npz")], env)


@pytest.mark.parametrize("settings, warned", [
    (["--train.batch_size=4", "--loss.pack=4"], "train.batch_size=4 / loss.pack=4: one pack"),
    (["--train.batch_size=1", "--stylegan2.pl_batch_shrink=1"], "train.batch_size=1: one image"),
    (["--train.batch_size=4", "--loss.pack=4", "--stylegan2.auto=true"], "one pack"),  # (auto resolves the group to 1)
    (["--stylegan2.mbstd_group=1"], "stylegan2.mbstd_group=1"),  # (asked for, as the equivalence tests do)
    (["--train.batch_size=5", "--stylegan2.auto=true"], "stylegan2.mbstd_group=1"),  # (5 has no divisor 2-4)
    (["--train.batch_size=8", "--loss.pack=4"], None),
])
def test_a_warning_where_d_minibatch_std_groups_hold_one_sample(settings, warned):
    from bigan import families

    notes = families.build(load_config(None, ["--model.arch=stylegan2", *settings])).notes()
    assert notes == [] if warned is None else len(notes) == 1 and warned in notes[0] and "constant" in notes[0]


def test_the_trainer_prints_the_family_warnings_at_start_up(tiny_shards, tmp_path, env):
    from bigan.backends.precision import cpu_note

    result = train(tiny_args(tiny_shards, tmp_path / "run", **{**SMALL, "train.batch_size": 4, "loss.pack": 4,
                                                               "stylegan2.mbstd_group": 2, "train.kimg": 0.004,
                                                               "train.precision": "bf16"}), env)
    assert "bigan: warning: D's minibatch-std groups hold one sample (train.batch_size=4 / loss.pack=4: one pack" \
        in result.stdout
    slow_bf16 = cpu_note(torch.device("cpu"), "bf16")  # (this machine's: with or without bf16 instructions)
    assert (f"bigan: {slow_bf16}" in result.stdout) if slow_bf16 else "train.precision=bf16" not in result.stdout


def test_16_bit_autocast_on_a_cpu_without_16_bit_instructions_is_a_warning(monkeypatch):
    from bigan.backends import precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert "train.precision=bf16 on this CPU" in precision.cpu_note(cpu, "bf16") and "AMX-BF16" in \
        precision.cpu_note(cpu, "bf16")
    assert "AVX512-FP16 or AMX-FP16" in precision.cpu_note(cpu, "fp16")
    assert precision.cpu_note(cpu, "no") is None and precision.cpu_note(torch.device("cuda"), "bf16") is None
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert precision.cpu_note(cpu, "bf16") is None and precision.cpu_note(cpu, "fp16") is not None
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_fp16"})
    assert precision.cpu_note(cpu, "fp16") is None
    monkeypatch.setattr(precision, "cpu_flags", lambda: None)  # (not Linux: nothing known, nothing said)
    assert precision.cpu_note(cpu, "bf16") is None
    flags = precision.cpu_flags()  # this machine's, read for real
    assert flags is None or "fpu" in flags


@pytest.mark.parametrize("kind", ["diffaugment", "ada"])
def test_a_packed_d_sees_each_image_of_a_pack_augmented_on_its_own(kind):
    """Augmentation comes before packing, in D's step and its lazy R1: 8 copies of one image, packed 4 by 4, reach
    D's fromRGB as 4 images per pack that are not all alike (augmenting the packed 12-channel tensor would shift
    the 4 alike; by chance, with 81 shifts, about 1 in 81^3)."""
    from types import SimpleNamespace

    from bigan import families

    family = families.build(load_config(None, [
        *(f"--{k}={v}" for k, v in SMALL.items() if not k.startswith("augment.")), "--data.resolution=32",
        "--train.batch_size=8", "--loss.pack=4", "--stylegan2.mbstd_group=2", f"--augment.kind={kind}",
        *(["--augment.policy=translation"] if kind == "diffaugment" else ["--augment.p=1", "--augment.target=0"])]))
    nets = {k: n.module for k, n in family.networks().items()}
    step = SimpleNamespace(train=nets.get, penalty=nets.get, frozen=nets.get, fixed=nets.get,
                           device=torch.device("cpu"))
    seen = []
    nets["d"].b32.fromrgb.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    torch.manual_seed(0)
    image = torch.rand(1, 3, 32, 32).expand(8, 3, 32, 32) * 2 - 1
    real = {"image": image, "label": None}
    family.d_reg(step, real)
    family.d_loss(step, real)
    for x in seen[:2]:  # (D's reals in Dreg and in D; the fakes differ anyway)
        assert x.shape == (2, 12, 32, 32)
        for pack in x:
            parts = pack.reshape(4, 3, 32, 32)
            assert not all(torch.allclose(parts[0], parts[i]) for i in (1, 2, 3)), kind


def test_the_auto_rule_follows_the_official_config(monkeypatch):
    """stylegan2-ada-pytorch's --cfg=auto at 256 px on 8 GPUs: batch 64 (8 per GPU), gamma 0.0002 * 256^2 / 64
    = 0.2048, EMA half-life 20 kimg with ramp-up 0.05, minibatch-std groups of 4; on one GPU at 32 px:
    batch 32, gamma 0.0064. config.yaml records the values, not the rule."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    c = load_config(None, ["--model.arch=stylegan2", "--data.resolution=256", "--stylegan2.auto=true"])
    assert (c.train.batch_size, c.loss.r1, c.train.ema_kimg, c.train.ema_rampup, c.family_options.mbstd_group) == \
        (8, pytest.approx(0.2048), 20.0, 0.05, 4)
    assert c.to_dict()["stylegan2"]["auto"] is False and c.to_dict()["train"]["batch_size"] == 8
    monkeypatch.setenv("WORLD_SIZE", "1")
    c = load_config(None, ["--model.arch=stylegan2", "--data.resolution=32", "--stylegan2.auto=true"])
    assert (c.train.batch_size, c.loss.r1) == (32, pytest.approx(0.0064))
    # what is set stays set, as the official --batch and --gamma override --cfg=auto; the rest follows the
    # rule's own batch (16 at 256 px on one GPU), as the official --batch sets the batch only
    c = load_config(None, ["--model.arch=stylegan2", "--data.resolution=256", "--stylegan2.auto=true",
                           "--train.batch_size=4", "--train.ema_kimg=3"])
    assert (c.train.batch_size, c.loss.r1, c.train.ema_kimg, c.family_options.mbstd_group) == \
        (4, pytest.approx(0.0002 * 256 ** 2 / 16), 3.0, 4)
    # one learning rate given leaves the other to the rule; the mapping network is the official auto's 2 layers
    c = load_config(None, ["--model.arch=stylegan2", "--stylegan2.auto=true", "--train.g_lr=0.002"])
    assert (c.train.g_lr, c.train.d_lr, c.family_options.mapping_layers) == (0.002, 0.0025, 2)
    # gradient accumulation: the official batch is one optimizer step's, so gamma and the EMA see all of it
    monkeypatch.setenv("WORLD_SIZE", "8")
    c = load_config(None, ["--model.arch=stylegan2", "--data.resolution=256", "--stylegan2.auto=true",
                           "--train.grad_accum=4"])
    assert (c.train.batch_size, c.loss.r1, c.train.ema_kimg) == (2, pytest.approx(0.2048), 20.0)
    c = load_config(None, ["--model.arch=stylegan2", "--data.resolution=256", "--stylegan2.auto=true",
                           "--train.grad_accum=2", "--train.batch_size=8"])
    assert (c.loss.r1, c.train.ema_kimg) == (pytest.approx(0.2048), 20.0)
    with pytest.raises(ConfigError, match="train.grad_accum.*auto batch of 64"):  # (8 x 3 does not divide 64)
        load_config(None, ["--model.arch=stylegan2", "--data.resolution=256", "--stylegan2.auto=true",
                           "--train.grad_accum=3"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    # with packs, the auto minibatch-std group divides the packs D judges (24 / 4 = 6 packs: groups of 3)
    c = load_config(None, ["--model.arch=stylegan2", "--stylegan2.auto=true", "--train.batch_size=24",
                           "--loss.pack=4"])
    assert c.family_options.mbstd_group == 3
    c = load_config(None, ["--model.arch=stylegan2", "--data.resolution=1024", "--stylegan2.auto=true"])
    assert c.data.resolution == 1024 and c.train.batch_size == 4, "32 to 1024 px"
    with pytest.raises(ConfigError, match="data.resolution.*model.arch=dcgan"):
        load_config(None, ["--data.resolution=512"])


@pytest.mark.parametrize("override, key", [
    ("--data.resolution=48", "data.resolution"), ("--loss.pack=3", "loss.pack"),
    ("--stylegan2.mbstd_group=3", "stylegan2.mbstd_group"),
    ("--train.batch_size=24 --loss.pack=4 --stylegan2.mbstd_group=4", "stylegan2.mbstd_group"),  # (6 packs)
    ("--train.batch_size=2 --loss.pack=4", "loss.pack"),  # (a pack larger than the batch: no packs at all)
    ("--stylegan2.style_mixing=2", "stylegan2.style_mixing"),
    ("--stylegan2.pl_batch_shrink=0", "stylegan2.pl_batch_shrink"), ("--stylegan2.w_dim=0", "stylegan2.w_dim"),
    ("--stylegan2.channel_base=32", "stylegan2.channel_base"),  # (0 channels at 64 px)
    ("--loss.name=hinge", "loss.name"),  # (G's loss is the logistic one)
    ("--augment.p=0.5", "augment.p"),    # (ADA's starting p, and augment.kind is none)
])
def test_settings_it_cannot_train_with_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["--model.arch=stylegan2", *override.split()])


def test_augmentation_serves_every_noise_family(tiny_shards, tmp_path, env):
    """DiffAugment in front of DCGAN's D, with lazy R1 through it (its own Dreg step)."""
    run_dir = tmp_path / "run"
    train(tiny_args(tiny_shards, run_dir, **{"train.kimg": 0.032, "augment.kind": "diffaugment", "loss.r1": 1.0,
                                             "loss.r1_interval": 2}), env)
    state = torch.load(checkpoint.checkpoints(run_dir)[-1] / "custom_checkpoint_0.pkl", weights_only=False)
    assert state["phase_steps"] == {"D": 4, "Dreg": 2, "G": 4}
    assert "Penalty/R1" in _events(run_dir).Tags()["scalars"]
    from bigan import families

    images = torch.rand(4, 3, 32, 32) * 2 - 1
    for arch in ("dcgan", "resnet", "stylegan2"):  # each noise family puts what D sees through it
        family = families.build(load_config(None, [f"--model.arch={arch}", "--data.resolution=32", "--loss.pack=1",
                                                   "--augment.kind=diffaugment"]))
        assert family.pipe is not None and not torch.equal(family.augment(images), images), arch
    assert families.build(load_config(None, ["--model.arch=dcgan"])).augment(images) is images  # kind=none


@pytest.mark.parametrize("kind", ["diffaugment", "ada"])
def test_pix2pix_augments_an_image_and_its_input_alike(kind, tiny_pairs, tmp_path, env):
    """pix2pix's D judges an image beside its input: both take the same flip, shift, cut-out and colour
    (a pair of equal images stays equal, and is changed), and the next call draws anew; a run trains with it,
    logging ADA's p."""
    from bigan import families

    from bigan.augment import GEOMETRIC, AdaptiveAugment

    family = families.build(load_config(None, ["--model.arch=pix2pix", "--model.norm=instance", "--loss.r1=0",
                                               "--data.resolution=32", f"--augment.kind={kind}",
                                               *(["--augment.p=1", "--augment.target=0"] if kind == "ada" else [])]))
    family.to("cpu")
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    for device in devices:
        images = torch.rand(6, 3, 32, 32, device=device) * 2 - 1
        torch.manual_seed(0)
        seen, source = family.seen(images, images.clone())
        assert torch.equal(seen, source) and not torch.equal(seen, images), device
        again, _ = family.seen(images, images.clone())
        assert not torch.equal(again, seen), "each call draws anew"
        # distinct images: the moves alone are linear, so an image and its negative stay each other's negative
        family.pipe = AdaptiveAugment(GEOMETRIC) if kind == "ada" else DiffAugment("translation,cutout")
        seen, source = family.seen(images, -images)
        assert torch.equal(seen, -source) and not torch.equal(seen, images), device
        family.pipe = AdaptiveAugment() if kind == "ada" else DiffAugment()
    run_dir = tmp_path / "run"  # a run with R1 (its own Dreg step) through the paired augmentation
    train(tiny_args(tiny_pairs, run_dir, **{**PIX2PIX, "loss.r1": 1.0, "loss.r1_interval": 2},
                    **{"train.kimg": 0.032, "augment.kind": kind, **({"augment.p": 0.5} if kind == "ada" else {})}), env)
    tags = _events(run_dir).Tags()["scalars"]
    assert "Penalty/R1" in tags and ("Augment/p" in tags) == (kind == "ada")


def test_architecture_records_what_shapes_the_networks_so_a_resume_may_change_the_rest():
    from bigan import families

    arch = families.build(load_config(None, ["--model.arch=stylegan2"])).architecture()
    assert {"stylegan2.channel_base", "stylegan2.w_dim", "stylegan2.mapping_lr", "stylegan2.conv_clamp"} <= set(arch)
    assert not {"stylegan2.pl_weight", "stylegan2.style_mixing", "stylegan2.mbstd_group"} & set(arch)
