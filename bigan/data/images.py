"""Images as bigan reads them: 8-bit RGB, whatever the file holds."""
from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of an image as PIL opens it.

    PIL opens 16-bit greyscale PNGs and TIFFs as I;16 (and 32-bit integer images as I), and its
    convert("RGB") clips those values at 255: nearly every pixel turns white. They are scaled to 8
    bits here instead (x * 255 / 65535, rounded), and float images (F) in [0, 1] by 255. 16-bit RGB
    and RGBA files PIL already reduces to 8 bits itself; every other mode (palette, CMYK, LA, ...)
    goes through convert("RGB").
    """
    if image.mode in SIXTEEN_BIT or image.mode == "I":
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        grey = np.clip(np.nan_to_num(values) * scale + 0.5, 0, 255).astype(np.uint8)
    else:
        return image.convert("RGB")
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))


ASPECT_TOLERANCE = 0.02  # pairs whose aspect ratios differ more than this (relative) cannot be aligned


def check_pair_aspect(target_size: tuple, source_size: tuple):
    """Raise ValueError for a pair (sizes as (width, height)) whose input and target differ in aspect
    ratio beyond ASPECT_TOLERANCE: resized to one shape they would be distorted, cropped alike they would
    no longer line up. Within it the input is resized to its target's size before a shared crop."""
    (tw, th), (sw, sh) = target_size, source_size
    if abs(sw / sh - tw / th) > ASPECT_TOLERANCE * (tw / th):
        raise ValueError(f"input {sw}x{sh} and target {tw}x{th} differ in aspect ratio ({sw / sh:.3f} vs "
                         f"{tw / th:.3f}): no crop lines them up")


def align_pair(target, source) -> tuple:
    """Target and input (PIL images, or uint8 HxWx3 arrays) as 8-bit RGB of one size (the input resized to
    the target's), so that one crop cuts both alike; refuses pairs check_pair_aspect refuses."""
    if isinstance(target, np.ndarray) and isinstance(source, np.ndarray) and target.shape == source.shape:
        return target, source  # rendered pairs (the demo): aligned already
    target, source = (Image.fromarray(x) if isinstance(x, np.ndarray) else x for x in (target, source))
    check_pair_aspect(target.size, source.size)
    target, source = to_rgb(target), to_rgb(source)
    if source.size != target.size:
        source = source.resize(target.size, Image.Resampling.BICUBIC)
    return target, source
