"""Video decoding for pre-tokenization: frames sampled at a target fps (or N uniformly), resized and centre-cropped,
streamed in bounded chunks from worker processes (`Decoder`: one; `DecodePool`: several, in order).

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
- Pool (`DecodePool(cfg, workers=N)`, what `lvm pretokenize` and `Model.read_videos` use): `schedule(uris)` then
  `frames(uri)` for each in turn gives exactly the chunks one worker gives (frames, timestamps, boundaries,
  failures), while N processes decode ahead: a short video is one unit of work, a long one is split into units
  of `segment_frames` sampled frames that different workers decode at once (each from the keyframe before its
  first frame: the same frames). Frames decoded ahead are bounded (`frames_in_flight`); a file that crashes or
  hangs its worker fails alone and the worker is replaced. Default workers: one per CPU but one, at most 32
  (`default_decode_workers`).
- Speed (`lvm bench data`, see the README): the pipeline keeps decord's `get_batch` (it seeks to each sampled
  frame's keyframe: as fast as reading every frame in order at 1 fps, far faster at lower rates), decord's own
  YUV->RGB conversion and PIL's antialiased bicubic resize: the faster resizes measured (in decord's swscale,
  or PIL on the crop's box only) change pixels, and the VQGAN is trained on these ones. One decord thread per
  worker: the workers are the parallelism.
- `gs://` videos: decord given a file object reads it whole into memory, so a remote video is first streamed to
  a bounded local cache (`storage.FileCache`) and decoded from that path; the copy is deleted after decoding.
- Failures are `DecodeError(reason)` with one of the reasons: empty file, not found, cannot open as a video
  (truncated, random bytes, unsupported container), no video stream (audio-only), no frames, decode failed at
  frame k, decoder process died (signal), timed out.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
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


def open_video(path: str, threads: int):
    """A decord VideoReader of a local file; `DecodeError` naming the cause (missing, empty, no video stream,
    truncated or corrupt) when there is none."""
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


_READER: tuple | None = None  # ((path, size, mtime, threads), reader): this worker's open video


def _reader(path: str, threads: int, reuse: bool):
    """A decord reader of `path`: with `reuse`, the one this worker opened last when it is of the same file (a
    later segment of the video it just decoded continues where that one stopped, without a seek)."""
    global _READER
    try:
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns, threads)
    except OSError:
        key = None
    if reuse and key is not None and _READER is not None and _READER[0] == key:
        return _READER[1]
    _READER = None  # frees the previous video's decoder first
    reader = open_video(path, threads)
    _READER = None if key is None else (key, reader)
    return reader


def _decode_file(conn, path: str, cfg: DecodeConfig, first: int = 0, end: int | None = None) -> None:
    """Decode chunks `first` to `end` (exclusive; None: to the last) of a video's `chunk_frames`-frame chunks.

    Send ("sampling", count), then ("decoded", done so far in the video) every few frames, ("info", VideoInfo)
    after the video's first frames and ("chunk", Chunk) after every chunk; `TooManyFrames` before decoding any.
    A chunk's frames do not depend on where decoding started: decord seeks to the keyframe before a frame and
    decodes forward, so segments decoded by different workers are the frames one worker would give."""
    from lvm.tokenizers.video import resize_crop

    image = _open_image(path) if first == 0 else None
    if image is not None:
        _decode_image(conn, image, cfg)
        return
    reader = _reader(path, cfg.threads, reuse=first > 0)
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
    stop = len(idx) if end is None else min(len(idx), end * cfg.chunk_frames)
    for start in range(first * cfg.chunk_frames, stop, cfg.chunk_frames):
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
    """Serve decode requests `(path, cfg, first_chunk, end_chunk)` until `None` arrives."""
    while True:
        request = conn.recv()
        if request is None:
            return
        path, cfg, first, end = request
        try:
            _decode_file(conn, path, cfg, first, end)
            conn.send(("done", None))
        except TooManyFrames as err:  # sent as its fields: the consumer rebuilds it
            conn.send(("too_many", (err.frames, err.fps, err.sampled, err.limit)))
        except DecodeError as err:
            conn.send(("error", str(err)))
        except Exception as err:  # anything else is still one file's failure
            conn.send(("error", f"{type(err).__name__}: {err}"))


# The consumer side ------------------------------------------------------------------------------------------


def _progress_bar(uri: str, total: int, progress: bool | None, delay_s: float):
    """A bar of decoded frames on stderr (None when `progress` is False; None: only on a terminal)."""
    if progress is False:
        return None
    from tqdm import tqdm

    name = uri.rstrip("/").rsplit("/", 1)[-1] or uri
    disable = None if progress is None else False  # None: tqdm shows it on a terminal only
    return tqdm(total=total, desc=f"decoding {name}", unit="frame", file=sys.stderr, leave=False,
                delay=delay_s, disable=disable)  # fmt: skip


def _fetch(cache: storage.FileCache, uri: str, pin: bool) -> str:
    """A local path of `uri` (a `gs://` video is downloaded into `cache`); failures are `DecodeError`s."""
    try:
        return cache.fetch(uri, pin=pin)
    except FileNotFoundError:
        raise DecodeError(f"not found: {uri}") from None
    except OSError as err:
        raise DecodeError(f"download failed: {err}") from None


class _Source:
    """What `Decoder` and `DecodePool` share: `decode`, use as a context manager, removing their own cache."""

    cache: storage.FileCache
    _own_cache: bool

    def frames(self, uri: str) -> Iterator[Chunk]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def decode(self, uri: str) -> tuple[np.ndarray, np.ndarray]:
        """All sampled frames `[T, R, R, 3]` and timestamps `[T]` of one video (short videos only)."""
        chunks = list(self.frames(uri))
        return np.concatenate([c.frames for c in chunks]), np.concatenate([c.timestamps for c in chunks])

    def _remove_cache(self) -> None:
        if self._own_cache:
            import shutil

            shutil.rmtree(self.cache.root, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Decoder(_Source):
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
                self._conn.send((path, self.cfg, 0, None))
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
        return _progress_bar(uri, total, self.progress, self.progress_delay_s)

    def _fetch(self, uri: str) -> str:
        return _fetch(self.cache, uri, pin=True)

    def _send_ahead(self, uri: str) -> None:
        """Queue `uri` behind the current file; a file that cannot be fetched is left for `frames` to report."""
        try:
            path = self._fetch(uri)
        except DecodeError:
            return
        self._conn.send((path, self.cfg, 0, None))
        self._queued = (uri, path)

    def close(self) -> None:
        self._stop(kill=False)
        self._remove_cache()


# A pool of workers --------------------------------------------------------------------------------------------

SEGMENT_FRAMES = 128  # sampled frames a unit of work: a long video is split into segments decoded in parallel
DEFAULT_FRAMES_IN_FLIGHT = 1024  # frames decoded ahead at most (192 MiB at 256x256), or one segment a worker
MAX_DEFAULT_WORKERS = 32


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, lowered by a cgroup v2 CPU quota (containers)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n)


def default_decode_workers() -> int:
    """Decode workers by default: one per CPU but one (left to the process that receives the frames, encodes
    them and writes shards), at least 1, at most `MAX_DEFAULT_WORKERS`: a worker is a process of about 190 MB
    (measured decoding 720p h264) and each adds 128 frames in flight (24 MiB at 256x256), so 32 hold about 7 GB;
    a host with more cores and the memory to spare can pass a larger count."""
    return max(1, min(MAX_DEFAULT_WORKERS, available_cpus() - 1))


@dataclasses.dataclass(eq=False)
class _Unit:
    """Chunks `first` to `end` (exclusive) of one video: what one worker decodes in one request."""

    video: _Video
    index: int  # the segment's number in its video
    first: int
    end: int
    state: str = "pending"  # -> "running" -> "finished"
    chunks: collections.deque = dataclasses.field(default_factory=collections.deque)  # received, not taken
    decoded: int = 0  # frames of this unit decoded so far (progress)
    error: DecodeError | None = None
    cancelled: bool = False  # not wanted any more (an earlier unit of its video failed)

    @property
    def wanted(self) -> bool:
        return not (self.cancelled or self.video.cancelled)


@dataclasses.dataclass(eq=False)
class _Video:
    uri: str
    units: list[_Unit] = dataclasses.field(default_factory=list)
    dispatched: int = 0  # units handed to workers (in order)
    sampled: int | None = None  # frames it samples, from its first unit's worker
    complete: bool = False  # every unit exists (the count is known, or the first unit failed)
    info: VideoInfo | None = None
    path: str | None = None  # local path (a gs:// video's cached copy, pinned while the video is active)
    pinned: bool = False
    cancelled: bool = False


class DecodePool(_Source):
    """Decodes videos with `workers` worker processes; frames come out in order, as from one `Decoder`.

        with DecodePool(cfg, workers=8) as pool:
            pool.schedule(uris)                  # the videos that will be asked for, in this order
            for uri in uris:
                for chunk in pool.frames(uri):   # the chunks one worker would give, in order
                    ...

    Work is split into units of `segment_frames` sampled frames (whole chunks): a short video is one unit, a long
    one several, decoded by different workers at once (each seeks to its segment's keyframe; the frames are the
    same). Workers take the earliest unit not yet taken, up to `2 * workers + 1` videos ahead of the one being
    read. Memory: workers stop receiving once `frames_in_flight` decoded frames wait to be taken (the unit being
    read always goes on), so the pool holds at most about `frames_in_flight + 3 * workers * chunk_frames` frames
    (a chunk each being received, built and sent). A file that crashes or hangs (`timeout_s` without a message)
    its worker fails with `DecodeError` when it is read; the worker is replaced and the other videos go on.
    `frames(uri)` for a video that is not the next one scheduled decodes it first (the schedule stays);
    `restarts` counts replaced workers.
    """

    def __init__(
        self,
        cfg: DecodeConfig = DecodeConfig(),
        workers: int | None = None,
        frames_in_flight: int | None = None,
        segment_frames: int = SEGMENT_FRAMES,
        cache: storage.FileCache | None = None,
        timeout_s: float = 600.0,
        progress: bool | None = False,
        progress_delay_s: float = 3.0,
    ):
        self.cfg = cfg
        self.workers = default_decode_workers() if workers is None else int(workers)
        if self.workers < 1 or segment_frames < 1 or (frames_in_flight is not None and frames_in_flight < 1):
            raise ValueError(
                f"need workers >= 1, segment_frames >= 1, frames_in_flight >= 1; got {workers}, "
                f"{segment_frames}, {frames_in_flight}"
            )
        self.segment_chunks = -(-segment_frames // cfg.chunk_frames)
        per_worker = self.segment_chunks * cfg.chunk_frames
        self.frames_in_flight = frames_in_flight or max(DEFAULT_FRAMES_IN_FLIGHT, self.workers * per_worker)
        self.timeout_s = timeout_s
        self.progress, self.progress_delay_s = progress, progress_delay_s
        self._own_cache = cache is None
        self.cache = cache or storage.FileCache(tempfile.mkdtemp(prefix="lvm-videos-"), max_bytes=8 << 30)
        self.info: VideoInfo | None = None
        self.restarts = 0
        self._cond = threading.Condition()
        self._scheduled: collections.deque[str] = collections.deque()
        self._videos: list[_Video] = []  # active videos in the order they are read; [0] is read now or next
        self._buffered = 0  # frames received from workers and not yet taken
        self._running: list[_Unit | None] = [None] * self.workers
        self._decoders: list[Decoder | None] = [None] * self.workers
        self._threads: list[threading.Thread] = []
        self._closed = False

    # The reader's side

    def schedule(self, uris) -> None:
        """Videos that will be asked for (after those scheduled before), in order: decoded ahead."""
        with self._cond:
            self._scheduled.extend(uris)
            self._cond.notify_all()
        self._start_threads()

    def frames(self, uri: str) -> Iterator[Chunk]:
        """Chunks of sampled frames of one video (local path or `gs://` URI), in order; `DecodeError` (or
        `TooManyFrames`) after the chunks before the failure. `info` holds the video's `VideoInfo`."""
        self._start_threads()
        with self._cond:
            video = self._take(uri)
        self.info = None
        bar = None
        try:
            at = 0  # the unit being read
            while True:
                with self._cond:
                    while True:
                        if bar is None and video.sampled is not None:
                            bar = _progress_bar(uri, video.sampled, self.progress, self.progress_delay_s)
                        if bar is not None:
                            bar.update(sum(u.decoded for u in video.units) - bar.n)
                        unit = video.units[at] if at < len(video.units) else None
                        if unit is None and video.complete:
                            return
                        if unit is not None and unit.chunks:
                            chunk = unit.chunks.popleft()
                            self._buffered -= len(chunk.frames)
                            self._cond.notify_all()
                            break
                        if unit is not None and unit.error is not None:
                            raise unit.error
                        if unit is not None and unit.state == "finished":
                            at += 1
                            continue
                        self._cond.wait()
                    self.info = video.info
                yield chunk
        finally:
            if bar is not None:
                bar.close()
            with self._cond:
                self._drop(video)

    def running(self) -> list[tuple[str, int | None]]:
        """(video, worker pid) of each unit being decoded now."""
        with self._cond:
            units = list(enumerate(self._running))
        return [(u.video.uri, self._decoders[i] and self._decoders[i].pid) for i, u in units if u is not None]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            busy = [d._proc for d in self._decoders if d is not None and d._proc is not None]
            for video in self._videos:
                video.cancelled = True
                self._release(video)
        for proc in busy:  # stopped now, also in the middle of a file
            proc.kill()
        for thread in self._threads:
            thread.join(timeout=60)
        self._remove_cache()

    # Bookkeeping (under self._cond)

    def _new_video(self, uri: str) -> _Video:
        video = _Video(uri)
        video.units.append(_Unit(video, 0, 0, self.segment_chunks))
        return video

    def _take(self, uri: str) -> _Video:
        """The active video `uri` about to be read: the next one scheduled, or else a new one read first."""
        if self._videos and self._videos[0].uri == uri:
            return self._videos[0]
        if not self._videos and self._scheduled and self._scheduled[0] == uri:
            self._scheduled.popleft()
            self._videos.append(self._new_video(uri))
        else:
            self._videos.insert(0, self._new_video(uri))
        self._cond.notify_all()
        return self._videos[0]

    def _drop(self, video: _Video) -> None:
        """The reader is done with `video` (read, failed or given up): forget it; units still running stop."""
        if video in self._videos:
            self._videos.remove(video)
        video.cancelled = True  # units still running are dropped by their workers
        for unit in video.units:
            self._buffered -= sum(len(c.frames) for c in unit.chunks)
            unit.chunks.clear()
        self._release(video)
        self._cond.notify_all()

    def _release(self, video: _Video) -> None:
        if video.pinned:
            video.pinned = False
            self.cache.release(video.uri)
            self.cache.discard(video.uri)

    def _head(self) -> _Unit | None:
        """The unit the reader needs first: the earliest one with frames not yet taken."""
        for video in self._videos:
            for unit in video.units:
                if unit.state != "finished" or unit.chunks:
                    return unit
            if not video.complete:  # more units to come (not reached: its first unit is still running)
                return None
        return None

    def _next_unit(self) -> _Unit | None:
        """The earliest unit no worker has taken (activating the next scheduled video when none is left)."""
        for video in self._videos:
            if video.dispatched < len(video.units):
                return video.units[video.dispatched]
        if self._scheduled and len(self._videos) < 2 * self.workers + 1:
            self._videos.append(self._new_video(self._scheduled.popleft()))
            return self._videos[-1].units[0]
        return None

    def _full(self, unit: _Unit) -> bool:
        return self._buffered >= self.frames_in_flight and unit is not self._head()

    def _claim(self, slot: int) -> _Unit | None:
        """Block until a unit may start (room for its frames, or the reader waits for it); None: closing."""
        with self._cond:
            while not self._closed:
                unit = self._next_unit()
                if unit is not None and not self._full(unit):
                    unit.video.dispatched += 1
                    unit.state = "running"
                    self._running[slot] = unit
                    return unit
                self._cond.wait()
            return None

    def _room(self, unit: _Unit) -> bool:
        """Wait until the unit may receive more frames; False when it is no longer wanted."""
        with self._cond:
            while not self._closed and unit.wanted and self._full(unit):
                self._cond.wait()
            return not self._closed and unit.wanted

    def _apply(self, unit: _Unit, kind: str, payload) -> bool:
        """A message from the worker decoding `unit`; True when the unit is over."""
        video = unit.video
        with self._cond:
            self._cond.notify_all()
            if kind == "sampling" and unit.index == 0 and not video.complete:
                video.sampled, video.complete = payload, True
                chunks = -(-payload // self.cfg.chunk_frames)
                unit.end = min(unit.end, chunks)
                for first in range(unit.end, chunks, self.segment_chunks):
                    end = min(first + self.segment_chunks, chunks)
                    video.units.append(_Unit(video, len(video.units), first, end))
            elif kind == "info":
                video.info = payload
            elif kind == "decoded":
                unit.decoded = payload - unit.first * self.cfg.chunk_frames
            elif kind == "chunk":
                if unit.wanted:
                    unit.chunks.append(payload)
                    self._buffered += len(payload.frames)
            elif kind in ("too_many", "error"):
                self._fail(unit, TooManyFrames(*payload) if kind == "too_many" else DecodeError(payload))
            if kind in ("done", "too_many", "error"):
                unit.state = "finished"
                return True
            return False

    def _fail(self, unit: _Unit, error: DecodeError) -> None:
        """`unit` failed: the video's later units are not decoded (the reader stops at this error)."""
        unit.error, unit.state = error, "finished"
        video = unit.video
        for later in video.units[unit.index + 1 :]:
            later.cancelled = True
            self._buffered -= sum(len(c.frames) for c in later.chunks)
            later.chunks.clear()
        del video.units[unit.index + 1 :]
        video.complete = True
        video.dispatched = min(video.dispatched, len(video.units))
        self._cond.notify_all()

    # The workers' side: one thread a worker process

    def _start_threads(self) -> None:
        with self._cond:
            if self._threads or self._closed:
                return
            self._threads = [
                threading.Thread(target=self._serve, args=(slot,), daemon=True, name=f"lvm-decode-{slot}")
                for slot in range(self.workers)
            ]
        for thread in self._threads:
            thread.start()

    def _serve(self, slot: int) -> None:
        decoder = None
        try:
            while (unit := self._claim(slot)) is not None:
                if decoder is None:  # the process starts with the first unit
                    decoder = Decoder(self.cfg, cache=self.cache, timeout_s=self.timeout_s)
                    self._decoders[slot] = decoder
                try:
                    self._run(decoder, unit)
                except Exception as err:  # a bug here must not leave the reader waiting forever
                    with self._cond:
                        self._fail(unit, DecodeError(f"{type(err).__name__}: {err}"))
                finally:
                    with self._cond:
                        unit.state = "finished"
                        self._running[slot] = None
                        self._cond.notify_all()
        finally:
            if decoder is not None:
                decoder._stop(kill=True)

    def _run(self, decoder: Decoder, unit: _Unit) -> None:
        video = unit.video
        try:
            if unit.index == 0:  # pinned until the reader is done with the video
                path = _fetch(self.cache, video.uri, pin=True)
                with self._cond:
                    video.path, video.pinned = path, True
                    if video.cancelled:  # dropped (or the pool closed) during the download
                        self._release(video)
            else:
                path = video.path
        except DecodeError as err:
            with self._cond:
                self._fail(unit, err)
            return
        request = (path, self.cfg, unit.first, unit.end)
        try:
            if decoder._proc is None or not decoder._proc.is_alive():
                decoder._start()
            decoder._conn.send(request)
        except OSError:  # the worker died between units
            decoder._stop(kill=True)
            decoder._start()
            decoder._conn.send(request)
        while True:
            if not self._room(unit):  # the reader gave the video up (or the pool closes): stop this worker
                decoder._stop(kill=True)
                return
            try:
                kind, payload = decoder._recv()
            except DecodeError as err:  # crashed or hung: the worker is gone, the next unit starts another
                with self._cond:
                    if not self._closed:
                        self.restarts += 1
                        self._fail(unit, err)
                return
            if self._apply(unit, kind, payload):
                return
