"""The built-in synthetic data set: one bright shape (circle, square, triangle) on a dark background, drawn
from a seed.
"""
import numpy as np
import torch

SHAPES = ["circle", "square", "triangle"]


def make_shapes(n: int, size: int, channels: int, seed: int):
    """n images of one bright shape on a dark background; labels index SHAPES. Deterministic in seed.

    Each shape spans 60-90% of the image in width and height (covering roughly 20-60% of it). Edges are
    anti-aliased analytically: a pixel's coverage is 0.5 minus its signed distance (in pixels) to the
    outline, clipped to [0, 1], which looks like supersampling at a fraction of the cost."""
    draws = shape_draws(n, size, channels, seed)
    kind, r, cx, cy, fg, bg = (draws[k] for k in ("kind", "r", "cx", "cy", "fg", "bg"))
    p = np.arange(size) + 0.5  # pixel centres
    images = np.empty((n, channels, size, size), dtype=np.uint8)
    step = max(1, 2 ** 22 // size ** 2)  # images per chunk: a few million pixels keep the arrays small
    for i in range(0, n, step):
        chunk = slice(i, i + step)
        dx = np.abs(p[None, None, :] - cx[chunk, None, None])  # |x| suffices: all shapes are mirror-symmetric
        dy = p[None, :, None] - cy[chunk, None, None]  # y grows downwards
        rr = r[chunk, None, None]
        distance = np.stack([
            np.hypot(dx, dy) - rr,  # circle of radius r
            np.maximum(dx, np.abs(dy)) - 0.85 * rr,  # axis-aligned square of side 1.7 r
            np.maximum(dy - rr, (2 * dx - dy - rr) / np.sqrt(5)),  # apex (0, -r), base corners (+-r, r)
        ])
        d = np.take_along_axis(distance, kind[None, chunk, None, None], axis=0)[0]
        cover = np.clip(0.5 - d, 0, 1)[:, None]
        images[chunk] = np.round(255 * (bg[chunk, :, None, None] + cover * (fg - bg)[chunk, :, None, None]))
    return torch.from_numpy(images), torch.from_numpy(kind)


def shape_draws(n: int, size: int, channels: int, seed: int) -> dict:
    """The random choices behind make_shapes's images: kind, half extent r and centre (cx, cy) in pixels, and
    the foreground and background colours (RGB: from HSV, with the foreground's hue in [0, 1) kept as `hue`)."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, len(SHAPES), n)
    r = rng.uniform(0.3, 0.45, n) * size  # half the extent, in pixels
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)  # the whole shape inside the image
    hue = None
    if channels == 3:
        hue = rng.uniform(0, 1, n)
        fg = _hsv_to_rgb(hue, rng.uniform(0.7, 1, n), rng.uniform(0.85, 1, n))
        bg = _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0, 0.6, n), rng.uniform(0.05, 0.3, n))
    else:
        fg, bg = rng.uniform(0.7, 1, (n, 1)), rng.uniform(0, 0.3, (n, 1))
    return {"kind": kind, "r": r, "cx": cx, "cy": cy, "hue": hue, "fg": fg, "bg": bg}


def _hsv_to_rgb(h, saturation, v):
    """Vectorised HSV to RGB (all in [0, 1]): n values each -> n x 3."""
    k = (np.array([5, 3, 1]) + 6 * h[:, None]) % 6
    return v[:, None] - (v * saturation)[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)
