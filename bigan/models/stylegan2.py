"""StyleGAN2 (Karras et al. 2020) in pure PyTorch, laid out as NVlabs' stylegan2-ada-pytorch builds it.

G: a mapping network (z -> w, at 1/100 of the learning rate) and the 'skip' synthesis network (a learned
4x4 constant, two modulated 3x3 convs per octave, a toRGB at every resolution, upsampled and summed).
D: the 'resnet' architecture (fromRGB once, residual blocks, a minibatch-stddev epilogue, projection
conditioning). Parameter names and shapes are the official ones; the FIR filters are rebuilt, not saved.

Only differentiable torch ops, so R1 and the path-length penalty can differentiate gradients: the FIR
resampling is pad + depthwise conv, as the official `_upfirdn2d_ref`. Under bf16 autocast the convolutions
run in bf16; modulation, demodulation, noise, toRGB, the image sum, the mapping network and D's epilogue
run in fp32 (each place says why).
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from bigan.models.layers import pack_samples

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2)        # bias_act's def_gain: He et al.'s factor keeps the 2nd moment through lrelu
RESIDUAL_GAIN = math.sqrt(0.5)   # two unit-variance branches summed stay unit-variance
RESAMPLE_TAPS = (1, 3, 3, 1)     # binomial low-pass filter, against aliasing when resampling
NOISE_MODES = ("random", "const", "none")


def _fp32(x: torch.Tensor):
    """Autocast off on x's device, for the precision-sensitive steps."""
    return torch.autocast(x.device.type, enabled=False)


def _resolution_log2(resolution: int) -> int:
    log2 = int(math.log2(resolution)) if resolution > 0 else 0
    if 2**log2 != resolution or not 5 <= log2 <= 10:
        raise ValueError(f"stylegan2 supports resolutions 32, 64, ..., 1024 (powers of 2), not {resolution}")
    return log2


# ---------------------------------------------------------------- FIR resampling, bias + activation

def fir_filter(taps=RESAMPLE_TAPS) -> torch.Tensor:
    """2-D filter f = t tᵀ / Σ(t tᵀ), as the official setup_filter: sums to 1, so constants stay constant."""
    t = torch.as_tensor(taps, dtype=torch.float32)
    f = torch.outer(t, t)
    return f / f.sum()


def upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1.0):
    """The official upfirdn2d (scipy.signal.upfirdn in 2-D) on NCHW x with a 2-D filter f:

    insert up-1 zeros after each pixel; pad by padding = p or (x0, x1, y0, y1), negative crops; convolve
    with f (correlate when flip_filter); keep every down-th pixel; scale by gain (gain^(ndim/2) = gain).
    Output size: (H·up + y0 + y1 - fh) // down + 1.
    """
    n, c, h, w = x.shape
    px0, px1, py0, py1 = (padding,) * 4 if isinstance(padding, int) else padding
    if up > 1:
        x = F.pad(x.reshape(n, c, h, 1, w, 1), [0, up - 1, 0, 0, 0, up - 1]).reshape(n, c, h * up, w * up)
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0):x.shape[2] - max(-py1, 0), max(-px0, 0):x.shape[3] - max(-px1, 0)]
    f = (f if flip_filter else f.flip([0, 1])) * gain  # F.conv2d correlates: flip to convolve
    # a stride-`down` conv is the full conv with every down-th output kept
    return F.conv2d(x, f.to(x.dtype)[None, None].repeat(c, 1, 1, 1), stride=down, groups=c)


def upsample2d(x, f, up=2):
    """x`up` FIR upsampling, output H·up; gain up² restores the energy the inserted zeros took."""
    fw = f.shape[-1]
    p0, p1 = (fw + up - 1) // 2, (fw - up) // 2
    return upfirdn2d(x, f, up=up, padding=(p0, p1, p0, p1), gain=up * up)


def conv2d_resample(x, w, f, up=1, down=1, padding=0, groups=1):
    """Conv with w ('same' padding `padding`) and x`up` or x1/`down` FIR resampling, as the official
    conv2d_resample does for these layers: down: the FIR filter, then a stride-`down` conv (correlation);
    up: a stride-`up` transposed conv with w as stored, then the FIR filter. (The official layers pass
    flip_weight=False when up > 1; the same arithmetic keeps official weights making official images.)"""
    fw = f.shape[-1] if f is not None else 1
    if up > 1:
        o, i, kh, kw = w.shape
        # conv_transpose2d takes (in, out / groups, k, k): swap the in/out axes within each group
        w = w.reshape(groups, o // groups, i, kh, kw).transpose(1, 2).reshape(groups * i, o // groups, kh, kw)
        p0 = padding + (fw + up - 1) // 2 - (kw - 1)
        p1 = padding + (fw - up) // 2 - (kw - up)
        x = F.conv_transpose2d(x, w, stride=up, groups=groups)
        return upfirdn2d(x, f, padding=(p0, p1, p0, p1), gain=up * up)
    if down > 1:
        p0, p1 = padding + (fw - down + 1) // 2, padding + (fw - down) // 2
        return F.conv2d(upfirdn2d(x, f, padding=(p0, p1, p0, p1)), w, stride=down, groups=groups)
    return F.conv2d(x, w, padding=padding, groups=groups)


def bias_act(x, b=None, lrelu=False, gain=1.0, clamp=None):
    """y = clamp(act(x + b) · gain, ±clamp), act = √2·lrelu(0.2) or identity: the official bias_act.

    The clamp (the official conv_clamp, 256 in its configs) keeps fp16 activations in range; with bf16,
    whose range is fp32's, it only bounds outliers."""
    if b is not None:
        x = x + b.to(x.dtype).reshape(1, -1, *[1] * (x.ndim - 2))
    if lrelu:
        x, gain = F.leaky_relu(x, LRELU_SLOPE), gain * LRELU_GAIN
    if gain != 1:
        x = x * gain
    return x if clamp is None else x.clamp(-clamp, clamp)


def _scaled(clamp, gain):
    return None if clamp is None else clamp * gain


# ---------------------------------------------------------------- equalized-learning-rate layers

class FullyConnected(nn.Module):
    """y = x (c·W)ᵀ + m·b, W stored as randn / m, c = m / √fan_in (equalized learning rate).

    The effective weights start N(0, 1/fan_in) whatever m; Adam moves the stored W by ~lr per step, so the
    effective weights move by ~lr·c: relative to their size, m times as fast. m = lr_multiplier."""

    def __init__(self, in_features, out_features, lrelu=False, lr_multiplier=1.0, bias_init=0.0):
        super().__init__()
        self.lrelu = lrelu
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init)))
        self.weight_gain, self.bias_gain = lr_multiplier / math.sqrt(in_features), lr_multiplier

    def forward(self, x):
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)
        return F.leaky_relu(x, LRELU_SLOPE) * LRELU_GAIN if self.lrelu else x


class Conv2dLayer(nn.Module):
    """Equalized-lr conv (weights × 1/√(cin·k²) at run time), optional x1/2 FIR downsampling, bias_act."""

    def __init__(self, cin, cout, kernel, bias=True, lrelu=False, down=1, conv_clamp=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.weight_gain = 1 / math.sqrt(cin * kernel**2)
        self.lrelu, self.down, self.conv_clamp = lrelu, down, conv_clamp
        self.register_buffer("resample_filter", fir_filter() if down > 1 else None, persistent=False)

    def forward(self, x, gain=1.0):
        w = self.weight * self.weight_gain
        x = conv2d_resample(x, w, self.resample_filter, down=self.down, padding=self.weight.shape[-1] // 2)
        return bias_act(x, self.bias, self.lrelu, gain, _scaled(self.conv_clamp, gain))


# ---------------------------------------------------------------- modulated convolution (G)

def demodulation(weight, styles):
    """d[n, o] = 1 / √(Σ_{i,k} (W[o,i,k] s[n,i])² + 1e-8) = 1 / √(s[n]² · Σ_k W[o,:,k]² + 1e-8):
    brings each output channel back to unit expected variance (StyleGAN2's replacement for AdaIN)."""
    return (styles.square() @ weight.square().sum([2, 3]).t() + 1e-8).rsqrt()


def modulated_weight(weight, styles, demodulate=True):
    """Per-sample weights W'[n,o,i,k] = W[o,i,k] · s[n,i] · d[n,o] (d = 1 undemodulated): (N, O, I, k, k)."""
    w = weight[None] * styles[:, None, :, None, None]
    return w * demodulation(weight, styles)[:, :, None, None, None] if demodulate else w


def modulated_conv2d(x, weight, styles, demodulate=True, up=1, resample_filter=None, fused=True):
    """Conv of x with W modulated by styles (N, I) and demodulated per sample; returns fp32.

    fused: one grouped conv over the batch with per-sample weights (N groups); else x·s, conv with the
    shared W, ·d: the same numbers. The official trains unfused (weight gradients of grouped convs are
    slow) and samples fused; so does this (fused = not training).
    """
    n, _, h, w = x.shape
    padding = weight.shape[-1] // 2
    # modulation and demodulation in fp32: under autocast the `@` in demodulation() would run in bf16
    # and give every channel's scale d bf16's rounding (up to 2^-9), on top of the conv's own
    device = x.device.type
    fp16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
    with _fp32(x):
        styles = styles.float()
        if demodulate and fp16:
            # as the official fp16 layers: x·s and the conv's sums stay within fp16's range (65504) whatever
            # the styles grow to; demodulation cancels both scales (per output channel, per sample)
            weight = weight * (1 / math.sqrt(weight[0].numel()) / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True))
            styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)
        if fused:
            weights = modulated_weight(weight, styles, demodulate).reshape(-1, *weight.shape[1:])
        elif demodulate:
            dcoefs = demodulation(weight, styles)
    if fused:
        x = conv2d_resample(x.reshape(1, -1, h, w), weights, resample_filter, up, padding=padding, groups=n)
        return x.reshape(n, -1, *x.shape[2:]).float()
    x = conv2d_resample(x * styles[:, :, None, None], weight, resample_filter, up=up, padding=padding).float()
    return x * dcoefs[:, :, None, None] if demodulate else x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally x2 up) + noise × learned strength + bias + √2·lrelu, clamped."""

    def __init__(self, cin, cout, w_dim, resolution, up=1, conv_clamp=None):
        super().__init__()
        self.resolution, self.up, self.conv_clamp = resolution, up, conv_clamp
        self.affine = FullyConnected(w_dim, cin, bias_init=1)  # styles start near 1: near-identity modulation
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.noise_strength = nn.Parameter(torch.zeros([1]))  # (the official [] scalar: DeepSpeed refuses 0-dim weights)
        self.bias = nn.Parameter(torch.zeros(cout))
        self.register_buffer("resample_filter", fir_filter() if up > 1 else None, persistent=False)

    def forward(self, x, w, noise_mode="random"):
        with _fp32(x):
            styles = self.affine(w.float())
        x = modulated_conv2d(x, self.weight, styles, up=self.up, resample_filter=self.resample_filter,
                             fused=not self.training)
        # noise is added in fp32 (x is fp32 here): noise_strength starts at 0 and stays small, and in
        # bf16 x + 0.01·noise would be rounded to steps of 2^-7 ≈ 0.008 at |x| ≈ 1, the noise's own size
        if noise_mode == "random":
            x = x + torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device) * self.noise_strength
        elif noise_mode == "const":
            x = x + self.noise_const * self.noise_strength
        return bias_act(x, self.bias, lrelu=True, clamp=self.conv_clamp)


class ToRGB(nn.Module):
    """Modulated 1x1 conv to RGB, not demodulated (its output scale is the image's), weights × 1/√cin."""

    def __init__(self, cin, w_dim, conv_clamp=None, img_channels=3):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnected(w_dim, cin, bias_init=1)
        self.weight = nn.Parameter(torch.randn(img_channels, cin, 1, 1))
        self.bias = nn.Parameter(torch.zeros(img_channels))
        self.weight_gain = 1 / math.sqrt(cin)

    def forward(self, x, w):
        # all in fp32, as the official keeps toRGB and the image even in its fp16 blocks: the image sums
        # one output per resolution, so bf16 rounding would add up over them; 3 channels cost little
        with _fp32(x):
            styles = self.affine(w.float()) * self.weight_gain
            x = modulated_conv2d(x.float(), self.weight, styles, demodulate=False, fused=not self.training)
            return bias_act(x, self.bias, clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One octave of the 'skip' G: (4x4 constant | conv0, x2 up) -> conv1 -> toRGB, + the upsampled image."""

    def __init__(self, cin, cout, w_dim, resolution, conv_clamp=None):
        super().__init__()
        self.num_conv = 1 if cin == 0 else 2
        if cin == 0:
            self.const = nn.Parameter(torch.randn(cout, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(cin, cout, w_dim, resolution, up=2, conv_clamp=conv_clamp)
        self.conv1 = SynthesisLayer(cout, cout, w_dim, resolution, conv_clamp=conv_clamp)
        self.torgb = ToRGB(cout, w_dim, conv_clamp)
        self.register_buffer("resample_filter", fir_filter(), persistent=False)

    def forward(self, x, img, ws, noise_mode):
        """ws: (N, num_conv + 1, w_dim); the last one drives toRGB (and the next block's first conv)."""
        if self.num_conv == 1:
            x = self.const[None].expand(ws.shape[0], -1, -1, -1)
        else:
            x = self.conv0(x, ws[:, 0], noise_mode)
        x = self.conv1(x, ws[:, self.num_conv - 1], noise_mode)
        y = self.torgb(x, ws[:, self.num_conv])
        if img is None:
            return x, y
        with _fp32(img):  # the image accumulates in fp32, for toRGB's reason
            return x, upsample2d(img, self.resample_filter) + y


class SynthesisNetwork(nn.Module):
    """ws (N, num_ws, w_dim) -> images; channels min(channel_base // res, channel_max) at each resolution."""

    def __init__(self, w_dim, resolution, channel_base=32768, channel_max=512, conv_clamp=None):
        super().__init__()
        self.w_dim = w_dim
        self.resolutions = [2**i for i in range(2, _resolution_log2(resolution) + 1)]
        channels = {res: min(channel_base // res, channel_max) for res in [2] + self.resolutions}
        for res in self.resolutions:
            cin = channels[res // 2] if res > 4 else 0
            setattr(self, f"b{res}", SynthesisBlock(cin, channels[res], w_dim, res, conv_clamp))
        self.num_ws = sum(block.num_conv for block in self.blocks()) + 1  # + the last toRGB: 2·log2(res) - 2

    def blocks(self):
        return [getattr(self, f"b{res}") for res in self.resolutions]

    def forward(self, ws, noise_mode="random"):
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"synthesis takes ws of shape (N, {self.num_ws}, {self.w_dim}), "
                             f"got {tuple(ws.shape)}")
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {', '.join(NOISE_MODES)}, got {noise_mode!r}")
        x = img = None
        first = 0
        for block in self.blocks():
            x, img = block(x, img, ws[:, first:first + block.num_conv + 1], noise_mode)
            first += block.num_conv
        return img


# ---------------------------------------------------------------- mapping network and generator

def normalize_2nd_moment(x, eps=1e-8):
    """x / √(mean(x²) + eps) per sample: every latent lands on the sphere of radius √dim."""
    return x * (x.square().mean(1, keepdim=True) + eps).rsqrt()


class MappingNetwork(nn.Module):
    """z (and the class) -> w through num_layers lrelu FC layers at lr_multiplier, broadcast to num_ws copies
    (num_ws=None: one (N, w_dim) vector and no w_avg, as D's class mapping)."""

    def __init__(self, z_dim, c_dim, w_dim, num_ws, num_layers=8, lr_multiplier=0.01, w_avg_beta=0.995):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.num_layers, self.w_avg_beta = num_layers, w_avg_beta
        if c_dim:
            self.embed = FullyConnected(c_dim, w_dim)
        features = [z_dim + (w_dim if c_dim else 0)] + [w_dim] * num_layers
        for i in range(num_layers):
            setattr(self, f"fc{i}", FullyConnected(features[i], features[i + 1], True, lr_multiplier))
        if num_ws is not None:
            self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z, y=None, psi=1.0, truncation_cutoff=None):
        # in fp32: the network is tiny next to the convs, and w_avg and truncation move w by small steps
        with _fp32(self.fc0.weight):
            x = self._input(z, y)
            for i in range(self.num_layers):
                x = getattr(self, f"fc{i}")(x)
            if self.num_ws is None:
                return x
            ws = x[:, None].repeat(1, self.num_ws, 1)
            return ws if psi == 1 else self._truncate(ws, psi, truncation_cutoff)

    def _input(self, z, y):
        """[norm(z), norm(embed(onehot(y)))]; y: integer labels (N,) or label vectors (N, c_dim)."""
        parts = [normalize_2nd_moment(z.float())] if self.z_dim else []
        if self.c_dim:
            if y is None:
                raise ValueError(f"this network is class-conditional ({self.c_dim} classes): pass labels y")
            c = y.float() if y.is_floating_point() else F.one_hot(y.long(), self.c_dim).float()
            parts.append(normalize_2nd_moment(self.embed(c)))
        return torch.cat(parts, 1)

    @torch.no_grad()
    def track_w_avg(self, w_mean):
        """w_avg <- mean_N(w) + β (w_avg - mean_N(w)): the centre that truncation pulls towards (w_mean:
        a batch's mean w, over all ranks when the caller all-reduces it)."""
        self.w_avg.copy_(w_mean.to(self.w_avg).lerp(self.w_avg, self.w_avg_beta))

    def _truncate(self, ws, psi, cutoff):
        """w <- w_avg + ψ (w - w_avg) on the first `cutoff` ws: ψ < 1 trades variety for fidelity."""
        cutoff = self.num_ws if cutoff is None else cutoff
        return torch.cat([self.w_avg.lerp(ws[:, :cutoff], psi), ws[:, cutoff:]], 1)


class Generator(nn.Module):
    """StyleGAN2 G, called as bigan's: G(z, y) -> (N, 3, res, res) images, roughly in [-1, 1] (no tanh)."""

    def __init__(self, z_dim, num_classes, resolution, w_dim=512, mapping_layers=8, channel_base=32768,
                 channel_max=512, conv_clamp=256, mapping_lr=0.01):
        super().__init__()
        self.z_dim, self.num_classes, self.resolution, self.w_dim = z_dim, num_classes, resolution, w_dim
        self.synthesis = SynthesisNetwork(w_dim, resolution, channel_base, channel_max, conv_clamp)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, num_classes, w_dim, self.num_ws, mapping_layers, mapping_lr)

    def forward(self, z, y=None, psi=1.0, truncation_cutoff=None, noise_mode="random",
                style_mixing=0.0, return_ws=False, path_noise=None):
        """psi, truncation_cutoff: truncation towards w_avg (which the family moves: MappingNetwork.track_w_avg);
        style_mixing: the probability of mixing in a second latent's styles (training, mix_styles);
        return_ws: (images, ws); path_noise: a function of the images giving the noise y of path_lengths,
        then (images, path lengths). The lengths are taken here, inside the forward: a ZeRO-3 engine hands
        a module's outputs back through hooks of its own, and images out of it no longer depend on ws out
        of it; and DDP and engines see one forward per call."""
        if style_mixing > 0:
            ws = mix_styles(self, z, y, style_mixing)
        else:
            ws = self.mapping(z, y, psi, truncation_cutoff)
        images = self.synthesis(ws, noise_mode)
        if path_noise is not None:
            return images, path_lengths(images, ws, path_noise(images))
        return (images, ws) if return_ws else images


def mix_styles(G, z, y=None, prob=0.9, generator=None):
    """ws for a training batch with style mixing (mixing regularization), as the official loss draws them:

    with probability `prob`, cutoff ~ U{1, ..., num_ws - 1} and ws[:, cutoff:] come from a second latent z2;
    otherwise cutoff = num_ws (no mixing). One draw per call (per batch). The second mapping runs whenever
    prob > 0, so the random stream does not depend on the draw, and never updates w_avg. Draws from torch's
    default RNG on z's device unless `generator` (on that device) is given. G: an unwrapped Generator.
    Returns (N, num_ws, w_dim) for G.synthesis; the draw stays on the device (no host sync)."""
    ws = G.mapping(z, y)
    if prob <= 0:
        return ws
    num_ws = ws.shape[1]
    cutoff = torch.randint(1, num_ws, (), device=z.device, generator=generator)
    mixing = torch.rand((), device=z.device, generator=generator) < prob
    cutoff = torch.where(mixing, cutoff, num_ws)
    z2 = torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=generator)
    from_z2 = (torch.arange(num_ws, device=z.device) >= cutoff)[None, :, None]
    return torch.where(from_z2, G.mapping(z2, y), ws)


def path_lengths(images, ws, noise):
    """StyleGAN2's path lengths: how far a step in W moves the image, per sample. images = G.synthesis(ws);
    noise y ~ N(0, I) / sqrt(H W) (the caller's, so that it can decide how it is drawn):

        a_n = sqrt(mean_k sum_j (d sum(images * y) / d ws[n, k, j])^2)     # over the num_ws copies

    Differentiable (create_graph): the path-length penalty (a_n - their running mean)^2 trains G with it."""
    (grads,) = torch.autograd.grad((images.float() * noise).sum(), ws, create_graph=True)
    return grads.float().square().sum(2).mean(1).sqrt()


# ---------------------------------------------------------------- discriminator

class DiscriminatorBlock(nn.Module):
    """One octave of the 'resnet' D: [fromRGB] -> conv0 -> conv1 (x1/2), + a 1x1 x1/2 skip; × √½ each."""

    def __init__(self, cin, tmp, cout, conv_clamp=None, img_channels=3):
        super().__init__()
        self.first = cin == 0
        if self.first:
            self.fromrgb = Conv2dLayer(img_channels, tmp, 1, lrelu=True, conv_clamp=conv_clamp)
        self.conv0 = Conv2dLayer(tmp, tmp, 3, lrelu=True, conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(tmp, cout, 3, lrelu=True, down=2, conv_clamp=conv_clamp)
        self.skip = Conv2dLayer(tmp, cout, 1, bias=False, down=2)

    def forward(self, x, img):
        if self.first:
            x = self.fromrgb(img)
        return self.skip(x, gain=RESIDUAL_GAIN) + self.conv1(self.conv0(x), gain=RESIDUAL_GAIN)


def minibatch_stddev(x, group_size=4, num_channels=1):
    """Append num_channels maps of the std over groups of G = min(group_size, N) samples (Karras et al.
    2018), so D sees a batch's variety. Group j holds samples j, j + N/G, j + 2N/G, ... (the official layout):

        σ[j, f] = mean_{c ∈ f, h, w} √(Var_{group j}(x[:, c, h, w]) + 1e-8)
    """
    n, c, h, w = x.shape
    g = min(group_size, n)
    if n % g:
        raise ValueError(f"minibatch stddev: a batch of {n} does not split into groups of {g} "
                         f"(mbstd_group_size={group_size}); use a per-device batch divisible by {g}")
    y = x.reshape(g, -1, num_channels, c // num_channels, h, w)
    y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt()
    y = y.mean([2, 3, 4]).reshape(-1, num_channels, 1, 1).repeat(g, 1, h, w)
    return torch.cat([x, y], 1)


class DiscriminatorEpilogue(nn.Module):
    """4x4: minibatch stddev -> conv -> fc -> out; with classes, the projection <out, cmap> / √cmap_dim."""

    def __init__(self, cin, cmap_dim, mbstd_group_size=4, mbstd_num_channels=1, conv_clamp=None):
        super().__init__()
        if mbstd_num_channels and cin % mbstd_num_channels:
            raise ValueError(f"mbstd_num_channels={mbstd_num_channels} must divide D's {cin} channels at 4x4")
        self.cmap_dim = cmap_dim
        self.mbstd_group_size, self.mbstd_num_channels = mbstd_group_size, mbstd_num_channels
        self.conv = Conv2dLayer(cin + mbstd_num_channels, cin, 3, lrelu=True, conv_clamp=conv_clamp)
        self.fc = FullyConnected(cin * 4 * 4, cin, lrelu=True)
        self.out = FullyConnected(cin, cmap_dim or 1)

    def forward(self, x, cmap=None):
        # fp32, as the official: batch statistics and the logit are precision-sensitive, and 4x4 is cheap
        with _fp32(x):
            x = x.float()
            if self.mbstd_num_channels:
                x = minibatch_stddev(x, self.mbstd_group_size, self.mbstd_num_channels)
            x = self.out(self.fc(self.conv(x).flatten(1)))
            return x if cmap is None else (x * cmap).sum(1, keepdim=True) / math.sqrt(self.cmap_dim)


class Discriminator(nn.Module):
    """StyleGAN2's 'resnet' D: D(img, y) -> logits (N, 1); classes through a mapping of the label (cmap)."""

    def __init__(self, resolution, num_classes=0, channel_base=32768, channel_max=512, mbstd_group_size=4,
                 mbstd_num_channels=1, conv_clamp=256, pack=1):
        """pack: samples judged together (PacGAN, not in the official code): fromRGB reads `pack` images
        stacked on channels, one logit per pack; minibatch stddev then groups packs."""
        super().__init__()
        if pack > 1 and num_classes:
            raise ValueError("a packed D has no one label per pack: pack=1 with classes")
        self.num_classes, self.pack = num_classes, pack
        self.resolutions = [2**i for i in range(_resolution_log2(resolution), 2, -1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.resolutions + [4]}
        for res in self.resolutions:
            cin = channels[res] if res < resolution else 0
            setattr(self, f"b{res}", DiscriminatorBlock(cin, channels[res], channels[res // 2], conv_clamp,
                                                        img_channels=3 * pack))
        cmap_dim = channels[4] if num_classes else 0
        if num_classes:
            self.mapping = MappingNetwork(0, num_classes, cmap_dim, num_ws=None)
        self.b4 = DiscriminatorEpilogue(channels[4], cmap_dim, mbstd_group_size, mbstd_num_channels,
                                        conv_clamp)

    def forward(self, img, y=None):
        x, img = None, pack_samples(img, self.pack)
        for res in self.resolutions:
            x = getattr(self, f"b{res}")(x, img)
        return self.b4(x, self.mapping(None, y) if self.num_classes else None)
