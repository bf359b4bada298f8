"""Procedural long videos with one needle event, and questions about it (the demo's QA corpus).

A scene: a slowly drifting grey texture with a few grey shapes wandering over it; at one moment (the needle)
a large shape of one of four colours appears for `needle_frames` frames. Questions ask which colour and which
shape the needle had; each has four options, one per colour / shape, and answers are balanced by
construction (the needle's colour and shape cycle through all values). Everything is seeded.
"""

from __future__ import annotations

import dataclasses

import numpy as np

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 235), "yellow": (235, 220, 40)}
SHAPES = ("square", "circle", "triangle", "bar")
QUESTIONS = {
    "colour": ("What colour was the shape that appeared?", tuple(COLOURS)),
    "shape": ("What shape appeared?", SHAPES),
}


@dataclasses.dataclass(frozen=True)
class Needle:
    colour: str
    shape: str
    start: int  # first frame showing it
    frames: int


def _mask(shape: str, size: int, cx: float, cy: float, res: int) -> np.ndarray:
    y, x = np.mgrid[0:res, 0:res].astype(np.float32)
    dx, dy, r = x - cx, y - cy, size / 2
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "triangle":  # apex up
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    return (np.abs(dx) <= r) & (np.abs(dy) <= r / 3)  # a horizontal bar


def scene(frames: int, needle: Needle, seed: int, res: int = 32) -> np.ndarray:
    """uint8 [frames, res, res, 3]: the grey moving scene with the needle shown at its frames."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:res, 0:res].astype(np.float32)
    fx, fy, phase = rng.uniform(0.1, 0.35, 2).tolist() + [rng.uniform(0, 6.28)]
    base = rng.uniform(70, 150)
    walkers = [(rng.uniform(0, res, 2), rng.uniform(-0.6, 0.6, 2), rng.uniform(4, 7), rng.uniform(40, 210))
               for _ in range(3)]  # fmt: skip
    cx, cy = rng.uniform(res * 0.35, res * 0.65, 2)
    size = rng.uniform(res * 0.5, res * 0.65)
    needle_mask = _mask(needle.shape, size, cx, cy, res)
    out = np.empty((frames, res, res, 3), np.uint8)
    for t in range(frames):
        tex = base + 30 * np.sin(fx * x + 0.05 * t + phase) * np.cos(fy * y - 0.03 * t)
        img = np.repeat(tex[..., None], 3, axis=-1)
        for p, v, r, g in walkers:
            px, py = (p + v * t) % res
            img[(x - px) ** 2 + (y - py) ** 2 <= r * r] = g
        if needle.start <= t < needle.start + needle.frames:
            img[needle_mask] = COLOURS[needle.colour]
        out[t] = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    return out


def needles(n: int, frames: int, needle_frames: int, seed: int) -> list[Needle]:
    """n needles with balanced colours and shapes and depths spread uniformly over the video."""
    rng = np.random.default_rng(seed)
    colours = np.resize(list(COLOURS), n)
    shapes = np.resize(SHAPES, n)
    rng.shuffle(colours)
    rng.shuffle(shapes)
    last = frames - needle_frames
    starts = ((np.arange(n) + rng.uniform(0, 1, n)) / n * (last + 1)).astype(int)  # stratified depths
    rng.shuffle(starts)
    return [
        Needle(str(c), str(s), int(t), needle_frames) for c, s, t in zip(colours, shapes, starts, strict=True)
    ]


def answer(needle: Needle, kind: str) -> str:
    return needle.colour if kind == "colour" else needle.shape


def options_text(kind: str) -> list[str]:
    """The four option answers of a question kind, as the model is trained to say them."""
    return [f"{o.capitalize()}." for o in QUESTIONS[kind][1]]
