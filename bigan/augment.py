"""Differentiable augmentation of what the discriminator sees, for training on little data.

Reals and fakes are augmented alike, by separate calls (each call draws anew), with ops that are
differentiable w.r.t. the images twice over: R1 differentiates D(augment(x)) w.r.t. x and then
backpropagates that gradient's norm.

* `DiffAugment` (Zhao et al. 2020): colour, translation, cutout on every sample.
* `AdaptiveAugment` (ADA, Karras et al. 2020, the 'bgc' pipeline): each transform on each sample
  with probability p, a 0-dim tensor on the images' device that `AdaController` moves from the
  sign of D's logits on reals; neither reads a device value on the host.

Images are float NCHW in [-1, 1]. Randomness: every call takes `generator`, a torch.Generator on
the images' device; without one, torch's default generator for that device is used
(torch.manual_seed). Each call makes the same draws whatever p and the enabled transforms are,
so that a seeded generator gives a transform the same parameters at any p.

How `AdaptiveAugment` differs from the official AugmentPipe (stylegan2-ada-pytorch):
* The geometric transforms are one bilinear grid_sample at the image's own resolution with
  reflection padding (the edge pixel repeats). The official code pads by margins it reads back
  from the device (a host sync in every step), upsamples 2x with a sym6 wavelet filter, samples
  and filters back down, which cuts aliasing when scaling down or rotating; here bilinear
  interpolation blurs and aliases a little instead (its effect on FID is not measured). Cost on
  one CPU thread, 64 images of 64 px: 4.5 ms for the geometric part here; a sketch of the 2x path
  took 31.5 ms with a fixed 6 px margin and 232 ms with the official code's widest margin (63 px).
* Only 'bgc' is implemented: no image-space filtering, noise or cutout ('bgcfnc').
* Hue and saturation leave 1-channel images alone, as in the official code.
* With p a tensor the whole pipeline runs even at p = 0 (5.7 ms against 6.0 ms at p = 1, as
  above; a torch.where then hands back the input bit for bit): skipping work would need a host
  read of p. A Python number p = 0 (ADA off) returns the images without computing anything.

kornia 0.9 (kornia.augmentation) was weighed against this code and not taken:
* R1 through it works (its geometric ops use torch's grid_sample, twice differentiable in
  torch 2.13 on the CPU).
* Its probability `p` is meant as a Python float. A 0-dim tensor is accepted, but its Python
  branches on p then read it: 101 host reads per call of a flip, rot90, affine, colour-jitter
  pipeline (5 with Python floats, from range checks of its own parameters).
* Speed, same 64 images of 64 px on one CPU thread, all at p = 1 (its pipeline is not the same
  set of transforms): 40.7 ms forward, 136 ms forward and backward, against 6.0 and 16.8 ms for
  `AdaptiveAugment`.
* It takes images in [0, 1], needs torch >= 2.5.1 (bigan allows 2.4) and brings two packages
  (kornia, kornia_rs: 7.3 MB of wheels, 31 MB installed, 0.3 s to import after torch).
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

GEOMETRIC = ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac")
COLOUR = ("brightness", "contrast", "lumaflip", "hue", "saturation")
BGC = GEOMETRIC + COLOUR

# The official strengths (AugmentPipe's defaults in stylegan2-ada-pytorch).
XINT_MAX = 0.125       # integer translation: uniform within ± this fraction of the size
SCALE_STD = 0.2        # isotropic scaling: log2 standard deviation
ROTATE_MAX = 1.0       # arbitrary rotation: uniform within ± this many half-turns
ANISO_STD = 0.2        # anisotropic scaling: log2 standard deviation
XFRAC_STD = 0.125      # fractional translation: standard deviation, a fraction of the size
BRIGHTNESS_STD = 0.2   # brightness: standard deviation of the offset
CONTRAST_STD = 0.5     # contrast: log2 standard deviation
HUE_MAX = 1.0          # hue rotation: uniform within ± this many half-turns about the grey axis
SATURATION_STD = 1.0   # saturation: log2 standard deviation


# ---------------------------------------------------------------- grid_sample, twice differentiable

class _GridSample(torch.autograd.Function):
    """Bilinear grid_sample with reflection padding whose backward is itself differentiable
    w.r.t. the images. The grid is a constant: no gradient flows to it."""

    @staticmethod
    def forward(ctx, images, grid):
        ctx.save_for_backward(images, grid)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    @staticmethod
    def backward(ctx, grad_output):
        images, grid = ctx.saved_tensors
        return _GridSampleBackward.apply(grad_output, images, grid), None


class _GridSampleBackward(torch.autograd.Function):
    """grid_sample's gradient w.r.t. the images, A^T g for the sampling matrix A: linear in g and
    free of the images, so its own backward is A g' (grid_sample again) and nothing for the images."""

    @staticmethod
    def forward(ctx, grad_output, images, grid):
        ctx.save_for_backward(grid)
        # interpolation 0 = bilinear, padding 2 = reflection, align_corners False; grid's grad not wanted
        grad_images, _ = torch.ops.aten.grid_sampler_2d_backward(grad_output, images, grid, 0, 2, False,
                                                                 [True, False])
        return grad_images

    @staticmethod
    def backward(ctx, grad2):
        (grid,) = ctx.saved_tensors
        return _GridSample.apply(grad2, grid), None, None


def grid_sample(images, grid):
    """`F.grid_sample(images, grid, padding_mode="reflection")` (bilinear, align_corners=False),
    differentiable w.r.t. the images to any order by construction, as stylegan2-ada-pytorch's
    grid_sample_gradfix: older torch cannot differentiate grid_sample's backward
    (pytorch/pytorch#34704). torch 2.13 can on the CPU, and the tests check this op against it;
    no other version or device is tested. Computed in float32 (float64 for float64 images)."""
    if grid.requires_grad:
        raise ValueError("augment.grid_sample takes a constant grid; detach it (no gradient flows to it)")
    dtype = torch.promote_types(images.dtype, torch.float32)
    return _GridSample.apply(images.to(dtype), grid.to(dtype)).to(images.dtype)


# ---------------------------------------------------------------- DiffAugment

def _uniform(images, generator):
    """One U[0, 1) draw per sample, shaped to broadcast over an image."""
    draw = torch.rand(images.shape[0], 1, 1, 1, device=images.device, generator=generator)
    return draw.to(images.dtype)


def brightness(images, generator=None):
    """Adds one offset per sample, uniform in [-0.5, 0.5)."""
    return images + (_uniform(images, generator) - 0.5)


def saturation(images, generator=None):
    """Scales each pixel's distance from its channel mean by a factor per sample in [0, 2)."""
    mean = images.mean(dim=1, keepdim=True)
    return (images - mean) * (2 * _uniform(images, generator)) + mean


def contrast(images, generator=None):
    """Scales each sample's distance from its mean by a factor in [0.5, 1.5)."""
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - mean) * (_uniform(images, generator) + 0.5) + mean


def translation(images, generator=None):
    """Moves each sample by a whole number of pixels, up to 1/8 of the size either way, zeros coming in."""
    n, c, h, w = images.shape
    max_y, max_x = h // 8, w // 8
    shift_y = torch.randint(-max_y, max_y + 1, (n, 1), device=images.device, generator=generator)
    shift_x = torch.randint(-max_x, max_x + 1, (n, 1), device=images.device, generator=generator)
    padded = F.pad(images, (max_x, max_x, max_y, max_y))
    rows = torch.arange(h, device=images.device) + max_y - shift_y  # output row i reads input row i - shift
    padded = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * max_x))
    cols = torch.arange(w, device=images.device) + max_x - shift_x
    return padded.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def cutout(images, generator=None):
    """Zeroes a square of half the size (h//2 by w//2) per sample, centred anywhere, clipped at the edges."""
    n, _, h, w = images.shape
    size_y, size_x = h // 2, w // 2
    # Zhao et al.'s centre range: the whole image, one further for an even size
    draw = dict(size=(n, 1), device=images.device, generator=generator)
    top = torch.randint(0, h + 1 - size_y % 2, **draw) - size_y // 2
    left = torch.randint(0, w + 1 - size_x % 2, **draw) - size_x // 2
    rows, cols = torch.arange(h, device=images.device), torch.arange(w, device=images.device)
    in_rows = (rows >= top) & (rows < top + size_y)
    in_cols = (cols >= left) & (cols < left + size_x)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return images * keep[:, None].to(images.dtype)


DIFF_AUGMENT_OPS = {"color": (brightness, saturation, contrast), "translation": (translation,),
                    "cutout": (cutout,)}


class DiffAugment(nn.Module):
    """DiffAugment (Zhao et al. 2020): the policy's ops in order, each with its own draw per sample."""

    def __init__(self, policy: str = "color,translation,cutout"):
        super().__init__()
        names = [name.strip() for name in policy.split(",") if name.strip()]
        unknown = [name for name in names if name not in DIFF_AUGMENT_OPS]
        if unknown:
            raise ValueError(f"DiffAugment policy {policy!r}: unknown {', '.join(unknown)}; "
                             f"use a comma-separated list of {', '.join(DIFF_AUGMENT_OPS)}")
        self.ops = [op for name in names for op in DIFF_AUGMENT_OPS[name]]

    def forward(self, images, generator=None):
        _check_images(images)
        for op in self.ops:
            images = op(images, generator)
        return images


def _check_images(images):
    if not (isinstance(images, torch.Tensor) and images.ndim == 4 and images.is_floating_point()):
        raise ValueError(f"augmentation takes float images shaped (N, C, H, W), got "
                         f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")


# ---------------------------------------------------------------- ADA

_UNIFORMS, _NORMALS = 21, 7  # the draws per sample that one AdaptiveAugment call makes


class _Draws:
    """Per-sample random numbers, drawn at once and handed out in a fixed order, and the gates:
    `pick` gives a transform's value where its gate opened (probability p) and it is enabled,
    else the identity, and remembers which samples it changed."""

    def __init__(self, n, p, enabled, device, generator):
        self.uniforms = iter(torch.rand(n, _UNIFORMS, device=device, generator=generator).unbind(1))
        self.normals = iter(torch.randn(n, _NORMALS, device=device, generator=generator).unbind(1))
        self.p, self.enabled = p, enabled
        self.opened = torch.zeros(n, dtype=torch.bool, device=device)

    def uniform(self):
        return next(self.uniforms)

    def normal(self):
        return next(self.normals)

    def pick(self, name, value, identity, p=None):
        gate = self.uniform() < (self.p if p is None else p)
        if name not in self.enabled:
            gate = torch.zeros_like(gate)
        self.opened = self.opened | gate
        return torch.where(gate.view(-1, *[1] * (value.ndim - 1)), value, identity)

    def take_opened(self):
        opened, self.opened = self.opened, torch.zeros_like(self.opened)
        return opened


def _affine(a, b, tx, c, d, ty):
    """(N, 3, 3) matrices [[a, b, tx], [c, d, ty], [0, 0, 1]] from (N,) tensors."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, tx, c, d, ty, zero, zero, one], dim=1).view(-1, 3, 3)


def _scale(sx, sy):
    zero = torch.zeros_like(sx)
    return _affine(sx, zero, zero, zero, sy, zero)


def _rotate(theta):
    cos, sin, zero = torch.cos(theta), torch.sin(theta), torch.zeros_like(theta)
    return _affine(cos, -sin, zero, sin, cos, zero)


def _translate(tx, ty):
    zero, one = torch.zeros_like(tx), torch.ones_like(tx)
    return _affine(one, zero, tx, zero, one, ty)


def _colour_constants(device):
    """4x4 matrices acting on homogeneous RGB: the identity, the colour part, the offset column,
    the projection on the grey axis v = (1, 1, 1, 0)/√3, and v's cross-product matrix."""
    eye = torch.eye(4)
    colour, offset = torch.diag(torch.tensor([1.0, 1, 1, 0])), torch.zeros(4, 4)
    offset[:3, 3] = 1
    v = torch.tensor([1.0, 1, 1, 0]) / math.sqrt(3)
    cross = torch.zeros(4, 4)
    cross[0, 1], cross[0, 2], cross[1, 2] = -v[2], v[1], -v[0]
    cross = cross - cross.T
    constants = dict(eye=eye, colour=colour, offset=offset, grey=torch.outer(v, v), cross=cross)
    return {name: m.to(device) for name, m in constants.items()}


class AdaptiveAugment(nn.Module):
    """ADA's 'bgc' pipeline: each transform on each sample with probability p.

    `transforms` restricts the pipeline to some of BGC (the draws stay the same). Geometric
    transforms compose into one matrix and one grid_sample; colour transforms into one 4x4 matrix
    per sample. Samples that no transform picked come back bit for bit.
    """

    def __init__(self, transforms=BGC):
        super().__init__()
        unknown = sorted(set(transforms) - set(BGC))
        if unknown:
            raise ValueError(f"AdaptiveAugment: unknown transforms {', '.join(unknown)}; "
                             f"choose from {', '.join(BGC)}")
        self.transforms = frozenset(transforms)
        self._constants = {}  # per device, made on first use so that no step copies them from the host

    def forward(self, images, p, generator=None):
        """`p`: a 0-dim float tensor (no host read) or a Python number (0 returns `images` at no cost)."""
        _check_images(images)
        if not isinstance(p, torch.Tensor) and p == 0:
            return images
        n, c, h, w = images.shape
        if c not in (1, 3) and self.transforms & set(COLOUR):
            raise ValueError(f"ADA's colour transforms take RGB or grey images, got {c} channels")
        enabled = self.transforms if c == 3 else self.transforms - {"hue", "saturation"}
        draws = _Draws(n, p, enabled, images.device, generator)
        g_inv, moved = self._geometric(draws, h, w), draws.take_opened()
        colour, recoloured = self._colour(draws, images.device), draws.take_opened()
        if self.transforms & set(GEOMETRIC):
            images = torch.where(moved.view(-1, 1, 1, 1), _warp(images, g_inv), images)
        if self.transforms & set(COLOUR):
            images = torch.where(recoloured.view(-1, 1, 1, 1), _recolour(images, colour), images)
        return images

    @staticmethod
    def _geometric(d, h, w):
        """G⁻¹, (N, 3, 3): output pixel -> input pixel, in pixels from the image centre."""
        flip = d.pick("xflip", torch.floor(d.uniform() * 2), 0.0)
        quarter_turns = d.pick("rotate90", torch.floor(d.uniform() * 4), 0.0)
        along_x, along_y = d.uniform() * 2 - 1, d.uniform() * 2 - 1
        shift = d.pick("xint", torch.round(torch.stack([along_x * w, along_y * h], dim=1) * XINT_MAX), 0.0)
        scale = d.pick("scale", torch.exp2(d.normal() * SCALE_STD), 1.0)
        p_rot = 1 - torch.sqrt((1 - torch.as_tensor(d.p)).clamp(0, 1))  # P(pre- or post-rotation) = p
        pre = d.pick("rotate", (d.uniform() * 2 - 1) * math.pi * ROTATE_MAX, 0.0, p=p_rot)
        aniso = d.pick("aniso", torch.exp2(d.normal() * ANISO_STD), 1.0)
        post = d.pick("rotate", (d.uniform() * 2 - 1) * math.pi * ROTATE_MAX, 0.0, p=p_rot)
        frac = d.pick("xfrac", torch.stack([d.normal() * w, d.normal() * h], dim=1) * XFRAC_STD, 0.0)
        one = torch.ones_like(flip)
        return (_scale(1 - 2 * flip, one) @ _rotate(math.pi / 2 * quarter_turns)
                @ _translate(-shift[:, 0], -shift[:, 1]) @ _scale(1 / scale, 1 / scale)
                @ _rotate(pre) @ _scale(1 / aniso, aniso) @ _rotate(post)
                @ _translate(-frac[:, 0], -frac[:, 1]))

    def _colour(self, d, device):
        """(N, 4, 4) acting on homogeneous RGB: brightness, contrast, luma flip, hue, saturation in turn."""
        if device not in self._constants:
            self._constants[device] = _colour_constants(device)
        m = self._constants[device]
        offset = d.pick("brightness", d.normal() * BRIGHTNESS_STD, 0.0)
        gain = d.pick("contrast", torch.exp2(d.normal() * CONTRAST_STD), 1.0)
        luma_flip = d.pick("lumaflip", torch.floor(d.uniform() * 2), 0.0)
        hue = d.pick("hue", (d.uniform() * 2 - 1) * math.pi * HUE_MAX, 0.0)
        sat = d.pick("saturation", torch.exp2(d.normal() * SATURATION_STD), 1.0)

        def plus(weight, matrix):  # I + weight * matrix, per sample
            return m["eye"] + weight[:, None, None] * matrix

        cross = m["cross"]  # Rodrigues: I + sin θ K + (1 - cos θ) K²
        hue_turn = plus(torch.sin(hue), cross) + plus(1 - torch.cos(hue), cross @ cross) - m["eye"]
        return (plus(sat - 1, m["colour"] - m["grey"]) @ hue_turn @ plus(-2 * luma_flip, m["grey"])
                @ plus(gain - 1, m["colour"]) @ plus(offset, m["offset"]))


def _warp(images, g_inv):
    """Resamples each image by its G⁻¹ (pixels from the centre) with affine_grid's [-1, 1] coordinates."""
    n, c, h, w = images.shape
    g = g_inv.to(torch.promote_types(images.dtype, torch.float32))
    theta = torch.stack([torch.stack([g[:, 0, 0], g[:, 0, 1] * (h / w), g[:, 0, 2] * (2 / w)], dim=1),
                         torch.stack([g[:, 1, 0] * (w / h), g[:, 1, 1], g[:, 1, 2] * (2 / h)], dim=1)], dim=1)
    return grid_sample(images, F.affine_grid(theta, [n, c, h, w], align_corners=False))


def _recolour(images, colour):
    n, c, h, w = images.shape
    flat, colour = images.reshape(n, c, h * w), colour.to(images.dtype)
    if c == 3:
        out = colour[:, :3, :3] @ flat + colour[:, :3, 3:]
    else:  # grey: the mean of the three colour rows
        row = colour[:, :3, :].mean(dim=1, keepdim=True)
        out = flat * row[:, :, :3].sum(dim=2, keepdim=True) + row[:, :, 3:]
    return out.reshape(n, c, h, w)


class AdaController:
    """ADA's heuristic (Karras et al. 2020): p rises while D is overconfident on reals.

    r_t = E[sign(D(real))] over `interval` D steps; then p += sign(r_t - target) * images / (kimg * 1000)
    for the images those steps saw, clamped to [0, 1], so p can cross [0, 1] in `kimg` thousand images.
    Everything is a device tensor; `p` and the last `rt` are there to log.
    """

    def __init__(self, target: float = 0.6, interval: int = 4, kimg: float = 500, p: float = 0.0,
                 device="cpu"):
        if not (0 <= target <= 1 and interval >= 1 and kimg > 0 and 0 <= p <= 1):
            raise ValueError(f"AdaController needs 0 <= target <= 1, interval >= 1, kimg > 0, 0 <= p <= 1; "
                             f"got target={target}, interval={interval}, kimg={kimg}, p={p}")
        self.target, self.interval, self.kimg = target, interval, kimg
        self.p = torch.tensor(float(p), device=device)
        self.rt = torch.zeros((), device=device)
        self.sign_sum = torch.zeros((), device=device)
        self.count = torch.zeros((), device=device)
        self.steps = 0  # D steps since the last adjustment: a host count, no device value

    def accumulate(self, real_logits):
        """After D's forward on reals: adds sign(logits) to the running sums (no host read)."""
        logits = real_logits.detach().float()
        self.sign_sum = self.sign_sum + logits.sign().sum()
        self.count = self.count + logits.numel()

    def update(self, batch_images: int, reduce=lambda t: t):
        """After every D step; every `interval`-th call moves p. `batch_images`: images per D step over
        all ranks. `reduce` sums a tensor over ranks (identity on one process); every rank calls this."""
        self.steps += 1
        if self.steps < self.interval:
            return
        self.steps = 0
        sign_sum, count = reduce(torch.stack([self.sign_sum, self.count])).unbind()
        seen = count > 0
        rt = sign_sum / count.clamp(min=1)
        step = batch_images * self.interval / (self.kimg * 1000)
        self.p = (self.p + torch.where(seen, torch.sign(rt - self.target), 0.0) * step).clamp(0, 1)
        self.rt = torch.where(seen, rt, self.rt)
        self.sign_sum, self.count = torch.zeros_like(self.sign_sum), torch.zeros_like(self.count)

    def before_save(self, mean_over_ranks=None):
        """Every rank, before a checkpoint: the partial sums of an unfinished interval become their mean over
        the ranks. A checkpoint holds one rank's custom state and every rank loads it, so each then holds
        the mean and the next update's sum over ranks is the whole interval's, as without the save."""
        if self.steps == 0:
            return  # (the sums are zero on every rank right after an adjustment)
        mean_over_ranks = mean_over_ranks or _mean_over_ranks
        self.sign_sum, self.count = mean_over_ranks(torch.stack([self.sign_sum, self.count])).unbind()

    def state_dict(self) -> dict:
        return {"p": self.p, "rt": self.rt, "sign_sum": self.sign_sum, "count": self.count,
                "steps": self.steps, "world": _world_size()}

    def load_state_dict(self, state: dict):
        device = self.p.device
        for name in ("p", "rt", "sign_sum", "count"):
            setattr(self, name, torch.as_tensor(state[name], dtype=torch.float32).to(device).clone())
        self.steps = int(state["steps"])
        scale = state.get("world", 1) / _world_size()  # a resume on other ranks: the interval's sum stays the same
        if scale != 1:
            self.sign_sum, self.count = self.sign_sum * scale, self.count * scale


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the default process group's ranks (the tensor itself on one process)."""
    world = _world_size()
    if world == 1:
        return t
    t = t.clone()
    torch.distributed.all_reduce(t)
    return t / world


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
