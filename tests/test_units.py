"""Losses against hand-computed numbers; spectral norm, EMA, models and config behaviour."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from bigan import losses
from bigan.config import Config, ConfigError, config_from_dict, load_config
from bigan.ema import EMA
from bigan.models import build_models
from bigan.models.layers import spectral_norm, update_spectral_norms

REAL, FAKE = torch.tensor([0.0, 2.0]), torch.tensor([-1.0])
LN2, SP_M2, SP_M1, SP_1 = math.log(2), math.log1p(math.exp(-2)), math.log1p(math.exp(-1)), math.log1p(math.e)


@pytest.mark.parametrize("name, real_term, fake_term", [
    ("bce", (LN2 + SP_M2) / 2, SP_M1),      # softplus(-x) on reals, softplus(x) on fakes
    ("lsgan", 1.0, 1.0),                     # mean((x-1)^2) = (1 + 1)/2; (-1)^2
    ("hinge", 0.5, 0.0),                     # mean(relu(1-x)) = (1 + 0)/2; relu(1 + -1)
    ("wgan", -1.0, -1.0),                    # -mean(x); mean(x)
])
def test_d_loss_values_and_balance(name, real_term, fake_term):
    loss, stats = losses.d_loss(name, REAL, FAKE)
    assert loss.item() == pytest.approx(real_term + fake_term, abs=1e-6)
    assert stats["Loss/D_real"].item() == pytest.approx(real_term, abs=1e-6)
    weighted, _ = losses.d_loss(name, REAL, FAKE, r=0.25)
    assert weighted.item() == pytest.approx(2 * (0.25 * real_term + 0.75 * fake_term), abs=1e-6)


@pytest.mark.parametrize("name, expected", [
    ("bce", (SP_1 + SP_M1) / 2),   # non-saturating: softplus(-x) at x = -1, 1
    ("lsgan", 2.0),                # ((-1-1)^2 + (1-1)^2) / 2
    ("hinge", 0.0), ("wgan", 0.0),  # -mean(x)
])
def test_g_loss_values(name, expected):
    loss, _ = losses.g_loss(name, torch.tensor([-1.0, 1.0]))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_r1_and_gradient_penalty_on_linear_critics():
    x = torch.randn(2, 1, 2, 2, requires_grad=True)
    penalty, stats = losses.r1_penalty(x, (3 * x).sum(dim=(1, 2, 3)))  # grad = 3 everywhere: |g|^2 = 9 * 4
    assert penalty.item() == pytest.approx(36.0) and "Penalty/R1" in stats

    def critic(c):
        return lambda x, y=None: (c * x).sum(dim=(1, 2, 3))  # |grad| = c * sqrt(4) = 2c

    real, fake = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    assert losses.gradient_penalty(critic(0.5), real, fake)[0].item() == pytest.approx(0.0, abs=1e-6)
    assert losses.gradient_penalty(critic(1.0), real, fake)[0].item() == pytest.approx(1.0, abs=1e-6)


def test_packed_penalties_take_the_norm_over_each_pack():
    """With loss.pack=m, D's input is a pack of m images: R1 and GP norms run over the whole pack."""
    x = torch.randn(4, 1, 2, 2, requires_grad=True)
    logits = (3 * x).sum(dim=(1, 2, 3)).reshape(2, 2).sum(1)  # 2 packs of 2; grad = 3 everywhere
    assert losses.r1_penalty(x, logits, pack=2)[0].item() == pytest.approx(9 * 4 * 2)  # |g|^2 over 8 pixels

    def packed_critic(c):
        return lambda x, y=None: (c * x).sum(dim=(1, 2, 3)).reshape(-1, 2).sum(1)  # |grad| = c * sqrt(8)

    real, fake = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    assert losses.gradient_penalty(packed_critic(8 ** -0.5), real, fake, pack=2)[0].item() == pytest.approx(0, abs=1e-6)
    assert losses.gradient_penalty(packed_critic(0.5), real, fake)[0].item() == pytest.approx(0, abs=1e-6)  # per image


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
def test_packed_discriminators_give_one_logit_per_pack(arch, resolution):
    g, d = build_models(arch, resolution, z_dim=16, g_channels=4, d_channels=4, d_norm="spectral", pack=2)
    images = g(torch.randn(6, 16))
    assert d(images).shape == (3, 1)
    # a pack is consecutive samples: the logit of pack 1 depends on samples 2 and 3 only
    changed = images.detach().clone()
    changed[[0, 1, 4, 5]] = 0
    assert torch.allclose(d(images)[1], d(changed)[1], atol=1e-6) and not torch.allclose(d(images)[0], d(changed)[0])
    with pytest.raises(ValueError, match="loss.pack=2"):
        d(images[:5])


def test_lazy_regularization_adjusts_adam():
    lr, betas = losses.lazy_adam(2e-4, (0.0, 0.99), 16)
    assert lr == pytest.approx(2e-4 * 16 / 17) and betas == pytest.approx((0.0, 0.99 ** (16 / 17)))
    assert losses.lazy_adam(2e-4, (0.5, 0.999), 1) == (2e-4, (0.5, 0.999))


def test_ema_half_life_and_rampup():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, half_life_kimg=10, rampup=0.0)
    assert ema.beta(images_seen=10**6, batch_images=10_000) == pytest.approx(0.5)
    ramped = EMA(model, half_life_kimg=10, rampup=0.05)
    assert ramped.beta(images_seen=1000, batch_images=50) == pytest.approx(0.5)  # half-life 0.05 * 1000 images
    with torch.no_grad():
        model.weight.add_(2.0)
    before = ema.model.weight.clone()
    ema.update(model, images_seen=10**6, batch_images=10_000)
    assert torch.allclose(ema.model.weight, (before + model.weight) / 2)


def test_spectral_norm_steps_once_per_call_and_stays_fp32_under_autocast():
    torch.manual_seed(0)
    layer = spectral_norm(torch.nn.Linear(8, 6))
    for _ in range(50):
        update_spectral_norms(layer)
        layer(torch.randn(3, 8))  # the forward after an update runs the one due power iteration
    assert torch.linalg.matrix_norm(layer.weight.detach(), 2).item() == pytest.approx(1.0, abs=1e-4)
    u = layer.parametrizations.weight[0]._u.clone()
    layer(torch.randn(3, 8))  # other forwards only read u, v
    assert torch.equal(u, layer.parametrizations.weight[0]._u)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.weight.dtype == torch.float32


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
def test_models_cover_32_to_256_px_with_conditioning(arch, resolution):
    g, d = build_models(arch, resolution, z_dim=16, g_channels=4, d_channels=4, num_classes=3)
    y = torch.tensor([0, 2])
    images = g(torch.randn(2, 16), y)
    assert images.shape == (2, 3, resolution, resolution) and images.abs().max() <= 1
    assert d(images, y).shape == (2, 1)


def test_resnet_d_and_unnormalized_dcgan_d_do_not_depend_on_batch_split():
    x = torch.randn(6, 3, 32, 32)
    for d in (build_models("resnet", 32, 8, 4, 4)[1], build_models("dcgan", 32, 8, 4, 4, d_norm="none")[1]):
        assert torch.allclose(d(x)[:3], d(x[:3]), atol=1e-6)


def test_config_precedence_cli_over_file_over_defaults(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("train:\n  batch_size: 32\n  kimg: 5\nmodel:\n  arch: resnet\n")
    config = load_config(preset, ["--train.batch_size=16", "--train.g_betas=[0.0, 0.99]"])
    assert (config.train.batch_size, config.train.kimg, config.model.arch) == (16, 5.0, "resnet")
    assert config.train.g_betas == [0.0, 0.99] and config.train.grad_accum == 1
    with pytest.raises(ConfigError, match="preset.yaml: expected sections"):
        preset.write_text("- just a list\n")
        load_config(preset)
    with pytest.raises(ConfigError, match="train.precision: must be one of"):
        load_config(None, ["--train.precision=fp8"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"loss.pack: must divide train.batch_size \(64\)"):
        load_config(None, ["--loss.pack=3"])
    with pytest.raises(ConfigError, match="loss.pack: packing is for unconditional models"):
        load_config(None, ["--loss.pack=2", "--model.num_classes=10"])


@pytest.mark.parametrize("overrides, pack", [
    ([], 4),                                      # unconditional noise model: packs of 4 (bench/modes.py)
    (["--model.num_classes=10"], 1),              # a pack of samples has no one label
    (["--model.arch=pix2pix"], 1),                # D judges (input, output) pairs
    (["--train.batch_size=6"], 2), (["--train.batch_size=5"], 1),  # what divides the micro-batch
    (["--loss.pack=1"], 1), (["--loss.pack=2"], 2),  # the user's choice stands
])
def test_auto_pack_is_fixed_at_load_and_recorded(overrides, pack):
    config = load_config(None, overrides)
    assert config.loss.pack == pack
    saved = yaml.safe_load(config.to_yaml())
    assert saved["loss"]["pack"] == pack  # config.yaml holds the value, not "auto"
    assert config_from_dict(saved).loss.pack == pack


def test_auto_pack_is_the_default_and_resolved_wherever_a_config_is_built():
    assert yaml.safe_load(Config().to_yaml())["loss"]["pack"] == 0  # the dataclass default is "auto"
    assert config_from_dict({}).loss.pack == 4 and load_config().loss.pack == 4


def test_dry_run_prints_the_resolved_config():
    out = subprocess.run([sys.executable, "-m", "bigan.train", "--dry-run", "--loss.name=hinge"],
                         capture_output=True, text=True, check=True).stdout
    assert "name: hinge" in out and "batch_size: 64" in out and "shards: demo" in out


def test_a_resume_takes_its_family_keys_from_the_runs_own_config(tmp_path, capsys):
    """--run.resume=latest with a key of the run's family (its config.yaml says model.arch=stylegan2) and a
    resolution DCGAN, the default arch, refuses: read against the run's config, not the defaults (it was
    "unknown config key 'stylegan2.style_mixing'")."""
    from bigan.train import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(load_config(None, ["--model.arch=stylegan2"]).to_yaml())
    assert main([f"--run.dir={run_dir}", "--run.resume=latest", "--stylegan2.style_mixing=0.5",
                 "--data.resolution=512", "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["model"]["arch"], printed["stylegan2"]["style_mixing"], printed["data"]["resolution"]) == \
        ("stylegan2", 0.5, 512)
    # run.dir and run.resume set in the preset (the run's config.yaml says another dir and no resume: it was
    # moved, and resume was added to the preset after its first start): the preset's
    moved = tmp_path / "moved"
    run_dir.rename(moved)
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump({"run": {"dir": str(moved), "resume": "latest"}}))
    assert main(["--config", str(preset), "--stylegan2.style_mixing=0.25", "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["run"]["dir"], printed["run"]["resume"], printed["stylegan2"]["style_mixing"]) == \
        (str(moved), "latest", 0.25)
    # no config.yaml there (a first start with run.resume=latest): the defaults', which have no such section
    assert main([f"--run.dir={tmp_path / 'new'}", "--run.resume=latest", "--stylegan2.style_mixing=0.5",
                 "--dry-run"]) == 2
    assert "unknown config key 'stylegan2.style_mixing'" in capsys.readouterr().err


def test_a_stale_deepspeed_build_lock_is_removed_and_a_live_one_kept(tmp_path, monkeypatch, capsys):
    """A killed JIT build leaves its lock, on which every later DeepSpeed launch would wait forever."""
    import os
    import time

    from bigan.backends import ds_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (folder,) = ds_build.build_dirs()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "shm.o").write_bytes(b"")
    (folder / "lock").write_text("")
    long_ago = time.time() - 3600
    for p in folder.iterdir():
        os.utime(p, (long_ago, long_ago))
    assert ds_build.clear_stale_locks(stale_s=600) == [folder / "lock"]
    assert not (folder / "lock").exists() and "removed a stale DeepSpeed build lock" in capsys.readouterr().out
    (folder / "lock").write_text("")  # a build that is alive (just touched its files)
    assert ds_build.clear_stale_locks(stale_s=600) == [] and (folder / "lock").exists()


def test_deepspeed_builds_with_the_environments_ninja_activated_or_not(tmp_path, monkeypatch):
    """Two ninjas (the environment's and the system's) hash the same command differently: launches with
    and without the environment activated would each rebuild DeepSpeed's op (a minute or two each)."""
    import shutil

    from bigan.backends import ds_build

    own = Path(sys.executable).parent / "ninja"
    if not own.is_file():
        pytest.skip("no ninja in this environment (DeepSpeed installs one)")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # not activated
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert ds_build.prepare_builds() == tmp_path
    assert shutil.which("ninja") == str(own)
    ds_build.prepare_builds()
    assert os.environ["PATH"].split(os.pathsep).count(str(own.parent)) == 1


@pytest.mark.parametrize("norm", ["batch", "instance"])
@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
def test_pix2pix_unet_and_patchgan_shapes(resolution, norm):
    g, d = build_models("pix2pix", resolution, z_dim=16, g_channels=4, d_channels=4, norm=norm)
    x = torch.rand(2, 3, resolution, resolution) * 2 - 1
    out = g(x, x)
    assert out.shape == x.shape and out.abs().max() <= 1
    patches = resolution // 8 - 2  # 70x70 PatchGAN: 30x30 logits at 256 px
    assert d(out, x).shape == (2, 1, patches, patches)
    assert len(g.downs) == len(g.ups) == resolution.bit_length() - 1  # down to 1x1 and back


def test_patchgan_sees_70_pixels_and_the_unet_passes_skips():
    g, d = build_models("pix2pix", 128, z_dim=16, g_channels=4, d_channels=4)
    d.eval()  # BatchNorm with running statistics: no coupling across the image through batch statistics
    image = torch.zeros(1, 3, 128, 128, requires_grad=True)
    logits = d(image, torch.zeros(1, 3, 128, 128))
    logits[0, 0, 7, 7].backward()
    rows, cols = image.grad.abs().sum((0, 1)).nonzero().unbind(1)
    assert rows.max() - rows.min() + 1 <= 70 and cols.max() - cols.min() + 1 <= 70
    assert rows.max() - rows.min() + 1 >= 60  # the receptive field, less the border taps that multiply zero padding
    # dropout is G's only noise: two training forwards differ, eval-mode forwards agree
    x = torch.rand(2, 3, 128, 128)
    assert not torch.equal(g.train()(x, x), g(x, x))
    assert torch.equal(g.eval()(x, x), g(x, x))
    # the outermost skip: a change in one input pixel reaches the output through the last decoder block
    x2 = x.clone()
    x2[:, :, 0, 0] += 1
    assert (g(x2, x2) - g(x, x)).abs()[:, :, :4, :4].sum() > 0


def test_l1_term_value_and_gradient():
    fake = torch.tensor([[0.5, -0.25], [1.0, 0.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.25], [0.0, 0.5]])
    l1, stats = losses.l1_term(fake, target)
    assert l1.item() == pytest.approx((0.5 + 0.5 + 1.0 + 0.5) / 4) and stats["Loss/L1"] == l1
    (100 * l1).backward()
    assert torch.equal(fake.grad, 100 * torch.sign(fake - target).detach() / 4)


def test_pix2pix_settings_that_cannot_work_are_refused():
    for override, key in (("--model.num_classes=3", "model.num_classes"), ("--loss.pack=2", "loss.pack"),
                          ("--eval.metrics=fid,pr", "eval.metrics")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, ["--model.arch=pix2pix", override])
    with pytest.raises(ConfigError, match="l1 and psnr compare outputs with targets"):
        load_config(None, ["--eval.metrics=l1"])


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_resize_upsampling_generator_trains_shapes_and_round_trips_through_export(resolution, tmp_path):
    """model.g_upsample=resize: no transposed conv after the 4x4 input, the right size, and
    bigan-sample's loader rebuilds the same G from the exported config."""
    from bigan.checkpoint import export_generator
    from bigan.sample import load_generator

    model = load_config(None, ["--model.g_upsample=resize", "--model.g_channels=4", "--model.z_dim=16"]).to_dict()["model"]
    g, _ = build_models("dcgan", resolution, 16, 4, 4, g_upsample="resize")
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in [*g.ups.modules(), *g.output.modules()])
    assert sum(isinstance(m, torch.nn.Conv2d) for m in g.modules()) == len(g.ups) + 1
    z = torch.randn(3, 16)
    g.eval()
    out = g(z)
    assert out.shape == (3, 3, resolution, resolution)
    export_generator(tmp_path, g, None, model, {"resolution": resolution})
    rebuilt, config = load_generator(tmp_path / "generator.safetensors", ema=False)
    assert config["g_upsample"] == "resize" and torch.equal(rebuilt(z), out)


def test_stop_agreement_checks_every_couple_of_seconds_from_any_starting_step(tmp_path):
    """A resumed run starts at a large step after seconds of start-up: the pace of its iterations, not
    start-up time over the step number, sets when the STOP file is next looked at."""
    import time
    from types import SimpleNamespace

    from bigan.training.stops import StopAgreement

    one = SimpleNamespace(num_processes=1, is_main_process=True, device=torch.device("cpu"))
    stops = StopAgreement(one, tmp_path, period_s=0.05)
    time.sleep(0.3)  # start-up
    step = 200_001   # resumed far into a run
    assert not stops.check(step)
    (tmp_path / "STOP").touch()
    seen_at = None
    for step in range(step + 1, step + 400):
        time.sleep(0.002)  # an iteration
        if stops.check(step):
            seen_at = step
            break
    assert seen_at is not None and seen_at - 200_001 <= 60, seen_at  # ~0.05 s of iterations, not 10,000 of them
    stops.restart()  # (a roll-back moves the step back: the next check is at once)
    stops.agreed = False
    assert stops.check(5)


def test_every_kind_of_draw_differs_between_ranks_and_repeats_on_the_same_rank():
    """What bigan.seeding does for each rank, for every draw the families make with torch's generators:
    latents and random classes (family.draw), WGAN-GP's mixing weights, dropout masks."""
    from bigan import families, seeding
    from bigan.config import load_config

    family = families.build(load_config(None, ["--model.num_classes=10", "--loss.pack=1"]))

    def draws(rank):
        seeding.seed_rank(0, rank, seeding.FRESH)
        z, y = family.draw(64, torch.device("cpu"))
        alpha = torch.rand(64, 1, 1, 1)  # as losses.gradient_penalty draws it
        mask = torch.nn.functional.dropout(torch.ones(64, 16), 0.5, training=True)
        return z, y, alpha, mask

    first, again, other = draws(0), draws(0), draws(1)
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b) and not torch.equal(a, c)



@pytest.mark.parametrize("case", ["above", "below", "inf", "nan", "a None grad", "no grads"])
def test_gradient_norm_and_clip_fall_back_on_torch_before_2_6(monkeypatch, case):
    """torch < 2.6 (the pyproject allows 2.4) has no get_total_norm / clip_grads_with_norm_: the fallbacks
    give the norm and clipped gradients of clip_grad_norm_ (in every torch), whether the norm is above
    max_norm (scaled down), below it (left as they are), non-finite, or there is nothing to clip."""
    from bigan.backends import plain

    params = [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(3)]
    scale = {"above": 10.0, "below": 0.01}.get(case, 1.0)
    grads = [torch.randn(3, 4) * scale for _ in params]
    if case in ("inf", "nan"):
        grads[1][0, 2] = float(case)
    if case == "a None grad":
        grads[2] = None
    if case == "no grads":
        grads = [None] * len(params)

    def fresh():
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()

    fresh()
    want_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    clipped = [None if p.grad is None else p.grad.clone() for p in params]
    fresh()
    monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)
    monkeypatch.delattr(torch.nn.utils, "clip_grads_with_norm_", raising=False)
    norm = plain.total_norm([p.grad for p in params if p.grad is not None])
    torch.testing.assert_close(norm, want_norm, equal_nan=True)
    plain.clip_with_norm_(params, 1.0, norm)
    for p, c in zip(params, clipped):
        if c is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, c, equal_nan=True)
    if case == "below":
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads)), "a norm under max_norm scales nothing"


@pytest.mark.parametrize("arch", ["dcgan", "stylegan2"])
def test_each_d_step_takes_new_reals_and_lazy_r1_the_last_d_steps(arch):
    """loss.d_steps=2 with lazy R1: the iteration takes every micro-batch it needs from the stream up front, each D
    step gets its own grad_accum fresh micro-batches, Dreg the last D step's, the G phases none; on iterations
    where Dreg is not due it takes only the D steps' batches."""
    from types import SimpleNamespace

    from bigan import families
    from bigan.training.steps import Steps

    family = families.build(load_config(None, [f"--model.arch={arch}", "--data.resolution=32", "--loss.d_steps=2",
                                               "--loss.r1=1", "--loss.r1_interval=2", "--train.grad_accum=2"]))
    steps = Steps.__new__(Steps)
    steps.phases, steps.grad_accum, steps.micro_batch_images = family.phases, 2, 1
    steps.state = SimpleNamespace(step=0)
    steps.nonfinite = SimpleNamespace(end_iteration=lambda: None)
    ran, counted = [], []
    steps.run = lambda phase, reals: ran.append((phase.name, reals))
    steps._update_emas = counted.append
    steps._next_batch = next
    stream = iter(range(100))
    for _ in range(2):
        steps.iteration(stream)
    g = [name for name, _ in ran if name.startswith("G")]
    assert g and all(reals is None for name, reals in ran if name.startswith("G"))
    assert [(n, r) for n, r in ran if not n.startswith("G")] == [
        ("D", [0, 1]), ("D", [2, 3]), ("Dreg", [2, 3]),  # iteration 0: Dreg due, on the second D step's reals
        ("D", [4, 5]), ("D", [6, 7])]                    # iteration 1: not due
    assert counted == [4, 4], "images seen: the D steps' micro-batches (Dreg's are the same ones)"
