"""Local and `gs://` files behind one small API, with retries and atomic writes; a bounded local file cache.

All `gs://` I/O goes through gcsfs, the client that honours `STORAGE_EMULATOR_HOST` (a loopback GCS server in
tests, the same code path as production). gcsfs retries single requests (5xx, connection errors) itself; on top
of that every whole-object operation here is retried with backoff (`RETRIES` tries), and downloads are checked
against the object's size, so a server restarted mid-read costs time, never data.

Atomicity: a local file is written under a temporary name in the same folder and renamed; a GCS object becomes
visible only when its single upload completes (GCS never shows a partial object), so readers never see a
half-written file either way.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

RETRIES = 8
BACKOFF_S = 0.5  # first wait between tries; doubles each try, capped at MAX_BACKOFF_S
MAX_BACKOFF_S = 8.0
_fs_lock = threading.Lock()
_gcs = None


def is_gcs(uri: str) -> bool:
    return str(uri).startswith("gs://")


def gcs():
    """The process's gcsfs filesystem (anonymous against `STORAGE_EMULATOR_HOST` when that is set)."""
    global _gcs
    with _fs_lock:
        if _gcs is None:
            # gcsfs 2026.x probes zonal/HNS bucket APIs that emulators do not serve (the client hangs).
            os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            import gcsfs

            if os.environ.get("STORAGE_EMULATOR_HOST"):
                _gcs = gcsfs.GCSFileSystem(token="anon", project="test")
            else:
                _gcs = gcsfs.GCSFileSystem()
        return _gcs


def reset_gcs_client() -> None:
    """Forget the cached gcsfs client (tests pointing at a new emulator; after a fork)."""
    global _gcs
    with _fs_lock:
        _gcs = None


def _strip(uri: str) -> str:
    return uri[len("gs://") :] if is_gcs(uri) else uri


def join(base: str, *parts: str) -> str:
    """`base/part/...` for local paths and `gs://` URIs alike."""
    out = str(base).rstrip("/")
    for p in parts:
        out = f"{out}/{p}"
    return out


def dirname(uri: str) -> str:
    uri = str(uri)
    return uri.rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."


def retry(fn: Callable[[], T], what: str, retries: int = RETRIES) -> T:
    """`fn()`, retried with exponential backoff on I/O errors; FileNotFoundError is final."""
    wait = BACKOFF_S
    for attempt in range(retries):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except Exception as err:  # gcsfs raises HttpError, aiohttp errors, OSError, ...
            if attempt == retries - 1:
                raise OSError(f"{what} failed after {retries} tries: {err}") from err
            time.sleep(wait)
            wait = min(wait * 2, MAX_BACKOFF_S)
    raise AssertionError("unreachable")


def exists(uri: str) -> bool:
    if is_gcs(uri):
        return retry(lambda: gcs().exists(_strip(uri)), f"exists {uri}")
    return os.path.exists(uri)


def size(uri: str) -> int:
    if is_gcs(uri):
        return int(retry(lambda: gcs().info(_strip(uri))["size"], f"stat {uri}"))
    return os.path.getsize(uri)


def listdir(uri: str) -> list[str]:
    """Names (not paths) of the files directly in a folder or under a `gs://` prefix, sorted."""
    if is_gcs(uri):
        fs = gcs()

        def ls():
            fs.invalidate_cache(_strip(uri))
            return fs.ls(_strip(uri), detail=False)

        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in retry(ls, f"list {uri}"))
        except FileNotFoundError:
            return []
    return sorted(os.listdir(uri)) if os.path.isdir(uri) else []


def makedirs(uri: str) -> None:
    """Create a local folder (a `gs://` prefix needs nothing; its bucket must exist)."""
    if not is_gcs(uri):
        os.makedirs(uri, exist_ok=True)


def read_bytes(uri: str) -> bytes:
    if is_gcs(uri):
        expected = size(uri)

        def read():
            data = gcs().cat_file(_strip(uri))
            if len(data) != expected:
                raise OSError(f"short read: {len(data)} of {expected} bytes")
            return data

        return retry(read, f"read {uri}")
    with open(uri, "rb") as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically (see the module docstring)."""
    if is_gcs(uri):
        retry(lambda: gcs().pipe_file(_strip(uri), data), f"write {uri}")
        return
    folder = os.path.dirname(os.path.abspath(uri))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(uri)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, uri)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(uri: str, obj) -> None:
    write_bytes(uri, (json.dumps(obj) + "\n").encode())


def download(uri: str, local_path: str, chunk_bytes: int = 8 << 20) -> None:
    """Stream a file to `local_path` (atomically, in bounded chunks), checking the byte count."""
    os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
    tmp = f"{local_path}.{uuid.uuid4().hex}.part"

    def fetch():
        expected = size(uri)
        opener = (lambda: gcs().open(_strip(uri), "rb", block_size=chunk_bytes)) if is_gcs(uri) else None
        with opener() if opener else open(uri, "rb") as src, open(tmp, "wb") as dst:
            got = 0
            while chunk := src.read(chunk_bytes):
                dst.write(chunk)
                got += len(chunk)
        if got != expected:
            raise OSError(f"short download: {got} of {expected} bytes")
        os.replace(tmp, local_path)

    try:
        retry(fetch, f"download {uri}")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class FileCache:
    """A bounded local cache of remote (or local) files: `fetch(uri)` returns a local path.

    Local paths are returned as they are (nothing is copied). Remote files are downloaded whole under `root`;
    when the cached bytes exceed `max_bytes`, the least recently used files that are not pinned are deleted.
    A file stays pinned between `fetch(uri, pin=True)` and `release(uri)`. Thread-safe; two threads fetching
    the same file download it once.
    """

    def __init__(self, root: str, max_bytes: int = 4 << 30):
        self.root = root
        self.max_bytes = int(max_bytes)
        os.makedirs(root, exist_ok=True)
        self._files: OrderedDict[str, tuple[str, int]] = OrderedDict()  # uri -> (path, bytes), LRU order
        self._pins: dict[str, int] = {}
        self._busy: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.downloaded: list[str] = []  # every remote uri fetched, in order (for tests and stats)
        self.bytes_downloaded = 0

    def local_path(self, uri: str) -> str:
        name = os.path.basename(uri.rstrip("/"))
        return os.path.join(self.root, hashlib.sha1(uri.encode()).hexdigest()[:16] + "-" + name)

    def fetch(self, uri: str, pin: bool = False) -> str:
        if not is_gcs(uri):
            return uri
        while True:
            with self._lock:
                if uri in self._files:
                    self._files.move_to_end(uri)
                    if pin:
                        self._pins[uri] = self._pins.get(uri, 0) + 1
                    return self._files[uri][0]
                event = self._busy.get(uri)
                if event is None:
                    event = self._busy[uri] = threading.Event()
                    break
            event.wait()
        path = self.local_path(uri)
        try:
            download(uri, path)
            nbytes = os.path.getsize(path)
            with self._lock:
                self._files[uri] = (path, nbytes)
                if pin:
                    self._pins[uri] = self._pins.get(uri, 0) + 1
                self.downloaded.append(uri)
                self.bytes_downloaded += nbytes
                self._evict()
        finally:
            with self._lock:
                self._busy.pop(uri).set()
        return path

    def release(self, uri: str) -> None:
        if not is_gcs(uri):
            return
        with self._lock:
            n = self._pins.get(uri, 0) - 1
            if n > 0:
                self._pins[uri] = n
            else:
                self._pins.pop(uri, None)
            self._evict()

    def discard(self, uri: str) -> None:
        """Delete a cached copy now (e.g. a video after it is decoded)."""
        with self._lock:
            if uri in self._files and not self._pins.get(uri):
                os.remove(self._files.pop(uri)[0])

    def cached_bytes(self) -> int:
        with self._lock:
            return sum(n for _, n in self._files.values())

    def _evict(self) -> None:
        total = sum(n for _, n in self._files.values())
        for uri in list(self._files):
            if total <= self.max_bytes:
                break
            if self._pins.get(uri):
                continue
            path, n = self._files.pop(uri)
            os.remove(path)
            total -= n
