"""Procedural long videos with one needle event (and optionally a second event), and questions about them (the
demo's QA corpus).

A scene: a slowly drifting grey texture with two small grey discs wandering over it. At one moment (the needle)
the video cuts for `needle_frames` frames to a card: a large shape (80% of the frame, centred) of one of four
colours on a dark ground. A card is the same image (without the scene's pixel noise) wherever it appears, so the
tiny VQGAN gives it the same codes in every video (pixel noise would spread a card over many code patterns). A
shape drawn over the moving texture instead gets codes that vary with the texture (at 4 x 4 codes per frame every
code sees the whole frame), which a small language model cannot learn from in the demo's budget.
Questions ask which colour and which shape the needle had (four options, one per colour / shape).
Optionally a second event: at some frame the lights go out (the scene darkens and stays dark, and a card shown
after that has a dark ground instead of a lit grey one: the shape glows), a few frames before the needle or a few
frames after it, so neither the needle's depth nor the dark share of the video gives the order away; a third
question asks whether the needle appeared before or after the lights went out (two options). Answers are balanced
by construction (colours, shapes and orders cycle through all values). Everything is seeded.
"""

from __future__ import annotations

import dataclasses

import numpy as np

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 235), "yellow": (235, 220, 40)}
CARD_GROUND = 20  # grey level behind the needle's shape
LIT_CARD_GROUND = 110  # in a video whose lights go out: the card's ground before they do (the shape glows)
SHAPES = ("square", "bar", "column", "cross")  # distinct even at 4 x 4 codes per frame
DARK = 0.5  # brightness of the scene once the lights are out
QUESTIONS = {
    "colour": ("What colour was the shape that appeared?", tuple(COLOURS)),
    "shape": ("What shape appeared?", SHAPES),
    "order": ("Did the shape appear before or after the lights went out?", ("before", "after")),
}
FOUR_OPTION = ("colour", "shape")  # the headline accuracy; "order" is reported beside it
# Training also asks each question in these words (more answers per long video for the same compute);
# evaluation asks the words in QUESTIONS.
REPHRASED = {
    "colour": "Which colour did the card show?",
    "shape": "Which shape was on the card?",
    "order": "Was the card shown before or after the scene went dark?",
}


@dataclasses.dataclass(frozen=True)
class Needle:
    colour: str
    shape: str
    start: int  # first frame showing it
    frames: int
    lights_out: int | None = None  # first dark frame (None: the lights stay on)

    @property
    def end(self) -> int:
        return self.start + self.frames


def _mask(shape: str, size: float, cx: float, cy: float, res: int) -> np.ndarray:
    y, x = np.mgrid[0:res, 0:res].astype(np.float32)
    dx, dy, r = np.abs(x - cx), np.abs(y - cy), size / 2
    bar = (dx <= r) & (dy <= r / 3)  # horizontal
    column = (dx <= r / 3) & (dy <= r)
    if shape == "square":
        return (dx <= r) & (dy <= r)
    if shape == "bar":
        return bar
    if shape == "column":
        return column
    return bar | column  # a cross


def scene(frames: int, needle: Needle, seed: int, res: int = 32) -> np.ndarray:
    """uint8 [frames, res, res, 3]: the grey moving scene with the needle shown at its frames, darkened from
    `needle.lights_out` on."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:res, 0:res].astype(np.float32)
    fx, fy, phase = rng.uniform(0.1, 0.3, 2).tolist() + [rng.uniform(0, 6.28)]
    base = rng.uniform(90, 140)
    walkers = [(rng.uniform(0, res, 2), rng.uniform(-0.6, 0.6, 2) * res / 32, rng.uniform(2.5, 4) * res / 32, rng.uniform(60, 190))
               for _ in range(2)]  # fmt: skip
    needle_mask = _mask(needle.shape, res * 0.8, (res - 1) / 2, (res - 1) / 2, res)
    out = np.empty((frames, res, res, 3), np.uint8)
    for t in range(frames):
        dark = needle.lights_out is not None and t >= needle.lights_out
        if needle.start <= t < needle.end:  # the card replaces the whole frame: the same image every time
            lit = needle.lights_out is not None and not dark
            out[t] = LIT_CARD_GROUND if lit else CARD_GROUND
            out[t][needle_mask] = COLOURS[needle.colour]
            continue
        tex = base + 15 * np.sin(fx * x * 32 / res + 0.05 * t + phase) * np.cos(fy * y * 32 / res - 0.03 * t)
        img = np.repeat(tex[..., None], 3, axis=-1)
        for p, v, r, g in walkers:
            px, py = (p + v * t) % res
            img[(x - px) ** 2 + (y - py) ** 2 <= r * r] = g
        if dark:
            img *= DARK
        out[t] = np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)  # sensor noise
    return out


def needles(n: int, frames: int, needle_frames: int, seed: int) -> list[Needle]:
    """n needles with balanced colours and shapes and depths spread uniformly over the video (a clip shorter than
    the needle shows it in all its frames)."""
    rng = np.random.default_rng(seed)
    colours = np.resize(list(COLOURS), n)
    shapes = np.resize(SHAPES, n)
    rng.shuffle(colours)
    rng.shuffle(shapes)
    last = frames - needle_frames
    starts = ((np.arange(n) + rng.uniform(0, 1, n)) / n * max(last + 1, 0)).astype(int)  # stratified depths
    rng.shuffle(starts)
    return [
        Needle(str(c), str(s), int(t), needle_frames) for c, s, t in zip(colours, shapes, starts, strict=True)
    ]


def with_lights_out(needle: Needle, frames: int, after: bool, seed: int) -> Needle:
    """`needle` with the lights going out a random 1 to max(1, frames / 8) frames before it starts (`after`: the
    needle comes after the lights go out) or after it ends; the other order when that side has no room, and no
    lights-out when neither side has (at least one lit and one dark scene frame are always shown)."""
    rng = np.random.default_rng(seed)
    most = max(1, frames // 8)
    room = {True: needle.start - 1, False: frames - 1 - needle.end}  # free frames before / after the card
    for side in (after, not after):
        if room[side] >= 1:
            gap = int(rng.integers(1, min(most, room[side]) + 1))
            out = needle.start - gap if side else needle.end + gap
            return dataclasses.replace(needle, lights_out=out)
    return needle


def with_balanced_lights_out(needles: list[Needle], frames: int, seed: int) -> list[Needle]:
    """`with_lights_out` for a set of needles, the order alternating along their depths (the earliest needle comes
    before the lights go out, the latest after, when the count is even): the two answers are balanced, every
    needle has room on its side, and the depth alone does not tell the order."""
    rank = np.argsort(np.argsort([n.start for n in needles], kind="stable"))
    return [with_lights_out(n, frames, bool(rank[i] % 2), seed * 7919 + i) for i, n in enumerate(needles)]


def kinds(lights_out: bool) -> tuple[str, ...]:
    """The questions asked about a video: the order question only where the lights go out."""
    return FOUR_OPTION + (("order",) if lights_out else ())


def chance(kind: str) -> float:
    return 1 / len(QUESTIONS[kind][1])


def answer(needle: Needle, kind: str) -> str:
    if kind == "order":
        if needle.lights_out is None:
            raise ValueError("an order question needs a needle with a lights-out event")
        return "after" if needle.start >= needle.lights_out else "before"
    return needle.colour if kind == "colour" else needle.shape


def options_text(kind: str) -> list[str]:
    """The four option answers of a question kind, as the model is trained to say them."""
    return [f"{o.capitalize()}." for o in QUESTIONS[kind][1]]
