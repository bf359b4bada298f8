"""Synthetic test videos: moving coloured discs and sliding stripes over gradients, written as h264 mp4."""

from __future__ import annotations

import os
import subprocess
from fractions import Fraction

import numpy as np


def moving_pattern(height: int, width: int, frames: int, seed: int) -> np.ndarray:
    """uint8 `[frames, height, width, 3]`: a gradient background, sliding stripes and moving discs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x / width + np.sin(angle) * y / height + 1) / 2
    background = c0 + (c1 - c0) * ramp[..., None]  # [H, W, 3]
    freq = rng.uniform(1.0, 4.0) / max(height, width)  # 1 to 4 stripes across the frame
    speed, stripe_color = rng.uniform(0.5, 2.0), rng.uniform(0, 255, 3)
    discs = [
        (rng.uniform(0, width), rng.uniform(0, height), rng.uniform(-3, 3), rng.uniform(-3, 3),
         rng.uniform(0.08, 0.2) * min(height, width), rng.uniform(0, 255, 3))
        for _ in range(rng.integers(1, 4))
    ]  # fmt: skip
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (x + y * 0.5 - speed * t))
        img = background * (1 - 0.5 * stripes[..., None]) + 0.5 * stripes[..., None] * stripe_color
        for cx, cy, vx, vy, r, color in discs:
            px, py = (cx + vx * t) % width, (cy + vy * t) % height
            inside = (x - px) ** 2 + (y - py) ** 2 < r * r
            img[inside] = color
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8) -> None:
    """Write uint8 `[T, H, W, 3]` as an h264 mp4 (odd H or W scaled up by one) with imageio-ffmpeg's ffmpeg.

    ffmpeg is started with `subprocess` directly, not `imageio_ffmpeg.write_frames`: that passes
    `preexec_fn=os.setpgrp`, which runs Python's fork hooks (JAX then warns that `os.fork()` in its
    multi-threaded process may deadlock). `start_new_session` gives ffmpeg its own session (Ctrl-C is not
    passed on mid-write) without Python code between fork and exec."""
    import imageio_ffmpeg

    frames = np.ascontiguousarray(frames, np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(f"write_video needs uint8 frames [T, H, W, 3], got shape {frames.shape}")
    _, h, w, _ = frames.shape
    rate = str(Fraction(fps).limit_denominator())  # exact rationals such as 30000/1001
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{w}x{h}", "-r", rate, "-i", "-", "-an", "-vcodec", "libx264", "-pix_fmt", "yuv420p",
           "-crf", "18", "-preset", "veryfast"]  # fmt: skip
    if h % 2 or w % 2:  # yuv420p needs even sizes
        cmd += ["-vf", f"scale={w + w % 2}:{h + h % 2}"]
    proc = subprocess.run(
        [*cmd, str(path)], input=frames.tobytes(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True, check=False,
    )  # fmt: skip
    if proc.returncode:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise OSError(
            f"ffmpeg could not write {path}: {err[-1] if err else f'exit status {proc.returncode}'}"
        )


def write_dataset(folder: str | os.PathLike, sizes, frames: int, seed: int) -> list[str]:
    """One moving-pattern mp4 per (height, width) in `sizes`, seeds seed, seed+1, ...; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = os.path.join(folder, f"pattern_{seed + i:04d}_{w}x{h}.mp4")
        write_video(path, moving_pattern(h, w, frames, seed + i))
        paths.append(path)
    return paths
