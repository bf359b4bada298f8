"""Local and `gs://` files behind one small API, with bounded retries and atomic writes; a bounded local file cache.

All `gs://` I/O goes through gcsfs, the client that honours `STORAGE_EMULATOR_HOST` (a loopback GCS server in
tests, the same code path as production). Retries live in one place: every whole-object operation here is
retried with backoff until a deadline (`LVM_GCS_DEADLINE_S`, default 60 s from its start, restarted when a
download makes progress), while gcsfs tries each HTTP request at most `GCSFS_TRIES` times (its own 6 tries with
their own backoff, under our retries, once made an unreachable endpoint cost half an hour). A TCP connection
times out after `CONNECT_TIMEOUT_S`, a server that sends nothing after `READ_TIMEOUT_S`. A missing object fails at
once (`FileNotFoundError`); anything else that fails for good raises `StorageError`: one line naming the URI, the
cause and what to check. Downloads are checked against the object's size and resume where they stopped, so a
server restarted mid-read costs time, never data.

Atomicity: a local file is written under a temporary name in the same folder and renamed; a GCS object becomes
visible only when its single upload completes (GCS never shows a partial object), so readers never see a
half-written file either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEADLINE_ENV = "LVM_GCS_DEADLINE_S"
DEFAULT_DEADLINE_S = 60.0
CONNECT_TIMEOUT_S = 10.0  # per TCP connection attempt: a blackholed endpoint costs this per try
READ_TIMEOUT_S = (
    30.0  # (or the deadline, when shorter) without a byte from the server: a hung server or stream
)
GCSFS_TRIES = 2  # gcsfs's tries per HTTP request: one quick retry of a blip inside a long stream
BACKOFF_S = 0.5  # first wait between tries; doubles each try, capped at MAX_BACKOFF_S
MAX_BACKOFF_S = 8.0
GCS_ENDPOINT = "https://storage.googleapis.com"
_TRANSIENT_HTTP = {408, 429, 500, 501, 502, 503, 504}
_fs_lock = threading.Lock()
_gcs = None
_endpoint_down = False  # an operation gave up on an unreachable endpoint; cleared by the next success


class StorageError(OSError):
    """A `gs://` operation that failed for good; `str(err)` is one line naming the URI and the cause."""


def is_gcs(uri: str) -> bool:
    return str(uri).startswith("gs://")


def deadline_s() -> float:
    """Seconds a failing `gs://` operation is retried (`LVM_GCS_DEADLINE_S`, default 60)."""
    raw = os.environ.get(DEADLINE_ENV, "").strip()
    if not raw:
        return DEFAULT_DEADLINE_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"{DEADLINE_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def _read_timeout_s() -> float:
    return min(READ_TIMEOUT_S, deadline_s())


def endpoint() -> str:
    """The GCS API endpoint gcsfs talks to (`STORAGE_EMULATOR_HOST` when set, as gcsfs resolves it)."""
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if host in ("", "default"):
        return GCS_ENDPOINT
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


def _client_class(base):
    """`base` (gcsfs's filesystem) with each HTTP request tried at most `GCSFS_TRIES` times: gcsfs bakes its
    6 tries into its methods when the class is defined, so the undecorated methods are wrapped again."""
    from gcsfs.retry import retry_request

    overrides = {}
    for name in ("_request", "_get_file_request", "_get_file_concurrent"):
        raw = getattr(getattr(base, name, None), "__wrapped__", None)
        if raw is not None:
            overrides[name] = retry_request(retries=GCSFS_TRIES)(raw)
    return type("BoundedGCSFileSystem", (base,), overrides)


def gcs():
    """The process's gcsfs filesystem (anonymous against `STORAGE_EMULATOR_HOST` when that is set)."""
    global _gcs
    with _fs_lock:
        if _gcs is None:
            # gcsfs 2026.x probes zonal/HNS bucket APIs that emulators do not serve (the client hangs).
            os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            if "GCSFS_DEBUG" not in os.environ:  # its retry wrapper logs a traceback per failure; we say why
                logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
            import aiohttp
            import gcsfs

            deadline = deadline_s()
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=min(CONNECT_TIMEOUT_S, deadline), sock_read=_read_timeout_s()
            )
            auth = {"token": "anon", "project": "test"} if os.environ.get("STORAGE_EMULATOR_HOST") else {}
            cls = _client_class(gcsfs.GCSFileSystem)
            _gcs = cls(requests_timeout=timeout, skip_instance_cache=True, **auth)
        return _gcs


def reset_gcs_client() -> None:
    """Forget the cached gcsfs client (tests pointing at a new emulator; after a fork)."""
    global _gcs, _endpoint_down
    with _fs_lock:
        _gcs = None
        _endpoint_down = False


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


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _describe(err: Exception) -> tuple[str, bool, bool]:
    """(the cause in words, final: no retry can help, unreachable: the endpoint could not be reached)."""
    if isinstance(err, ImportError):
        return f"cannot load the GCS client ({_first_line(err)}); pip install gcsfs", True, False
    import aiohttp
    from gcsfs.retry import HttpError, is_retriable

    ep = endpoint()
    if isinstance(err, aiohttp.ClientConnectorError):
        if isinstance(err, getattr(aiohttp, "ClientConnectorDNSError", ())):
            why = f"cannot resolve {err.host}"
        elif isinstance(err.os_error, ConnectionRefusedError):
            why = "connection refused"
        else:
            why = err.os_error.strerror or _first_line(err.os_error)
        return f"cannot reach the GCS endpoint {ep} ({why})", False, True
    if isinstance(err, getattr(aiohttp, "ConnectionTimeoutError", ())):
        return f"cannot reach the GCS endpoint {ep} (no connection in {CONNECT_TIMEOUT_S:g} s)", False, True
    if isinstance(err, TimeoutError):  # aiohttp's read timeouts are TimeoutErrors too
        return f"the GCS endpoint {ep} did not answer for {_read_timeout_s():g} s", False, True
    if isinstance(err, aiohttp.ClientError):
        return f"the connection to {ep} failed ({type(err).__name__}: {_first_line(err)})", False, False
    if isinstance(err, HttpError):
        return f"the GCS server answered {err.code} ({_first_line(err)})", not is_retriable(err), False
    if isinstance(err, PermissionError) or _first_line(err).startswith("Forbidden"):
        return "access denied (403); check the credentials and the bucket's permissions", True, False
    if isinstance(err, ValueError):  # gcsfs's "Bad Request" (an invalid bucket or object name)
        return f"rejected: {_first_line(err)}", True, False
    return f"{type(err).__name__}: {_first_line(err)}", False, False


def _hint() -> str:
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return "; is the GCS server at STORAGE_EMULATOR_HOST running?"
    return "; check the network and credentials, or set STORAGE_EMULATOR_HOST to use a local GCS server"


def retry(
    fn: Callable[[], T], uri: str, doing: str = "reading", progress: Callable[[], int] | None = None
) -> T:
    """`fn()` on `uri`, retried with exponential backoff until `deadline_s()` after it began (restarted when
    `progress()` grew). A missing object raises FileNotFoundError at once, a failure no retry can help (403, a
    bad request) StorageError at once, anything else StorageError at the deadline; `doing` (e.g. "reading")
    words the message. After one operation gave up on an unreachable endpoint, the next ones give up at their
    first such failure (one success clears that): a job with many files fails in seconds, not a deadline each."""
    global _endpoint_down
    deadline = deadline_s()
    began = since = time.monotonic()
    wait = BACKOFF_S
    mark = progress() if progress else 0
    tries = 0
    while True:
        tries += 1
        try:
            result = fn()
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri}: no such object") from None
        except Exception as err:  # gcsfs raises HttpError, aiohttp errors, OSError, ...
            cause, final, unreachable = _describe(err)
            if final:
                raise StorageError(f"{uri}: {cause}") from err
            now = time.monotonic()
            if progress is not None and (got := progress()) != mark:  # a download got further
                mark, since, wait = got, now, BACKOFF_S
            left = deadline - (now - since)
            at_once = unreachable and _endpoint_down and tries == 1
            if at_once or left <= 0:
                setting = f"{DEADLINE_ENV}={deadline:g}"
                if at_once:
                    why = f"not retried: the endpoint was unreachable for a whole {setting} s just before"
                else:
                    n = f"{tries} {'try' if tries == 1 else 'tries'}"
                    why = f"gave up {doing} after {n} in {now - began:.1f} s ({setting})"
                _endpoint_down = unreachable
                raise StorageError(f"{uri}: {cause}; {why}{_hint() if unreachable else ''}") from err
            time.sleep(min(wait, left))
            wait = min(wait * 2, MAX_BACKOFF_S)
        else:
            _endpoint_down = False
            return result


def _stat_size(uri: str) -> int:
    return int(gcs().info(_strip(uri))["size"]) if is_gcs(uri) else os.path.getsize(uri)


def exists(uri: str) -> bool:
    if is_gcs(uri):
        return retry(lambda: gcs().exists(_strip(uri)), uri, "checking it exists")
    return os.path.exists(uri)


def size(uri: str) -> int:
    if is_gcs(uri):
        return retry(lambda: _stat_size(uri), uri, "reading its size")
    return os.path.getsize(uri)


def listdir(uri: str) -> list[str]:
    """Names (not paths) of the files directly in a folder or under a `gs://` prefix, sorted."""
    if is_gcs(uri):
        fs = gcs()

        def ls():
            fs.invalidate_cache(_strip(uri))
            return fs.ls(_strip(uri), detail=False)

        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in retry(ls, uri, "listing"))
        except FileNotFoundError:
            return []
    return sorted(os.listdir(uri)) if os.path.isdir(uri) else []


def makedirs(uri: str) -> None:
    """Create a local folder (a `gs://` prefix needs nothing; its bucket must exist)."""
    if not is_gcs(uri):
        os.makedirs(uri, exist_ok=True)


def read_bytes(uri: str) -> bytes:
    if is_gcs(uri):

        def read():
            expected = _stat_size(uri)
            data = gcs().cat_file(_strip(uri))
            if len(data) != expected:
                raise OSError(f"short read: {len(data)} of {expected} bytes")
            return data

        return retry(read, uri, "reading")
    with open(uri, "rb") as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically (see the module docstring)."""
    if is_gcs(uri):
        retry(lambda: gcs().pipe_file(_strip(uri), data), uri, "writing")
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
    """Stream a file to `local_path` (atomically, in bounded chunks), checking the byte count; a failed try
    resumes where the last one stopped (unless the object's size changed)."""
    os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
    tmp = f"{local_path}.{uuid.uuid4().hex}.part"
    seen_size = None  # the object's size when the bytes in `tmp` were read

    def have() -> int:
        return os.path.getsize(tmp) if os.path.exists(tmp) else 0

    def fetch():
        nonlocal seen_size
        expected = _stat_size(uri)
        got = have() if expected == seen_size else 0  # resume, unless the object changed
        seen_size = expected
        src = gcs().open(_strip(uri), "rb", block_size=chunk_bytes) if is_gcs(uri) else open(uri, "rb")
        with src, open(tmp, "ab" if got else "wb") as dst:
            src.seek(got)
            while chunk := src.read(chunk_bytes):
                dst.write(chunk)
                got += len(chunk)
        if got != expected:
            raise OSError(f"short download: {got} of {expected} bytes")
        os.replace(tmp, local_path)

    try:
        retry(fetch, uri, "downloading", progress=have)
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
