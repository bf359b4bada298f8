"""Video decoding for pre-tokenization: frames sampled at a target fps (or N uniformly), resized and centre-cropped,
streamed in bounded chunks from a worker process.

- Sampling (`frame_indices`): at `fps` frames per second (default 1; all frames when the video's rate is lower)
  or `num_frames` spread uniformly (the centre frame of `num_frames` equal parts). `max_frames` caps either:
  when fps sampling would give more, `max_frames` frames are spread uniformly over the whole video instead.
  Every frame comes with its presentation timestamp in seconds (from the container).
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
import multiprocessing
import os
import signal
import tempfile
from collections.abc import Iterator

import numpy as np

from lvm.data_pipeline import storage


class DecodeError(Exception):
    """A video that could not be decoded; `str(err)` is the reason."""


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How frames are chosen and shaped (see the module docstring)."""

    resolution: int = 256  # output frames are [resolution, resolution, 3]
    fps: float = 1.0  # target sampling rate (ignored when num_frames is set)
    num_frames: int | None = None  # N frames uniformly over the video instead of fps sampling
    max_frames: int | None = None  # cap on frames per video
    chunk_frames: int = 32  # frames per chunk sent from the worker
    threads: int = 1  # decord decoding threads per worker

    def __post_init__(self):
        if self.resolution < 1 or self.chunk_frames < 1 or self.threads < 0:
            raise ValueError(f"need resolution >= 1, chunk_frames >= 1, threads >= 0; got {self}")
        if self.num_frames is None and not self.fps > 0:
            raise ValueError(f"fps must be > 0 (or set num_frames), got {self.fps}")
        for name in ("num_frames", "max_frames"):
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


# The worker process -----------------------------------------------------------------------------------------


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
    from lvm.tokenizers.video import resize_crop

    reader = _open(path, cfg.threads)
    n = len(reader)
    if n == 0:
        raise DecodeError("no frames")
    fps = float(reader.get_avg_fps())
    if not fps > 0:
        raise DecodeError(f"unknown frame rate ({fps})")
    idx = frame_indices(n, fps, cfg)
    for start in range(0, len(idx), cfg.chunk_frames):
        part = idx[start : start + cfg.chunk_frames]
        try:
            frames = reader.get_batch(part.tolist()).asnumpy()  # [k, h, w, 3]
            stamps = np.asarray(reader.get_frame_timestamp(part.tolist()), np.float64)[:, 0]
        except Exception as err:
            raise DecodeError(f"decode failed at frame {int(part[0])}: {str(err).strip()[:200]}") from None
        if start == 0:
            conn.send(("info", VideoInfo(n, fps, frames.shape[1], frames.shape[2], len(idx))))
        conn.send(("chunk", Chunk(resize_crop(frames, cfg.resolution), stamps, part)))


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
        except DecodeError as err:
            conn.send(("error", str(err)))
        except Exception as err:  # anything else is still one file's failure
            conn.send(("error", f"{type(err).__name__}: {err}"))


# The consumer side ------------------------------------------------------------------------------------------


class Decoder:
    """Decodes one video at a time in a worker process: `for chunk in decoder.frames(uri): ...`.

    `frames` raises `DecodeError` for a file that cannot be decoded; the decoder stays usable. `info` holds the
    last video's `VideoInfo`. Use as a context manager or call `close()`.
    """

    def __init__(
        self,
        cfg: DecodeConfig = DecodeConfig(),
        cache: storage.FileCache | None = None,
        timeout_s: float = 600.0,
    ):
        self.cfg = cfg
        self.timeout_s = timeout_s
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
        try:
            if queued is None:
                if self._proc is None or not self._proc.is_alive():
                    self._start()
                self._conn.send((path, self.cfg))
            if then is not None:
                self._send_ahead(then)
            while True:
                kind, payload = self._recv()
                if kind == "info":
                    self.info = payload
                elif kind == "chunk":
                    yield payload
                elif kind == "done":
                    finished = True
                    return
                else:
                    finished = True
                    raise DecodeError(payload)
        finally:
            if not finished and self._proc is not None:
                self._stop(kill=True)  # abandoned mid-file: the worker may still be sending
            self.cache.release(uri)
            self.cache.discard(uri)

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
