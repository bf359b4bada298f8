"""Video decoding for pre-tokenization: frames sampled at a target fps (or N uniformly), resized and centre-cropped,
streamed in bounded chunks from a worker process.

- Sampling (`frame_indices`): at `fps` frames per second (default 1; all frames when the video's rate is lower)
  or `num_frames` spread uniformly (the centre frame of `num_frames` equal parts). `max_frames` caps either:
  when fps sampling would give more, `max_frames` frames are spread uniformly over the whole video instead.
  Every frame comes with its presentation timestamp in seconds (from the container).
- Length before decoding: with `frame_limit`, a video that would sample more frames is rejected with
  `TooManyFrames` (its frame count, rate and sampled count, from the container's metadata) before any frame is
  decoded; `fps_within` is the rate that would sample few enough.
- Still images (PNG, JPEG, BMP, WebP, TIFF, GIF; recognised by content, read with PIL, EXIF-rotated) are
  one-frame videos at 1 fps, resized and cropped like video frames; an animated one is refused with a hint.
- Progress: `Decoder(progress=...)` shows a bar of decoded frames on stderr for a decode that takes more than
  `progress_delay_s` (the worker reports every few frames).
- Memory: frames travel in chunks of `chunk_frames`; the worker blocks on the pipe until the previous chunk is
  taken, so at most about two chunks of one video are in memory, however long the video.
- Overlap: `frames(uri, then=next_uri)` queues the next video behind this one, so the worker decodes it while
  the caller is still busy with this one's last chunk (many short clips otherwise leave the worker idle).
- Isolation: decord runs in a separate process (multiprocessing `spawn`, never a fork of a process running
  jax). A file that crashes it (segfault, abort) or hangs it (`timeout_s`) costs that file only: the consumer
  gets a `DecodeError` naming the signal, and the next file starts a fresh worker.
- `gs://` videos: decord given a file object reads it whole into memory, so a remote video is first streamed to
  a bounded local cache (`storage.FileCache`) and decoded from that path; the copy is deleted after decoding.
- Failures are `DecodeError(reason)` with one of the reasons: empty file, not found, cannot open as a video
  (truncated, random bytes, unsupported container), no video stream (audio-only), no frames, decode failed at
  frame k, decoder process died (signal), timed out.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import signal
import sys
import tempfile
from collections.abc import Iterator

import numpy as np

from lvm.data_pipeline import storage


class DecodeError(Exception):
    """A video that could not be decoded; `str(err)` is the reason."""


class TooManyFrames(DecodeError):
    """A video that would sample `sampled` frames, more than `DecodeConfig.frame_limit`: known from the
    container's frame count and rate before any frame is decoded."""

    def __init__(self, frames: int, fps: float, sampled: int, limit: int):
        super().__init__(
            f"{sampled} frames would be sampled ({frames} frames at {fps:g} fps), more than the limit of {limit}"
        )
        self.frames, self.fps, self.sampled, self.limit = frames, fps, sampled, limit


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How frames are chosen and shaped (see the module docstring)."""

    resolution: int = 256  # output frames are [resolution, resolution, 3]
    fps: float = 1.0  # target sampling rate (ignored when num_frames is set)
    num_frames: int | None = None  # N frames uniformly over the video instead of fps sampling
    max_frames: int | None = None  # cap on frames per video
    chunk_frames: int = 32  # frames per chunk sent from the worker
    threads: int = 1  # decord decoding threads per worker
    frame_limit: int | None = None  # more sampled frames than this: `TooManyFrames` before decoding any

    def __post_init__(self):
        if self.resolution < 1 or self.chunk_frames < 1 or self.threads < 0:
            raise ValueError(f"need resolution >= 1, chunk_frames >= 1, threads >= 0; got {self}")
        if self.num_frames is None and not self.fps > 0:
            raise ValueError(f"fps must be > 0 (or set num_frames), got {self.fps}")
        for name in ("num_frames", "max_frames", "frame_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")


@dataclasses.dataclass
class VideoInfo:
    """What the container says: frame count, average rate, size; `sampled` frames will be decoded."""

    frames: int
    fps: float
    height: int
    width: int
    sampled: int


@dataclasses.dataclass
class Chunk:
    frames: np.ndarray  # uint8 [k, resolution, resolution, 3]
    timestamps: np.ndarray  # float64 [k] seconds
    indices: np.ndarray  # int64 [k] frame numbers in the video


def frame_indices(n_frames: int, native_fps: float, cfg: DecodeConfig) -> np.ndarray:
    """Sorted, distinct frame numbers to decode from a video of `n_frames` at `native_fps`."""
    if n_frames <= 0:
        return np.zeros(0, np.int64)
    cap = cfg.max_frames
    if cfg.num_frames is not None:
        k = min(cfg.num_frames, n_frames)
    elif cfg.fps >= native_fps:  # every frame
        if cap is None or n_frames <= cap:
            return np.arange(n_frames, dtype=np.int64)
        k = n_frames
    else:
        k = max(1, min(int(np.ceil(n_frames / native_fps * cfg.fps - 1e-9)), n_frames))
        if cap is None or k <= cap:
            idx = np.floor(np.arange(k) * native_fps / cfg.fps + 1e-6).astype(np.int64)
            return np.unique(np.minimum(idx, n_frames - 1))
    if cap is not None:
        k = min(k, cap)
    return np.unique(np.floor((np.arange(k) + 0.5) * n_frames / k).astype(np.int64))


def fps_within(n_frames: int, native_fps: float, max_sampled: int) -> float:
    """The highest rate of two significant digits at which fps sampling takes at most `max_sampled` (>= 1)
    frames of a video of `n_frames` at `native_fps`."""
    fps = max_sampled * native_fps / n_frames
    digits = 1 - math.floor(math.log10(fps))  # decimals that keep two significant digits
    fps = round(math.floor(fps * 10**digits) / 10**digits, max(digits, 0))
    while fps > 10**-digits and len(frame_indices(n_frames, native_fps, DecodeConfig(fps=fps))) > max_sampled:
        fps = round(fps - 10**-digits, max(digits, 0))  # float rounding only: at most a step or two
    return fps


# The worker process -----------------------------------------------------------------------------------------

IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "TIFF", "GIF")  # read with PIL as one-frame videos
PROGRESS_FRAMES = 4  # the worker decodes this many frames at a time and reports progress after each


def _open_image(path: str):
    """`path` as a PIL image when its content is one of `IMAGE_FORMATS`, else None (a video, or not found)."""
    from PIL import Image

    try:
        return Image.open(path, formats=IMAGE_FORMATS)  # reads the header only
    except (OSError, ValueError):  # not an image (UnidentifiedImageError is an OSError), missing, empty
        return None


def _open(path: str, threads: int):
    import decord

    if not os.path.exists(path):
        raise DecodeError(f"not found: {path}")
    if os.path.getsize(path) == 0:
        raise DecodeError("empty file (0 bytes)")
    try:
        return decord.VideoReader(path, num_threads=threads)
    except Exception as err:
        message = str(err)
        if "cannot find video stream" in message:
            raise DecodeError("no video stream (audio-only or not a video)") from None
        first = message.strip().splitlines()[0] if message.strip() else type(err).__name__
        raise DecodeError(f"cannot open as a video (truncated, corrupt or unsupported): {first}") from None


def _decode_file(conn, path: str, cfg: DecodeConfig) -> None:
    """Send ("sampling", count), then ("decoded", done so far) every few frames, ("info", VideoInfo) after the
    first frames and ("chunk", Chunk) after every `chunk_frames`; `TooManyFrames` before decoding any."""
    from lvm.tokenizers.video import resize_crop

    image = _open_image(path)
    if image is not None:
        _decode_image(conn, image, cfg)
        return
    reader = _open(path, cfg.threads)
    n = len(reader)
    if n == 0:
        raise DecodeError("no frames")
    fps = float(reader.get_avg_fps())
    if not fps > 0:
        raise DecodeError(f"unknown frame rate ({fps})")
    idx = frame_indices(n, fps, cfg)
    if cfg.frame_limit is not None and len(idx) > cfg.frame_limit:
        raise TooManyFrames(n, fps, len(idx), cfg.frame_limit)
    conn.send(("sampling", len(idx)))
    for start in range(0, len(idx), cfg.chunk_frames):
        part = idx[start : start + cfg.chunk_frames]
        resized = []
        for at in range(0, len(part), PROGRESS_FRAMES):  # resized as they come: one full-size batch in memory
            few = part[at : at + PROGRESS_FRAMES].tolist()
            try:
                frames = reader.get_batch(few).asnumpy()  # [k, h, w, 3]
            except Exception as err:
                raise DecodeError(f"decode failed at frame {few[0]}: {str(err).strip()[:200]}") from None
            if start == at == 0:
                conn.send(("info", VideoInfo(n, fps, frames.shape[1], frames.shape[2], len(idx))))
            resized.append(resize_crop(frames, cfg.resolution))
            conn.send(("decoded", start + at + len(few)))
        try:
            stamps = np.asarray(reader.get_frame_timestamp(part.tolist()), np.float64)[:, 0]  # from the index
        except Exception as err:
            raise DecodeError(f"no timestamps at frame {int(part[0])}: {str(err).strip()[:200]}") from None
        conn.send(("chunk", Chunk(np.concatenate(resized), stamps, part)))


def _decode_image(conn, image, cfg: DecodeConfig) -> None:
    """A still image as a one-frame video at 1 fps (the frame at 0 s), through the same messages."""
    from PIL import ImageOps

    from lvm.tokenizers.video import resize_crop

    with image:
        if getattr(image, "n_frames", 1) > 1:
            raise DecodeError(
                f"an animated {image.format} ({image.n_frames} frames): convert it to a video first, e.g. "
                "`ffmpeg -i in.gif out.mp4`"
            )
        try:
            frame = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))[None]  # [1, h, w, 3]
        except Exception as err:  # truncated or corrupt pixel data
            raise DecodeError(f"cannot read the {image.format} image (truncated or corrupt): {err}") from None
    conn.send(("sampling", 1))
    conn.send(("info", VideoInfo(1, 1.0, frame.shape[1], frame.shape[2], 1)))
    conn.send(("decoded", 1))
    chunk = Chunk(resize_crop(frame, cfg.resolution), np.zeros(1, np.float64), np.zeros(1, np.int64))
    conn.send(("chunk", chunk))


def _worker_main(conn) -> None:
    """Serve decode requests `(path, cfg)` until `None` arrives."""
    while True:
        request = conn.recv()
        if request is None:
            return
        path, cfg = request
        try:
            _decode_file(conn, path, cfg)
            conn.send(("done", None))
        except TooManyFrames as err:  # sent as its fields: the consumer rebuilds it
            conn.send(("too_many", (err.frames, err.fps, err.sampled, err.limit)))
        except DecodeError as err:
            conn.send(("error", str(err)))
        except Exception as err:  # anything else is still one file's failure
            conn.send(("error", f"{type(err).__name__}: {err}"))


# The consumer side ------------------------------------------------------------------------------------------


class Decoder:
    """Decodes one video at a time in a worker process: `for chunk in decoder.frames(uri): ...`.

    `frames` raises `DecodeError` for a file that cannot be decoded (`TooManyFrames` for one over
    `cfg.frame_limit`); the decoder stays usable. `info` holds the last video's `VideoInfo`. `progress`: a bar of
    decoded frames on stderr for each video that takes over `progress_delay_s` (None: when stderr is a
    terminal). Use as a context manager or call `close()`.
    """

    def __init__(
        self,
        cfg: DecodeConfig = DecodeConfig(),
        cache: storage.FileCache | None = None,
        timeout_s: float = 600.0,
        progress: bool | None = False,
        progress_delay_s: float = 3.0,
    ):
        self.cfg = cfg
        self.timeout_s = timeout_s
        self.progress, self.progress_delay_s = progress, progress_delay_s
        self._own_cache = cache is None
        self.cache = cache or storage.FileCache(tempfile.mkdtemp(prefix="lvm-videos-"), max_bytes=8 << 30)
        self._proc = None
        self._conn = None
        self._queued: tuple[str, str] | None = None  # (uri, local path) sent to the worker behind the current
        self.info: VideoInfo | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="lvm-decoder")
        self._proc.start()
        child.close()

    def _stop(self, kill: bool) -> None:
        if self._queued is not None:  # dropped with its worker (fetched again if asked for)
            uri, self._queued = self._queued[0], None
            self.cache.release(uri)
            self.cache.discard(uri)
            kill = True
        if self._proc is None:
            return
        if kill:
            self._proc.kill()
        else:
            try:
                self._conn.send(None)
            except OSError:
                pass
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()
        self._proc = self._conn = None

    def _recv(self):
        if not self._conn.poll(self.timeout_s):
            self._stop(kill=True)
            raise DecodeError(f"timed out after {self.timeout_s:.0f} s")
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(timeout=10)
            code = self._proc.exitcode
            self._stop(kill=True)
            if code is not None and code < 0:
                raise DecodeError(f"decoder process died ({signal.Signals(-code).name})") from None
            raise DecodeError(f"decoder process died (exit status {code})") from None

    def frames(self, uri: str, then: str | None = None) -> Iterator[Chunk]:
        """Chunks of sampled frames of one video (local path or `gs://` URI), in order. `then`: the video the
        caller will ask for next; the worker starts on it as soon as this one is decoded."""
        self.info = None
        if self._queued is not None and self._queued[0] != uri:
            self._stop(kill=True)  # the worker is busy with a file the caller no longer wants
        queued, self._queued = self._queued, None
        path = queued[1] if queued else self._fetch(uri)  # a queued file was fetched and pinned when sent
        finished = False
        bar = None
        try:
            if queued is None:
                if self._proc is None or not self._proc.is_alive():
                    self._start()
                self._conn.send((path, self.cfg))
            if then is not None:
                self._send_ahead(then)
            while True:
                kind, payload = self._recv()
                if kind == "sampling":
                    bar = self._bar(uri, payload)
                elif kind == "decoded":
                    if bar is not None:
                        bar.update(payload - bar.n)
                elif kind == "info":
                    self.info = payload
                elif kind == "chunk":
                    yield payload
                elif kind == "done":
                    finished = True
                    return
                elif kind == "too_many":
                    finished = True
                    raise TooManyFrames(*payload)
                else:
                    finished = True
                    raise DecodeError(payload)
        finally:
            if bar is not None:
                bar.close()
            if not finished and self._proc is not None:
                self._stop(kill=True)  # abandoned mid-file: the worker may still be sending
            self.cache.release(uri)
            self.cache.discard(uri)

    def _bar(self, uri: str, total: int):
        if self.progress is False:
            return None
        from tqdm import tqdm

        name = uri.rstrip("/").rsplit("/", 1)[-1] or uri
        disable = None if self.progress is None else False  # None: tqdm shows it on a terminal only
        return tqdm(total=total, desc=f"decoding {name}", unit="frame", file=sys.stderr, leave=False,
                    delay=self.progress_delay_s, disable=disable)  # fmt: skip

    def _fetch(self, uri: str) -> str:
        try:
            return self.cache.fetch(uri, pin=True)
        except FileNotFoundError:
            raise DecodeError(f"not found: {uri}") from None
        except OSError as err:
            raise DecodeError(f"download failed: {err}") from None

    def _send_ahead(self, uri: str) -> None:
        """Queue `uri` behind the current file; a file that cannot be fetched is left for `frames` to report."""
        try:
            path = self._fetch(uri)
        except DecodeError:
            return
        self._conn.send((path, self.cfg))
        self._queued = (uri, path)

    def decode(self, uri: str) -> tuple[np.ndarray, np.ndarray]:
        """All sampled frames `[T, R, R, 3]` and timestamps `[T]` of one video (short videos only)."""
        chunks = list(self.frames(uri))
        return np.concatenate([c.frames for c in chunks]), np.concatenate([c.timestamps for c in chunks])

    def close(self) -> None:
        self._stop(kill=False)
        if self._own_cache:
            import shutil

            shutil.rmtree(self.cache.root, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
