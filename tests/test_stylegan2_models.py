"""StyleGAN2 networks: the official architecture (names, shapes, counts), exact FIR resampling, the
training-time behaviours (w_avg, truncation, noise, mixing, double backward) and bf16 autocast."""
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from bigan.models.stylegan2 import (Discriminator, FullyConnected, Generator, bias_act, conv2d_resample,
                                    fir_filter, mix_styles, modulated_weight, path_lengths, upfirdn2d)


def small_g(num_classes=0, resolution=32, **kw):
    return Generator(16, num_classes, resolution, w_dim=32, channel_base=512, channel_max=32, **kw)


def small_d(num_classes=0, resolution=32, **kw):
    return Discriminator(resolution, num_classes, channel_base=512, channel_max=32, **kw)


# ------------------------------------------------ the official layer shapes (training/networks.py)

def official_g_shapes(res, cbase, cmax=512, z_dim=512, w_dim=512, c_dim=0, map_layers=8):
    """{name: shape} of the official Generator's parameters, transcribed from its layer definitions:
    FullyConnectedLayer: weight [out, in], bias [out]; SynthesisLayer: affine FC(w_dim -> cin), weight
    [cout, cin, 3, 3], noise_strength [] (here [1]: DeepSpeed refuses 0-dim weights), bias [cout]; ToRGBLayer: affine, weight [3, cin, 1, 1], bias [3];
    SynthesisBlock: const [c, 4, 4] at 4x4 else conv0 (up), then conv1 and (architecture 'skip') torgb."""
    ch = {r: min(cbase // r, cmax) for r in [2**i for i in range(1, int(math.log2(res)) + 1)]}
    p = {}

    def fc(name, i, o):
        p[f"{name}.weight"], p[f"{name}.bias"] = (o, i), (o,)

    def modulated(name, i, o, k):
        fc(f"{name}.affine", w_dim, i)
        p[f"{name}.weight"], p[f"{name}.bias"] = (o, i, k, k), (o,)
        if k == 3:
            p[f"{name}.noise_strength"] = (1,)

    for r in [2**i for i in range(2, int(math.log2(res)) + 1)]:
        if r == 4:
            p["synthesis.b4.const"] = (ch[4], 4, 4)
        else:
            modulated(f"synthesis.b{r}.conv0", ch[r // 2], ch[r], 3)
        modulated(f"synthesis.b{r}.conv1", ch[r], ch[r], 3)
        modulated(f"synthesis.b{r}.torgb", ch[r], 3, 1)
    if c_dim:
        fc("mapping.embed", c_dim, w_dim)
    for i in range(map_layers):
        fc(f"mapping.fc{i}", (z_dim + (w_dim if c_dim else 0)) if i == 0 else w_dim, w_dim)
    return p


def official_d_shapes(res, cbase, cmax=512, c_dim=0):
    """{name: shape} of the official 'resnet' Discriminator: Conv2dLayer weight [cout, cin, k, k] (+ bias
    [cout]); block r: fromrgb 1x1 (top only), conv0 3x3, conv1 3x3, skip 1x1 without bias; epilogue b4:
    conv (c + 1 mbstd channel -> c), fc (16c -> c), out (c -> cmap_dim or 1); with classes, mapping =
    MappingNetwork(z_dim=0, c_dim, w_dim=cmap_dim=c4) with its default 8 layers."""
    ch = {r: min(cbase // r, cmax) for r in [2**i for i in range(1, int(math.log2(res)) + 1)]}
    p = {}

    def layer(name, i, o, k, bias=True):
        p[f"{name}.weight"] = (o, i, k, k)
        if bias:
            p[f"{name}.bias"] = (o,)

    for r in [2**i for i in range(int(math.log2(res)), 2, -1)]:
        if r == res:
            layer(f"b{r}.fromrgb", 3, ch[r], 1)
        layer(f"b{r}.conv0", ch[r], ch[r], 3)
        layer(f"b{r}.conv1", ch[r], ch[r // 2], 3)
        layer(f"b{r}.skip", ch[r], ch[r // 2], 1, bias=False)
    cmap = ch[4] if c_dim else 0
    if c_dim:
        p["mapping.embed.weight"], p["mapping.embed.bias"] = (cmap, c_dim), (cmap,)
        for i in range(8):
            p[f"mapping.fc{i}.weight"], p[f"mapping.fc{i}.bias"] = (cmap, cmap), (cmap,)
    layer("b4.conv", ch[4] + 1, ch[4], 3)
    p["b4.fc.weight"], p["b4.fc.bias"] = (ch[4], 16 * ch[4]), (ch[4],)
    p["b4.out.weight"], p["b4.out.bias"] = (cmap or 1, ch[4]), (cmap or 1,)
    return p


def shapes(model):
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


# Expected counts, by hand from the shapes above (w_dim 512; SynthesisLayer(i -> o) = 513i + 9io + o + 1,
# ToRGB(i) = 516i + 3, D conv(i -> o, k) = k²io + o):
#   paper256 (cbase 16384: 512 up to 32 px, then 256, 128, 64), G: mapping 8 · (512² + 512) = 2,101,248;
#     b4 = const 8,192 + conv 2,622,465 + torgb 264,195; b8-b32: 3 · 5,509,125; b64 2,296,069;
#     b128 705,669; b256 242,245 -> 24,767,458.
#   paper256 D: b256 119,232 (fromRGB 256); b128 475,520; b64 1,901,312; b32-b8 3 · 4,981,760;
#     epilogue conv 2,364,416 + fc 4,194,816 + out 513 -> 24,001,089.
#   cifar (train.py: fmaps=1 -> cbase 32768, map=2, 32 px, 10 classes), G: mapping embed 5,632 + fc0
#     (1024 -> 512) 524,800 + fc1 262,656; synthesis 2,894,852 + 3 · 5,509,125 -> 20,215,315.
#   cifar, 'resnet' D (the official cifar config switches D to 'orig', which drops the three 262,144
#     skips: 23,089,664): b32 4,983,808 + 2 · 4,981,760 + mapping 5,632 + 8 · 262,656 + epilogue with
#     out 512 -> 512 (262,656) -> 23,876,096.
#   stylegan2 (cbase 32768, 1024 px; 512 channels up to 64 px, then 256 ... 32): G 30,370,060 (the
#     count remembered from the official FFHQ-1024 G's summary, not re-checked here); D 29,012,513.
OFFICIAL = {  # name: (G kwargs, D kwargs, G params, D params)
    "paper256": (dict(resolution=256, channel_base=16384), dict(resolution=256, channel_base=16384),
                 24_767_458, 24_001_089),
    "cifar": (dict(resolution=32, channel_base=32768, num_classes=10, mapping_layers=2),
              dict(resolution=32, channel_base=32768, num_classes=10), 20_215_315, 23_876_096),
    "stylegan2": (dict(resolution=1024, channel_base=32768), dict(resolution=1024, channel_base=32768),
                  30_370_060, 29_012_513),
}


@pytest.mark.parametrize("config", OFFICIAL)
def test_parameters_match_the_official_networks(config):
    g_kw, d_kw, g_count, d_count = OFFICIAL[config]
    g_kw = dict(g_kw)
    with torch.device("meta"):  # shapes only: no memory, no init time
        g = Generator(512, g_kw.pop("num_classes", 0), **g_kw)
        d = Discriminator(**d_kw)
    assert shapes(g) == official_g_shapes(g.resolution, g_kw["channel_base"], c_dim=g.num_classes,
                                          map_layers=g_kw.get("mapping_layers", 8))
    assert shapes(d) == official_d_shapes(d_kw["resolution"], d_kw["channel_base"], c_dim=d.num_classes)
    # saved buffers: w_avg and each conv's noise_const, as the official (its FIR filters are rebuilt here)
    noise = {n.replace("noise_strength", "noise_const") for n in shapes(g) if n.endswith("noise_strength")}
    assert set(g.state_dict()) - set(shapes(g)) == {"mapping.w_avg"} | noise
    assert set(d.state_dict()) == set(shapes(d))
    assert sum(p.numel() for p in g.parameters()) == g_count
    assert sum(p.numel() for p in d.parameters()) == d_count


@pytest.mark.parametrize("resolution", [32, 64, 128, 256, 512, 1024])
def test_shapes_and_num_ws_at_every_resolution(resolution):
    kw = dict(w_dim=16, channel_base=2 * resolution, channel_max=8)  # 2 channels at the top
    g = Generator(8, 0, resolution, **kw)
    d = Discriminator(resolution, channel_base=2 * resolution, channel_max=8, mbstd_group_size=2)
    assert g.num_ws == 2 * int(math.log2(resolution)) - 2  # 2 per block + the last toRGB, minus b4's conv0
    assert shapes(g) == official_g_shapes(resolution, 2 * resolution, cmax=8, z_dim=8, w_dim=16)
    assert shapes(d) == official_d_shapes(resolution, 2 * resolution, cmax=8)
    if resolution <= 512:
        img = g(torch.randn(2, 8))
        assert img.shape == (2, 3, resolution, resolution)
        assert d(img).shape == (2, 1)


def test_unsupported_resolution_is_refused():
    with pytest.raises(ValueError, match="32, 64, ..., 1024"):
        small_g(resolution=48)


# ------------------------------------------------ FIR resampling against explicit numpy

def numpy_upfirdn2d(x, f, up, down, pad, flip_filter=False, gain=1.0):
    """Zero insertion, zero pad / crop (x0, x1, y0, y1), a full 2-D convolution written out, subsampling."""
    n, c, h, w = x.shape
    px0, px1, py0, py1 = pad
    z = np.zeros((n, c, h * up, w * up))
    z[:, :, ::up, ::up] = x
    z = np.pad(z, ((0, 0), (0, 0), (max(py0, 0), max(py1, 0)), (max(px0, 0), max(px1, 0))))
    z = z[:, :, max(-py0, 0):z.shape[2] - max(-py1, 0), max(-px0, 0):z.shape[3] - max(-px1, 0)]
    k = f if flip_filter else f[::-1, ::-1]  # convolution = correlation with the flipped filter
    fh, fw = f.shape
    out = np.zeros((n, c, z.shape[2] - fh + 1, z.shape[3] - fw + 1))
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            out[:, :, i, j] = (z[:, :, i:i + fh, j:j + fw] * k).sum((2, 3))
    return out[:, :, ::down, ::down] * gain


@pytest.mark.parametrize("up, down, pad, flip_filter, gain", [
    (2, 1, (2, 1, 2, 1), False, 4.0),     # upsample2d
    (1, 2, (1, 1, 1, 1), False, 1.0),     # downsample2d
    (1, 1, (-1, 2, 0, -2), True, 1.0),    # crop on two sides, correlation
    (2, 2, (1, 2, 2, 1), False, 2.0),     # up and down at once
    (3, 1, (0, 0, 0, 0), True, 9.0),
])
def test_upfirdn2d_equals_explicit_zero_insertion_and_convolution(up, down, pad, flip_filter, gain):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6))
    f = rng.standard_normal((4, 4))  # asymmetric, so a flip that is wrong shows
    ours = upfirdn2d(torch.tensor(x), torch.tensor(f), up, down, pad, flip_filter, gain)
    expected = numpy_upfirdn2d(x, f, up, down, pad, flip_filter, gain)
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-12)


def test_resampling_convs_equal_the_official_generic_path():
    """conv2d_resample's fast paths against the official fallback: upfirdn2d(up, gain 4) then a true
    convolution (flip_weight=False for up); and conv, then filter with down=2, for downsampling."""
    x, f = torch.randn(2, 4, 6, 6, dtype=torch.float64), fir_filter().double()
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    up = F.conv2d(upfirdn2d(x, f, up=2, padding=(3, 2, 3, 2), gain=4), w.flip([2, 3]))
    torch.testing.assert_close(conv2d_resample(x, w, f, up=2, padding=1), up)
    down = upfirdn2d(F.conv2d(F.pad(x, [2] * 4), w), f, down=2)
    torch.testing.assert_close(conv2d_resample(x, w, f, down=2, padding=1), down)
    assert up.shape[2:] == (12, 12) and down.shape[2:] == (3, 3)


# ------------------------------------------------ layers

def test_bias_act_clamps_after_activation_and_gain():
    """The official order: x + b, lrelu(0.2), × √2 · gain, then clamp to ±clamp."""
    x, b = torch.tensor([[-4.0, -0.5, 0.5, 4.0]]), torch.tensor([1.0])
    y = bias_act(x[:, :, None, None].transpose(0, 1), b, lrelu=True, gain=0.5, clamp=1.0).flatten()
    h = x.flatten() + 1
    expected = (torch.where(h > 0, h, 0.2 * h) * math.sqrt(2) * 0.5).clamp(-1, 1)  # 4 -> 5 · 0.707 -> 1
    torch.testing.assert_close(y, expected)


def test_demodulated_weights_have_unit_norm_per_output_channel():
    weight, styles = torch.randn(6, 5, 3, 3), torch.randn(4, 5) * 3
    norms = modulated_weight(weight, styles).square().sum([2, 3, 4]).sqrt()
    torch.testing.assert_close(norms, torch.ones(4, 6))


def test_lr_multiplier_slows_the_effective_weights_under_adam():
    """Two layers with the same effective weights; one Adam step moves lr_multiplier=0.01's 100x less.
    (float64: in fp32 a step of 1e-3 on stored weights of ~100 keeps only ~4 digits.)"""
    x = torch.randn(8, 16, dtype=torch.float64)
    steps = {}
    for m in (1.0, 0.01):
        torch.manual_seed(0)
        layer = FullyConnected(16, 4, lr_multiplier=m).double()
        layer.weight.data = torch.randn(4, 16, dtype=torch.float64) / m  # same effective W · m / √16
        before = (layer.weight * layer.weight_gain).detach().clone()
        opt = torch.optim.Adam(layer.parameters(), lr=1e-3, eps=0)  # first step: exactly lr · sign(grad)
        layer(x).square().sum().backward()
        opt.step()
        steps[m] = ((layer.weight * layer.weight_gain).detach() - before).abs()
    torch.testing.assert_close(steps[1.0] / steps[0.01], torch.full((4, 16), 100.0, dtype=torch.float64))


def test_w_avg_tracks_only_when_told_and_truncation_pulls_to_it():
    g = small_g()
    z = torch.randn(6, 16)
    ws = g.mapping(z)
    g(z, style_mixing=0.9)
    assert g.mapping.w_avg.abs().sum() == 0, "a forward leaves w_avg alone (the family moves it, over all ranks)"
    g.mapping.track_w_avg(ws[:, 0].mean(0))
    torch.testing.assert_close(g.mapping.w_avg, (1 - 0.995) * ws[:, 0].mean(0))  # lerp from w_avg = 0
    g.mapping.track_w_avg(ws[:, 0].mean(0))
    torch.testing.assert_close(g.mapping.w_avg, (1 - 0.995 ** 2) * ws[:, 0].mean(0))
    g.mapping.w_avg.normal_()
    assert torch.equal(g.mapping(z, psi=0.0), g.mapping.w_avg.expand(6, g.num_ws, -1))
    cut = g.mapping(z, psi=0.0, truncation_cutoff=3)
    assert torch.equal(cut[:, :3], g.mapping.w_avg.expand(6, 3, -1)) and torch.equal(cut[:, 3:], ws[:, 3:])


def test_noise_modes():
    g = small_g()
    for name, p in g.named_parameters():
        if name.endswith("noise_strength"):
            p.data.fill_(0.5)  # they start at 0, where noise has no effect
    z = torch.randn(2, 16)
    const = g(z, noise_mode="const")
    assert torch.equal(const, g(z, noise_mode="const"))
    assert not torch.allclose(g(z), g(z))
    assert not torch.allclose(const, g(z, noise_mode="none"))
    with pytest.raises(ValueError, match="noise_mode"):
        g(z, noise_mode="fixed")


def test_fused_and_unfused_modulation_agree():
    """G.eval() runs the grouped ('fused') conv, G.train() the shared conv between two scalings."""
    g, z = small_g(num_classes=3), torch.randn(3, 16)
    y = torch.tensor([0, 1, 2])
    g.eval()
    fused = g(z, y, noise_mode="const")
    g.train()
    torch.testing.assert_close(g(z, y, noise_mode="const"), fused, rtol=1e-4, atol=1e-5)


def test_class_conditioning_changes_outputs():
    g, d = small_g(num_classes=3), small_d(num_classes=3)
    z = torch.randn(2, 16).repeat(2, 1)
    y = torch.tensor([0, 0, 1, 1])
    img = g(z, y, noise_mode="const")
    assert not torch.allclose(img[:2], img[2:])
    assert torch.equal(g(z, F.one_hot(y, 3).float(), noise_mode="const"), img)  # label vectors work too
    logits = d(img[:2].repeat(2, 1, 1, 1), y)
    assert not torch.allclose(logits[:2], logits[2:])
    with pytest.raises(ValueError, match="class-conditional"):
        g(z)


def test_minibatch_stddev_refuses_an_indivisible_batch():
    d = small_d(mbstd_group_size=4)
    assert d(torch.randn(3, 3, 32, 32)).shape == (3, 1)  # group of min(4, N) = 3
    with pytest.raises(ValueError, match="batch of 6 does not split into groups of 4"):
        d(torch.randn(6, 3, 32, 32))


def test_a_packed_d_judges_packs_of_consecutive_samples():
    """loss.pack=4 (PacGAN) on StyleGAN2's D: one logit per 4 consecutive images, which it reads together
    (changing one image moves only its pack's logit); minibatch stddev then groups packs."""
    torch.manual_seed(0)
    d = small_d(pack=4, mbstd_group_size=2)
    assert d.b32.fromrgb.weight.shape[1] == 12
    x = torch.randn(8, 3, 32, 32)
    out = d(x)
    assert out.shape == (2, 1)
    y = x.clone()
    y[5] = torch.randn(3, 32, 32)
    moved = d(y)
    # (mbstd: the std over the group of 2 packs feeds both logits; without it only pack 1's would move)
    d_no_std = small_d(pack=4, mbstd_group_size=2, mbstd_num_channels=0)
    a, b = d_no_std(x), d_no_std(y)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    assert not torch.equal(out[1], moved[1]) and not torch.equal(out[0], moved[0]), "mbstd couples the group"
    with pytest.raises(ValueError, match="pack"):
        small_d(pack=2, num_classes=3)


# ------------------------------------------------ training-time behaviours

def test_mix_styles_takes_a_tail_of_ws_from_a_second_latent():
    g, z = small_g(), torch.randn(4, 16)
    plain = g.mapping(z)
    assert torch.equal(mix_styles(g, z, prob=0.0), plain)
    cutoffs = set()
    for seed in range(6):
        ws = mix_styles(g, z, prob=1.0, generator=torch.Generator().manual_seed(seed))
        same = [torch.equal(ws[:, k], plain[:, k]) for k in range(g.num_ws)]
        cutoff = same.index(False)
        assert 1 <= cutoff < g.num_ws and not any(same[cutoff:])
        cutoffs.add(cutoff)
    assert len(cutoffs) > 1
    torch.manual_seed(1)
    first = mix_styles(g, z, prob=0.5)
    torch.manual_seed(1)
    assert torch.equal(mix_styles(g, z, prob=0.5), first)  # torch's default RNG without a generator
    assert g.mapping.w_avg.abs().sum() == 0


def test_path_lengths_on_a_linear_map():
    """images = 3 · ws reshaped: ∂Σ(images · y)/∂ws = 3y, so a = 3 √(mean_k Σ_j y²)."""
    ws = torch.randn(4, 6, 8, requires_grad=True)
    images = 3 * ws.reshape(4, 3, 4, 4)
    y = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0)) / 4
    torch.testing.assert_close(path_lengths(images, ws, y), 3 * y.reshape(4, 6, 8).square().sum(2).mean(1).sqrt())


def _assert_finite_grads(model, names):
    missing = [n for n, p in model.named_parameters() if n in names and p.grad is None]
    assert not missing, f"no gradient: {missing}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
    assert not bad, f"non-finite gradient: {bad}"


def test_r1_double_backward_through_d():
    d = small_d(num_classes=3)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    (grad,) = torch.autograd.grad(d(x, torch.tensor([0, 1, 2, 0])).sum(), x, create_graph=True)
    grad.square().sum().backward()
    # the logit's gradient w.r.t. the image does not depend on the last bias; every weight shapes it
    _assert_finite_grads(d, {n for n, _ in d.named_parameters() if n.endswith("weight")})


def test_path_length_double_backward_through_g():
    g = small_g(num_classes=3)
    g.train()
    images, lengths = g(torch.randn(2, 16), torch.tensor([0, 2]), style_mixing=0.9,
                        path_noise=lambda x: torch.randn_like(x) / 32)
    (lengths - lengths.detach().mean()).square().mean().backward()
    # toRGB biases add a constant to the image: ∂image/∂ws does not depend on them
    _assert_finite_grads(g, {n for n, _ in g.named_parameters() if not n.endswith("torgb.bias")})


# ------------------------------------------------ bf16 autocast

def test_bf16_autocast_forward_is_fp32_finite_and_close():
    """bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%). Through G's 7 bf16 convs we measured
    relative errors of 0.4-0.6% on the images, through D's 10 convs 0.1-1.6% on the logits (4 seeds, two
    widths, fused and unfused); the bounds are ~3x the worst."""
    torch.manual_seed(0)
    g, d = small_g(num_classes=3), small_d(num_classes=3)
    z, y = torch.randn(4, 16), torch.tensor([0, 1, 2, 0])
    for fused in (True, False):
        g.train(not fused)
        img32 = g(z, y, noise_mode="const")
        logits32 = d(img32, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            img16 = g(z, y, noise_mode="const")
            logits16 = d(img32, y)
        for low, full, bound in ((img16, img32, 0.02), (logits16, logits32, 0.05)):
            assert low.dtype == torch.float32 and low.isfinite().all()
            error = ((low - full).norm() / full.norm()).item()
            assert 0 < error < bound, error  # > 0: the convs did run in bf16


@pytest.mark.parametrize("fused", [False, True])
def test_fp16_modulated_conv_stays_in_range_as_the_official_prescales(fused):
    """Under fp16 autocast, weights and styles are scaled down before the conv (as the official fp16 layers):
    styles of a few thousand would otherwise overflow fp16 (sums of 576 terms near 1e4); demodulation
    cancels the scaling, so the result is the fp32 one to fp16's precision."""
    from bigan.models.stylegan2 import modulated_conv2d

    torch.manual_seed(0)
    x, weight, styles = torch.randn(2, 64, 8, 8), torch.randn(4, 64, 3, 3), torch.randn(2, 64) * 3000
    want = modulated_conv2d(x, weight, styles, fused=fused)
    with torch.autocast("cpu", dtype=torch.float16):
        got = modulated_conv2d(x, weight, styles, fused=fused)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() / want.abs().max() < 5e-3
