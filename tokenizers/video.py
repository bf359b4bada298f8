"""Video input: list videos from a folder or manifest, decode frames with decord, resize and centre-crop them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")


def list_videos(source: str | os.PathLike) -> list[str]:
    """Video paths in a folder (recursively, sorted) or a manifest file (one path per line, relative to it)."""
    source = Path(source)
    if source.is_dir():
        paths = sorted(str(p) for p in source.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
    elif source.is_file():
        lines = [ln.strip() for ln in source.read_text().splitlines()]
        paths = [str(source.parent / ln) for ln in lines if ln and not ln.startswith("#")]
    else:
        raise FileNotFoundError(f"no video folder or manifest at {source}")
    if not paths:
        raise ValueError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) found in {source}")
    return paths


def num_frames(path: str) -> int:
    import decord

    return len(decord.VideoReader(path, num_threads=1))


def read_frames(path: str, indices, resolution: int) -> np.ndarray:
    """Frames `indices` of a video as uint8 `[len(indices), resolution, resolution, 3]`.

    The shorter side is resized to `resolution` (antialiased), then the centre square is cropped.
    """
    import decord

    frames = decord.VideoReader(path, num_threads=1).get_batch(list(indices)).asnumpy()  # [n, h, w, 3]
    return resize_crop(frames, resolution)


def resize_crop(frames: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 `[n, h, w, 3]` -> `[n, resolution, resolution, 3]`: short side resized (antialiased), centre crop."""
    from PIL import Image

    h, w = frames.shape[1:3]
    scale = resolution / min(h, w)
    new_h, new_w = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    box = (left, top, left + resolution, top + resolution)
    out = [
        np.asarray(Image.fromarray(f).resize((new_w, new_h), Image.BICUBIC, reducing_gap=2.0).crop(box))
        for f in frames
    ]
    return np.stack(out).reshape(len(frames), resolution, resolution, 3)


def sample_frames(
    paths: list[str], batch_size: int, frames_per_video: int, resolution: int, seed: int
) -> Iterator[np.ndarray]:
    """Endless batches uint8 `[batch_size, R, R, 3]`: random videos, random frames of each (sorted)."""
    rng = np.random.default_rng(seed)
    lengths: dict[str, int] = {}
    while True:
        batch, have = [], 0
        while have < batch_size:
            path = paths[rng.integers(len(paths))]
            if path not in lengths:
                lengths[path] = num_frames(path)
            k = min(frames_per_video, lengths[path], batch_size - have)
            idx = np.sort(rng.choice(lengths[path], size=k, replace=False))
            batch.append(read_frames(path, idx, resolution))
            have += k
        yield np.concatenate(batch)


def evenly_spaced_frames(path: str, count: int, resolution: int) -> np.ndarray:
    """`count` frames spread evenly over a video (all frames if it has fewer)."""
    n = num_frames(path)
    idx = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))
    return read_frames(path, idx, resolution)
