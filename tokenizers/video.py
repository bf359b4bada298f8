"""Video input: list videos from a folder or manifest, decode frames with decord, resize and centre-crop them;
an unreadable video is a `VideoError` that a job's `lvm.job_report.JobReport` records before going on."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lvm.job_report import JobReport, attempt

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")


class VideoError(ValueError):
    """A video that cannot be read; the message names the file and the cause."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read the video {path}: {reason}")


def list_videos(source: str | os.PathLike) -> list[str]:
    """Video paths in a folder (recursively, sorted) or a manifest file (one path per line, relative to it).
    A manifest may name missing files: they fail when read."""
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


def _reader(path: str):
    """A decord VideoReader of a local file; `VideoError` (not found, empty, truncated or corrupt, no video
    stream, no frames) when there is none."""
    from lvm.data_pipeline.decode import DecodeError, open_video

    try:
        reader = open_video(path, threads=1)
    except DecodeError as err:
        raise VideoError(path, str(err)) from None
    if len(reader) == 0:
        raise VideoError(path, "no frames")
    return reader


def num_frames(path: str) -> int:
    return len(_reader(path))


def read_frames(path: str, indices, resolution: int) -> np.ndarray:
    """Frames `indices` of a video as uint8 `[len(indices), resolution, resolution, 3]`.

    The shorter side is resized to `resolution` (antialiased), then the centre square is cropped.
    """
    indices = list(indices)
    reader = _reader(path)
    try:
        frames = reader.get_batch(indices).asnumpy()  # [n, h, w, 3]
    except Exception as err:  # decord raises bare RuntimeErrors (with a C++ log line) for a damaged stream
        cause = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise VideoError(path, f"decode failed at frame {indices[0] if indices else 0}: {cause}") from None
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


def readable_videos(paths: list[str], report: JobReport) -> dict[str, int]:
    """Frame counts of the videos that open; each that does not is recorded in `report`. `ValueError` when none
    does."""
    lengths = {}
    for path in paths:
        n = attempt(report, path, functools.partial(num_frames, path))
        if n is not None:
            lengths[path] = n
    if not lengths:
        raise ValueError(f"none of the {len(paths)} videos could be read (listed in {report.path})")
    return lengths


def sample_frames(
    paths: list[str],
    batch_size: int,
    frames_per_video: int,
    resolution: int,
    seed: int,
    lengths: dict[str, int] | None = None,
    report: JobReport | None = None,
) -> Iterator[np.ndarray]:
    """Endless batches uint8 `[batch_size, R, R, 3]`: random videos, random frames of each (sorted).

    `lengths` (path -> frame count, from `readable_videos`) saves opening each video twice. With `report`, a
    video that fails to decode is recorded there and no longer sampled (`ValueError` once none is left);
    without it, its `VideoError` is raised."""
    rng = np.random.default_rng(seed)
    pool = list(paths)
    lengths = dict(lengths or {})
    while True:
        batch, have = [], 0
        while have < batch_size:
            if not pool:
                raise ValueError(f"none of the {len(paths)} videos could be read")
            path = pool[rng.integers(len(pool))]
            most = min(frames_per_video, batch_size - have)
            frames = attempt(
                report, path, functools.partial(_random_frames, path, most, lengths, resolution, rng)
            )
            if frames is None:  # recorded in the report
                pool.remove(path)
                continue
            batch.append(frames)
            have += len(frames)
        yield np.concatenate(batch)


def _random_frames(path: str, most: int, lengths: dict[str, int], resolution: int, rng) -> np.ndarray:
    """Up to `most` random frames of a video (in order); its frame count is cached in `lengths`."""
    if path not in lengths:
        lengths[path] = num_frames(path)
    k = min(most, lengths[path])
    return read_frames(path, np.sort(rng.choice(lengths[path], size=k, replace=False)), resolution)


def evenly_spaced_frames(path: str, count: int, resolution: int) -> np.ndarray:
    """`count` frames spread evenly over a video (all frames if it has fewer)."""
    n = num_frames(path)
    idx = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))
    return read_frames(path, idx, resolution)
