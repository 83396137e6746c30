"""Differentiable augmentation: DiffAugment's and ADA's transforms do what the papers say, R1
differentiates through them correctly, the ADA controller moves p by the stated step and resumes
exactly, and nothing reads a device value on the host."""
import copy
import io

import pytest
import torch
from torch.nn import functional as F

from bigan import augment
from bigan.augment import COLOUR, AdaController, AdaptiveAugment, DiffAugment
from bigan.losses import r1_penalty


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def images(n=8, channels=3, height=32, width=32, seed=0):
    return torch.rand(n, channels, height, width, generator=seeded(seed)) * 2 - 1


def distinct(n=8, size=32):
    """Images whose pixels all differ and are positive, so that where each one went can be told."""
    count = n * 3 * size * size
    return (torch.arange(count, dtype=torch.float32).reshape(n, 3, size, size) + 1) / count


ONE, ZERO = torch.tensor(1.0), torch.tensor(0.0)


# ---------------------------------------------------------------- ADA: identity, change, independence

@pytest.mark.parametrize("height, width", [(32, 32), (48, 40)])  # at 48 px an identity grid_sample is inexact
def test_p_zero_returns_the_images_bit_for_bit(height, width):
    x = images(height=height, width=width)
    assert torch.equal(AdaptiveAugment()(x, ZERO, seeded()), x)
    assert AdaptiveAugment()(x, 0.0) is x  # a Python 0 (ADA off) computes nothing


@pytest.mark.parametrize("shape, dtype", [((8, 3, 32, 32), torch.float32), ((4, 1, 16, 24), torch.float64)])
def test_p_one_changes_every_image_and_keeps_shape_and_dtype(shape, dtype):
    x = images(*shape).to(dtype)
    out = AdaptiveAugment()(x, ONE, seeded())
    assert out.shape == x.shape and out.dtype == dtype
    assert ((out - x).flatten(1).abs().amax(1) > 1e-3).all()


def test_samples_get_their_own_transforms():
    x = images(1).expand(6, -1, -1, -1)
    for out in (AdaptiveAugment()(x, ONE, seeded()), DiffAugment()(x, seeded())):
        flat = out.flatten(1)
        assert (torch.cdist(flat, flat) + torch.eye(6) > 1e-3).all(), "two samples got the same transform"


def test_a_seeded_generator_repeats_the_transforms():
    x = images()
    half = torch.tensor(0.5)
    calls = ((AdaptiveAugment(), lambda a, g: a(x, half, g)), (DiffAugment(), lambda a, g: a(x, g)))
    for aug, call in calls:
        assert torch.equal(call(aug, seeded(3)), call(aug, seeded(3)))
        assert not torch.equal(call(aug, seeded(3)), call(aug, seeded(4)))
        torch.manual_seed(5)
        first = call(aug, None)
        torch.manual_seed(5)
        assert torch.equal(call(aug, None), first), "without a generator, torch's default RNG is used"


def test_bad_arguments_say_what_to_do():
    with pytest.raises(ValueError, match="unknown jitter"):
        DiffAugment("color,jitter")
    with pytest.raises(ValueError, match="unknown transforms twirl"):
        AdaptiveAugment(("xflip", "twirl"))
    with pytest.raises(ValueError, match="RGB or grey"):
        AdaptiveAugment()(torch.zeros(2, 4, 16, 16), ONE)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        DiffAugment()(torch.zeros(3, 16, 16))


# ---------------------------------------------------------------- ADA: geometric transforms, one at a time

def test_xflip_alone_flips_or_keeps_each_image():
    x = images(16)
    out = AdaptiveAugment(["xflip"])(x, ONE, seeded())
    kept = (out - x).flatten(1).abs().amax(1) < 1e-5
    flipped = (out - x.flip(3)).flatten(1).abs().amax(1) < 1e-5
    assert (kept | flipped).all() and kept.any() and flipped.any()


def test_rotate90_alone_is_torch_rot90():
    x = images(16)
    out = AdaptiveAugment(["rotate90"])(x, ONE, seeded())
    turns = []
    for sample, rotated in zip(x, out):
        matches = [k for k in range(4) if torch.allclose(rotated, sample.rot90(k, dims=(1, 2)), atol=1e-5)]
        assert len(matches) == 1
        turns += matches
    assert len(set(turns)) >= 3


def _reflect(index, size):
    """grid_sample's reflection padding: the edge pixel repeats (-1 -> 0, size -> size - 1)."""
    index = index % (2 * size)
    return torch.where(index < size, index, 2 * size - 1 - index)


def test_integer_translation_moves_whole_pixels_up_to_an_eighth():
    x, size = distinct(8), 32
    out = AdaptiveAugment(["xint"])(x, ONE, seeded())
    reach = round(0.125 * size)
    shifts = []
    for sample, moved in zip(x, out):
        found = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)
                 if torch.allclose(moved, sample[:, _reflect(torch.arange(size) - dy, size)]
                                   [:, :, _reflect(torch.arange(size) - dx, size)], atol=1e-6)]
        assert len(found) == 1, "each image is one whole-pixel shift of at most 1/8, reflected at the edges"
        shifts += found
    assert any(shift != (0, 0) for shift in shifts)


def test_geometric_transforms_keep_a_constant_image_constant():
    """Reflection padding brings in no border: rotations and scalings of a flat image stay flat."""
    x = torch.full((8, 3, 32, 32), 0.3)
    out = AdaptiveAugment(augment.GEOMETRIC)(x, ONE, seeded())
    assert torch.allclose(out, x, atol=1e-5)


# ---------------------------------------------------------------- ADA: colour transforms, one at a time

@pytest.mark.parametrize("name", COLOUR)
def test_colour_transforms_keep_a_grey_image_grey(name):
    grey = images(16, channels=1).expand(-1, 3, -1, -1)
    out = AdaptiveAugment([name])(grey, ONE, seeded())
    assert torch.allclose(out, out[:, :1].expand_as(out), atol=1e-5), "channels drifted apart"
    if name == "brightness":  # one offset per image
        change = out - grey
        assert torch.allclose(change, change.mean((1, 2, 3), keepdim=True), atol=1e-5)
    elif name == "contrast":  # one gain per image, about 0 (mid-grey)
        gain = (out * grey).sum((1, 2, 3)) / grey.square().sum((1, 2, 3))
        assert torch.allclose(out, gain.view(-1, 1, 1, 1) * grey, atol=1e-5)
    elif name == "lumaflip":  # grey g becomes -g, or stays
        assert ((out - grey).flatten(1).abs().amax(1) < 1e-5).logical_xor(
            (out + grey).flatten(1).abs().amax(1) < 1e-5).all()
    else:  # hue turns about the grey axis, saturation scales away from it: grey does not move
        assert torch.allclose(out, grey, atol=1e-5)


def test_hue_keeps_luma_and_changes_colour():
    x = images(8)
    out = AdaptiveAugment(["hue"])(x, ONE, seeded())
    assert torch.allclose(out.mean(1), x.mean(1), atol=1e-5)
    assert ((out - x).flatten(1).abs().amax(1) > 1e-2).all()


# ---------------------------------------------------------------- DiffAugment's ops

def test_diffaugment_brightness_adds_one_offset_within_half():
    x = images(32)
    change = augment.brightness(x, seeded()) - x
    offset = change.mean((1, 2, 3))
    assert torch.allclose(change, offset.view(-1, 1, 1, 1), atol=1e-6)
    assert offset.abs().max() <= 0.5 and offset.std() > 0.1


def test_diffaugment_saturation_and_contrast_scale_about_the_mean():
    x = images(32)
    ops = ((augment.saturation, (1,), 0.0, 2.0), (augment.contrast, (1, 2, 3), 0.5, 1.5))
    for op, dims, low, high in ops:
        out = op(x, seeded())
        mean = x.mean(dims, keepdim=True)
        assert torch.allclose(out.mean(dims, keepdim=True), mean, atol=1e-5)
        factor = ((out - mean) * (x - mean)).sum((1, 2, 3)) / (x - mean).square().sum((1, 2, 3))
        assert torch.allclose(out, (x - mean) * factor.view(-1, 1, 1, 1) + mean, atol=1e-5)
        assert factor.min() >= low - 1e-6 and factor.max() <= high + 1e-6 and factor.std() > 0.1


def test_diffaugment_translation_moves_content_by_at_most_an_eighth_with_zeros():
    size = 32
    x = distinct(16, size)
    out = augment.translation(x, seeded())
    reach = size // 8
    padded = F.pad(x, [reach] * 4)
    shifts = []
    for sample, moved in zip(padded, out):
        found = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)
                 if torch.equal(moved, sample[:, reach - dy:reach - dy + size, reach - dx:reach - dx + size])]
        assert len(found) == 1, "each image is one whole-pixel shift of at most 1/8, zeros coming in"
        shifts += found
    assert len(set(shifts)) > 4


def test_diffaugment_cutout_zeroes_one_square_of_half_the_size():
    x = torch.ones(64, 3, 32, 32)
    zero = augment.cutout(x, seeded())[:, 0] == 0
    areas = zero.sum((1, 2))
    rows, cols = zero.any(2), zero.any(1)
    assert torch.equal(zero, rows[:, :, None] & cols[:, None, :]), "the zeros form one rectangle"
    assert rows.sum(1).max() <= 16 and cols.sum(1).max() <= 16
    assert areas.min() >= 8 * 8 and (areas == 16 * 16).any()  # clipped at an edge at worst to a quarter


def test_diffaugment_keeps_shape_and_dtype_at_any_size():
    for shape in ((2, 3, 16, 16), (3, 1, 24, 40)):
        x = torch.rand(*shape, dtype=torch.float64) * 2 - 1
        out = DiffAugment()(x, seeded())
        assert out.shape == x.shape and out.dtype == x.dtype


# ---------------------------------------------------------------- double backward and R1

def test_grid_sample_second_derivative_is_correct():
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, generator=seeded(), requires_grad=True)
    theta = torch.tensor([[[0.8, -0.5, 0.3], [0.6, 1.2, -0.4]]], dtype=torch.float64)  # reaches out: reflects
    grid = F.affine_grid(theta, [1, 2, 4, 7], align_corners=False)
    sample = lambda images: augment.grid_sample(images, grid)  # noqa: E731
    assert torch.autograd.gradcheck(sample, (x,))
    assert torch.autograd.gradgradcheck(sample, (x,))
    with pytest.raises(ValueError, match="constant grid"):
        augment.grid_sample(x, grid.requires_grad_(True))


def _discriminator():  # smooth: with a piecewise-linear D, R1 would not depend on the biases
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.SiLU(),
                               torch.nn.Conv2d(8, 8, 3, 2, 1), torch.nn.SiLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 1))


def _r1_grads(aug):
    d = _discriminator()
    reals = images(4).requires_grad_(True)
    penalty, _ = r1_penalty(reals, d(aug(reals)).squeeze(1))
    penalty.backward()
    return [p.grad for p in d.parameters()]


@pytest.mark.parametrize("aug", [lambda x: AdaptiveAugment()(x, ONE, seeded()),
                                 lambda x: DiffAugment()(x, seeded())], ids=["ada", "diffaugment"])
def test_r1_through_the_augmentation_reaches_every_weight(aug):
    *grads, last_bias = _r1_grads(aug)
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert last_bias is None  # D's last bias does not move ∇x D


def test_r1_through_ada_equals_torchs_own_double_backward(monkeypatch):
    ours = _r1_grads(lambda x: AdaptiveAugment()(x, ONE, seeded()))
    monkeypatch.setattr(augment, "grid_sample", lambda images, grid: F.grid_sample(
        images, grid, mode="bilinear", padding_mode="reflection", align_corners=False))
    try:
        torchs = _r1_grads(lambda x: AdaptiveAugment()(x, ONE, seeded()))
    except RuntimeError as error:  # older torch: grid_sample's backward is not differentiable
        pytest.skip(f"torch {torch.__version__} has no double backward for grid_sample: {error}")
    for a, b in zip(ours[:-1], torchs[:-1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the ADA controller

def _step(controller, logits, steps=1, batch_images=64, reduce=lambda t: t):
    for _ in range(steps):
        controller.accumulate(logits)
        controller.update(batch_images, reduce)


def test_controller_raises_p_while_d_is_overconfident_by_the_stated_step():
    ada = AdaController(target=0.6, interval=4, kimg=1)
    logits = torch.tensor([2.0] * 9 + [-1.0])  # E[sign] = 0.8 > 0.6
    _step(ada, logits, steps=3)
    assert torch.equal(ada.p, ZERO), "p moves every `interval` D steps only"
    _step(ada, logits)
    assert torch.equal(ada.p, torch.tensor(64 * 4 / 1000))  # batch * interval / (kimg * 1000)
    assert torch.allclose(ada.rt, torch.tensor(0.8))


def test_controller_lowers_p_otherwise_and_clamps_to_unit_range():
    step = 64 * 4 / 1000
    lower = AdaController(interval=4, kimg=1, p=0.5)
    _step(lower, torch.tensor([1.0, -1.0, -1.0, -1.0, -1.0]), steps=4)  # E[sign] = -0.6
    assert torch.equal(lower.p, torch.tensor(0.5) - torch.tensor(step))
    assert torch.allclose(lower.rt, torch.tensor(-0.6))
    top, bottom = AdaController(interval=4, kimg=1, p=0.9), AdaController(interval=4, kimg=1, p=0.1)
    _step(top, torch.ones(8), steps=4)
    _step(bottom, -torch.ones(8), steps=4)
    assert torch.equal(top.p, ONE) and torch.equal(bottom.p, ZERO)


def test_controller_sums_over_ranks_once_per_interval():
    calls = []

    def two_ranks(t):  # as if a second rank saw the same logits
        calls.append(t.shape)
        return 2 * t

    ada = AdaController(interval=2, kimg=1)
    _step(ada, torch.tensor([1.0, 1.0, 1.0, -1.0]), steps=4, reduce=two_ranks)
    assert calls == [torch.Size([2])] * 2
    assert torch.allclose(ada.rt, torch.tensor(0.5))


def _two_rank_run(save_after=None):
    """Two ranks of ADA (interval 4, target 0.6), rank 0 sure of the reals, rank 1 half wrong; with
    save_after=k a checkpoint after step k, mid-interval: the ranks' before_save, then every rank loads the
    one state the main process writes (Accelerate saves custom states on the main process only)."""
    ranks = [AdaController(target=0.6, interval=4, kimg=1, p=0.5) for _ in range(2)]
    signs = [[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, 1.0, 1.0]]

    def over_ranks(mean):
        def reduce(t):  # this call's tensor on every rank, stacked in rank order
            stack = torch.stack([torch.stack([c.sign_sum, c.count]) for c in ranks])
            return stack.mean(0) if mean else stack.sum(0)
        return reduce

    for k in range(4):
        for rank, c in enumerate(ranks):
            c.accumulate(torch.full((8,), signs[rank][k]))
        total = over_ranks(mean=False)(None)
        for c in ranks:
            c.update(16, lambda t: total)
        if save_after == k:
            mean = over_ranks(mean=True)(None)
            for c in ranks:
                c.before_save(lambda t: mean)
            saved = copy.deepcopy(ranks[0].state_dict())
            for c in ranks:
                c.load_state_dict(saved)
    return [(float(c.p), float(c.rt)) for c in ranks]


def test_a_checkpoint_mid_interval_leaves_adas_step_as_without_it():
    """Each rank's partial sums of an unfinished interval are its own: a resume that gave every rank the
    main process's would count rank 0's signs twice (r_t 1.0 instead of 0.5 here, p moving up, not down)."""
    uninterrupted = _two_rank_run()
    assert uninterrupted[0] == uninterrupted[1] and uninterrupted[0][1] == 0.5
    for k in (0, 1, 2):
        assert _two_rank_run(save_after=k) == uninterrupted


def test_a_resume_on_other_ranks_keeps_the_intervals_sum(monkeypatch):
    """An elastic resume: 2 ranks saved the mean of their partial sums; each of 4 ranks then holds a quarter
    of the interval's sum, so the sum over the 4 is the interval's."""
    ada = AdaController(interval=4, kimg=1)
    monkeypatch.setattr(augment, "_world_size", lambda: 2)
    ada.accumulate(torch.ones(6))
    ada.update(8)
    saved = ada.state_dict()
    monkeypatch.setattr(augment, "_world_size", lambda: 4)
    resumed = AdaController(interval=4, kimg=1)
    resumed.load_state_dict(saved)
    assert 4 * float(resumed.count) == 2 * 6 and 4 * float(resumed.sign_sum) == 2 * 6


def test_a_fixed_p_sums_no_signs():
    """augment.target=0 keeps p where augment.p sets it: D's logits on reals are not summed, so nothing grows
    over the run for a later resume with a target to inherit."""
    from bigan import families
    from bigan.config import load_config

    family = families.build(load_config(None, ["--augment.kind=ada", "--augment.target=0", "--augment.p=0.3"]))
    family.observe_reals(torch.ones(8))
    assert float(family.ada.count) == 0 and float(family.ada.sign_sum) == 0
    family = families.build(load_config(None, ["--augment.kind=ada"]))
    family.observe_reals(torch.ones(8))
    assert float(family.ada.count) == 8


def _before_save_on_rank(rank, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ada = AdaController(interval=4, kimg=1)
    ada.accumulate(torch.full((4,), 1.0 if rank == 0 else -1.0))
    ada.update(8)
    ada.before_save()  # its default: the default process group
    torch.save(ada.state_dict(), f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_before_save_takes_the_mean_over_the_process_group(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_before_save_on_rank, args=(port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        state = torch.load(tmp_path / f"{rank}.pt")
        assert float(state["sign_sum"]) == 0.0 and float(state["count"]) == 4.0 and state["steps"] == 1


def test_controller_without_logits_leaves_p():
    ada = AdaController(interval=1, kimg=1, p=0.3)
    ada.update(64)
    assert torch.equal(ada.p, torch.tensor(0.3)) and torch.equal(ada.rt, ZERO)
    with pytest.raises(ValueError, match="interval >= 1"):
        AdaController(interval=0)


def test_controller_resumes_exactly():
    logits = [torch.randn(16, generator=seeded(i)) + (1.5 if i < 12 else -0.5) for i in range(20)]  # up, down
    first = AdaController(interval=4, kimg=5)
    for step in logits[:6]:  # stops mid-interval, with sums pending
        _step(first, step)
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)
    resumed = AdaController(interval=4, kimg=5)
    resumed.load_state_dict(torch.load(io.BytesIO(saved.getvalue())))
    ps = []
    for step in logits[6:]:
        _step(first, step)
        _step(resumed, step)
        assert torch.equal(first.p, resumed.p) and torch.equal(first.rt, resumed.rt)
        ps.append(first.p)
    assert max(ps) > ps[-1] > 0, "p rose, then fell"


# ---------------------------------------------------------------- no host reads

def test_nothing_reads_the_device_on_the_host(count_host_reads):
    counting, reads = count_host_reads
    x, ada, diff, controller = images(), AdaptiveAugment(), DiffAugment(), AdaController(interval=2, p=0.5)
    ada(x, controller.p)  # the first call may set things up (the colour constants for this device)
    counting[0] = True
    for _ in range(2):
        ada(x, controller.p)
        diff(x)
        controller.accumulate(torch.randn(8))
        controller.update(8)
    counting[0] = False
    assert reads == [], f"host reads: {reads}"
