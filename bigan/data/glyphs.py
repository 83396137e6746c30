"""Procedural glyphs for bigan's mode-coverage benchmark (bench/modes.py): no handwriting data set.

Ten glyph classes (digit-like shapes drawn as polylines in a unit box) are rendered with a
random stroke width, point jitter, scale, rotation, shear and position. Three glyphs stacked on
the colour channels make one 32 px image with one of 10^3 = 1000 modes, after Stacked MNIST
(VEEGAN, Srivastava et al. 2017; PacGAN, Lin et al. 2018). Every image is a pure function of
(seed, index).

    glyph(rng, cls)                 # (32, 32) float32 in [0, 1], white stroke on black
    stacked(seed, index)            # ((32, 32, 3) uint8, mode = 100 * c0 + 10 * c1 + c2)
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
CLASSES = 10
MODES = CLASSES**3


def _arc(cx, cy, rx, ry, start, stop, points=12):
    t = np.radians(np.linspace(start, stop, points))
    return np.stack([cx + rx * np.cos(t), cy - ry * np.sin(t)], 1)  # y grows downwards


def _line(*points):
    return np.array(points, dtype=np.float64)


# Each class: polylines in [0, 1]^2 (x right, y down), roughly the shapes of the digits 0-9.
STROKES = {
    0: [_arc(0.5, 0.5, 0.28, 0.4, 0, 360, 24)],
    1: [_line((0.35, 0.25), (0.55, 0.1), (0.55, 0.9)), _line((0.38, 0.9), (0.72, 0.9))],
    2: [np.concatenate([_arc(0.5, 0.32, 0.25, 0.22, 160, -30), _line((0.25, 0.9), (0.78, 0.9))])],
    3: [_arc(0.47, 0.3, 0.25, 0.2, 150, -90), _arc(0.47, 0.7, 0.28, 0.2, 90, -150)],
    4: [_line((0.62, 0.9), (0.62, 0.1), (0.2, 0.65), (0.82, 0.65))],
    5: [_line((0.75, 0.1), (0.3, 0.1), (0.27, 0.45)), _arc(0.48, 0.65, 0.28, 0.25, 130, -150)],
    6: [_line((0.7, 0.12), (0.42, 0.3), (0.25, 0.62)), _arc(0.5, 0.67, 0.25, 0.23, 180, -180, 20)],
    7: [_line((0.2, 0.1), (0.8, 0.1), (0.42, 0.9)), _line((0.38, 0.5), (0.7, 0.5))],
    8: [_arc(0.5, 0.3, 0.2, 0.2, 0, 360, 18), _arc(0.5, 0.7, 0.26, 0.2, 0, 360, 20)],
    9: [_arc(0.5, 0.33, 0.24, 0.22, 0, 360, 20), _line((0.74, 0.35), (0.66, 0.9))],
}
SUPERSAMPLE = 4  # strokes are drawn at 4x and box-filtered down: anti-aliased edges


def glyph(rng: np.random.Generator, cls: int) -> np.ndarray:
    """One glyph of class cls, (SIZE, SIZE) float32 in [0, 1]."""
    scale = rng.uniform(0.55, 0.85)
    angle, shear = np.radians(rng.uniform(-15, 15)), rng.uniform(-0.25, 0.25)
    transform = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ \
        np.array([[1, shear], [0, 1]]) * np.array([rng.uniform(0.85, 1.15), 1.0])
    margin = 0.5 * scale + 0.05
    centre = rng.uniform(margin, 1 - margin, size=2)
    canvas = Image.new("L", (SIZE * SUPERSAMPLE,) * 2)
    draw = ImageDraw.Draw(canvas)
    width = rng.uniform(1.4, 3.2) * SUPERSAMPLE
    for stroke in STROKES[cls]:
        pts = stroke + rng.normal(0, 0.025, stroke.shape)
        pts = ((pts - 0.5) @ transform.T + centre) * SIZE * SUPERSAMPLE
        draw.line([tuple(p) for p in pts], fill=255, width=round(width), joint="curve")
        for x, y in pts[[0, -1]]:  # round caps
            draw.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=255)
    return np.asarray(canvas.resize((SIZE, SIZE), Image.BOX), np.float32) / 255


def stacked(seed: int, index: int) -> tuple[np.ndarray, int]:
    """Three glyphs on R, G, B: ((SIZE, SIZE, 3) uint8, mode in [0, 1000))."""
    rng = np.random.default_rng([seed, index])
    classes = rng.integers(CLASSES, size=3)
    image = np.stack([glyph(rng, int(c)) for c in classes], -1)
    return (image * 255 + 0.5).astype(np.uint8), int(classes[0] * 100 + classes[1] * 10 + classes[2])


def glyph_batch(seed: int, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n single glyphs with their classes, for training and testing the classifier: (n, SIZE, SIZE), (n,)."""
    images, labels = np.empty((n, SIZE, SIZE), np.float32), np.empty(n, np.int64)
    for i in range(n):
        rng = np.random.default_rng([seed, 1, start + i])
        labels[i] = rng.integers(CLASSES)
        images[i] = glyph(rng, int(labels[i]))
    return images, labels
