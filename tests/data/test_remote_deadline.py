"""Remote I/O has a deadline: an unreachable GCS endpoint or a missing `gs://` object fails in seconds with one
line naming the URI and the cause (in Python and from the `lvm` command line), retries are bounded in total and
not multiplied by gcsfs's own, and a download that loses its connection resumes where it stopped."""

import os
import re
import socket
import subprocess
import sys
import time

import aiohttp
import pytest
from conftest import FaultProxy

from lvm.data_pipeline import emulator, storage
from lvm.data_pipeline.decode import DecodeConfig, DecodeError, Decoder

DEADLINE_S = 2.0
BOUND_S = 15.0  # the deadline, one try started just before it, and slack for a busy 2-core machine


@pytest.fixture
def closed_endpoint(monkeypatch):
    """gcsfs pointed at a loopback port nobody listens on, with a short deadline; the URL."""
    url = f"http://127.0.0.1:{emulator.free_port()}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    monkeypatch.setenv(storage.DEADLINE_ENV, str(DEADLINE_S))
    storage.reset_gcs_client()
    yield url
    storage.reset_gcs_client()  # monkeypatch restores the environment after this


def timed(fn):
    start = time.monotonic()
    try:
        fn()
    except Exception as err:  # the test inspects it
        return err, time.monotonic() - start
    raise AssertionError("no error")


@pytest.mark.parametrize(
    "op",
    [
        lambda uri, tmp: storage.read_bytes(uri),
        lambda uri, tmp: storage.exists(uri),
        lambda uri, tmp: storage.download(uri, str(tmp / "v.mp4")),
        lambda uri, tmp: storage.write_bytes(uri, b"x"),
        lambda uri, tmp: storage.listdir(uri),
    ],
    ids=["read_bytes", "exists", "download", "write_bytes", "listdir"],
)
def test_unreachable_endpoint_fails_within_the_deadline(closed_endpoint, tmp_path, op):
    err, took = timed(lambda: op("gs://bucket/v.mp4", tmp_path))
    assert isinstance(err, storage.StorageError)
    message = str(err)
    assert "\n" not in message
    assert message.startswith("gs://bucket/v.mp4: cannot reach the GCS endpoint ")
    assert closed_endpoint in message and "connection refused" in message
    assert f"{storage.DEADLINE_ENV}={DEADLINE_S:g}" in message and "STORAGE_EMULATOR_HOST" in message
    assert DEADLINE_S <= took < BOUND_S
    assert not list(tmp_path.iterdir())  # no partial download left behind


def test_a_server_that_never_answers_fails_within_the_deadline(monkeypatch):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel accepts connections; nobody ever answers them
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv(storage.DEADLINE_ENV, str(DEADLINE_S))
        storage.reset_gcs_client()
        try:
            err, took = timed(lambda: storage.read_bytes("gs://bucket/v.mp4"))
        finally:
            storage.reset_gcs_client()
    assert isinstance(err, storage.StorageError)
    assert str(err).startswith("gs://bucket/v.mp4: the GCS endpoint http://127.0.0.1:")
    assert f"did not answer for {DEADLINE_S:g} s; gave up reading after 1 try" in str(err)
    assert took < BOUND_S


def test_after_one_gives_up_the_next_fail_at_once(closed_endpoint):
    timed(lambda: storage.read_bytes("gs://bucket/a.jsonl"))
    err, took = timed(lambda: storage.read_bytes("gs://bucket/b.jsonl"))
    assert str(err).startswith("gs://bucket/b.jsonl: cannot reach") and "not retried" in str(err)
    assert took < 3.5  # one try, whose one quick gcsfs retry waits 1-2 s


def test_a_video_on_an_unreachable_endpoint_is_a_decode_error_naming_it(closed_endpoint):
    """The path `lvm qa --video gs://...` takes (its ValueError names the video: one line, exit 2)."""
    with Decoder(DecodeConfig()) as decoder:
        err, took = timed(lambda: list(decoder.frames("gs://bucket/v.mp4")))
    assert isinstance(err, DecodeError) and "gs://bucket/v.mp4: cannot reach" in str(err)
    assert took < BOUND_S


def run_cli(*argv, env):
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "lvm.cli", *argv], env=env, capture_output=True, text=True, timeout=300
    )
    return proc, time.monotonic() - start


def test_cli_on_an_unreachable_endpoint_says_so_in_one_line(closed_endpoint, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc, took = run_cli(
        "pretokenize", "--manifest", "gs://b/m.jsonl", "--output", str(tmp_path / "out"),
        "--text-tokenizer", str(tmp_path / "sp.model"), env=env,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("lvm pretokenize: error: gs://b/m.jsonl: cannot reach the GCS endpoint ")
    assert "connection refused" in lines[0]
    assert took < 60


def test_gcsfs_retries_are_not_multiplied(gcs_server, monkeypatch):
    """Every request answered 503: the operation gives up at the deadline, not after gcsfs's 6 tries a request
    (about 30 s each) times ours."""
    storage.write_bytes("gs://test/flaky.bin", b"data")
    proxy = FaultProxy(gcs_server.port, fail_every=1)
    monkeypatch.setenv(storage.DEADLINE_ENV, str(DEADLINE_S))
    emulator.set_environ(proxy.url)
    try:
        err, took = timed(lambda: storage.read_bytes("gs://test/flaky.bin"))
    finally:
        emulator.set_environ(gcs_server.url)
        proxy.close()
    assert isinstance(err, storage.StorageError)
    assert str(err).startswith("gs://test/flaky.bin: the GCS server answered 503")
    assert "gave up reading" in str(err) and "STORAGE_EMULATOR_HOST" not in str(err)
    assert took < BOUND_S
    tries = int(re.search(r"gave up reading after (\d+) tr(?:y|ies) in ", str(err)).group(1))
    assert proxy.requests <= tries * 2 * storage.GCSFS_TRIES  # a stat sends an object get and a listing


def test_missing_object_fails_at_once_naming_it(gcs_server, tmp_path):
    for op in (
        lambda: storage.read_bytes("gs://test/no/such.mp4"),
        lambda: storage.download("gs://test/no/such.mp4", str(tmp_path / "such.mp4")),
        lambda: storage.size("gs://test/no/such.mp4"),
        lambda: storage.read_bytes("gs://no-such-bucket/such.mp4"),
    ):
        err, took = timed(op)
        assert isinstance(err, FileNotFoundError)
        assert str(err).endswith("such.mp4: no such object") and str(err).startswith("gs://")
        assert took < 2.0
    assert storage.exists("gs://test/no/such.mp4") is False
    assert storage.listdir("gs://test/no/") == []

    proc, took = run_cli(
        "pretokenize", "--manifest", "gs://test/no/m.jsonl", "--output", str(tmp_path / "out"),
        "--text-tokenizer", str(tmp_path / "sp.model"), env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "lvm pretokenize: error: gs://test/no/m.jsonl: no such object"


def test_download_resumes_after_a_dropped_connection(gcs_server, tmp_path, monkeypatch):
    data = os.urandom(300_000)
    storage.write_bytes("gs://test/big.bin", data)
    real = storage.gcs()
    seeks = []

    class Dropping:
        """The first open drops its connection after 100 kB."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def seek(self, n):
            seeks.append(n)
            self.f.seek(n)

        def read(self, n):
            if len(seeks) == 1 and self.f.tell() >= 100_000:
                raise aiohttp.ClientPayloadError("connection dropped")
            return self.f.read(n)

    class FS:
        def __getattr__(self, name):
            return getattr(real, name)

        def open(self, *args, **kwargs):
            return Dropping(real.open(*args, **kwargs))

    monkeypatch.setattr(storage, "gcs", FS)
    storage.download("gs://test/big.bin", str(tmp_path / "big.bin"), chunk_bytes=50_000)
    assert (tmp_path / "big.bin").read_bytes() == data
    assert seeks == [0, 100_000]
    assert os.listdir(tmp_path) == ["big.bin"]


def test_deadline_setting_is_checked(monkeypatch):
    monkeypatch.setenv(storage.DEADLINE_ENV, "soon")
    with pytest.raises(
        ValueError, match="LVM_GCS_DEADLINE_S must be a positive number of seconds, got 'soon'"
    ):
        storage.deadline_s()
    monkeypatch.setenv(storage.DEADLINE_ENV, "90")
    assert storage.deadline_s() == 90.0
    monkeypatch.delenv(storage.DEADLINE_ENV)
    assert storage.deadline_s() == storage.DEFAULT_DEADLINE_S


def test_a_local_gcs_server_for_the_tools(tmp_path, monkeypatch):
    """The README's recipe: `python -m lvm.data_pipeline.emulator --bucket NAME` prints the line to export."""
    cmd = [sys.executable, "-m", "lvm.data_pipeline.emulator", "--bucket", "mine", "--root", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("export STORAGE_EMULATOR_HOST=http://127.0.0.1:")
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", line.split("=", 1)[1])
        storage.reset_gcs_client()
        storage.write_bytes("gs://mine/a.txt", b"hello")
        assert storage.read_bytes("gs://mine/a.txt") == b"hello"
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        storage.reset_gcs_client()
    assert (tmp_path / "mine" / "a.txt").read_bytes() == b"hello"  # the server's filesystem backend
