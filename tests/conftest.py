"""Test set-up: 8 simulated CPU devices and the persistent compile cache, configured before jax is imported;
shared helpers (`make_mesh`, `FaultProxy`: injects 5xx in front of the GCS server) and fixtures (`gcs_server`: a
real GCS API server on loopback; `trained`: a tiny model trained to tell red videos from blue ones, and the
`question` it learned)."""

import http.client
import http.server
import importlib.util
import json
import os
import pathlib
import shutil
import sys
import threading

from lvm import cpu_devices

cpu_devices.simulate(8, cpu_only=True)
_cache = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_cache))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The test processes' own programs are tiny and many, so compiling them costs more than running them: here they
# compile at LLVM's cheapest optimisation level (into a cache folder of their own). It changes no result the
# tests check (the same HLO, less optimised machine code). The subprocesses the tests start (training runs of
# many steps, where that level doubles the time) get the environment as it was: restored once jax is loaded.
_child_env = {name: os.environ[name] for name in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_child_env["JAX_COMPILATION_CACHE_DIR"], "tests-O0")

# torch is in the test environment only to check `lvm export-hf` in a subprocess. tensorboardX imports it when
# it can, and torch loaded beside jax's profiler crashed test workers (segfault in start_trace): keep it out.
TORCH_AVAILABLE = importlib.util.find_spec("torch") is not None
sys.modules.setdefault("torch", None)

import filelock  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lvm.cli import run_command  # noqa: E402
from lvm.data_pipeline import emulator, storage  # noqa: E402
from lvm.demo.corpus import TEXT_CORPUS  # noqa: E402
from lvm.tokenizers import synthetic, text  # noqa: E402
from lvm.tokenizers.config import load_config as load_vqgan_config  # noqa: E402
from lvm.tokenizers.vqgan import init_variables, save_model  # noqa: E402

assert jax.device_count() == 8, "tests expect 8 simulated CPU devices; jax was imported before conftest.py"
os.environ.update(_child_env)  # read by jax above (the backend is initialised); children get the originals


def make_mesh(shape, names=("dp", "fsdp", "tp", "sp")):
    """A mesh of the first prod(shape) devices with classic (Auto) axis types."""
    n = 1
    for s in shape:
        n *= s
    return jax.make_mesh(
        tuple(shape),
        tuple(names),
        axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
        devices=jax.devices()[:n],
    )


HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "host"}


class FaultProxy:
    """HTTP proxy on loopback to `upstream` that answers 503 to every `fail_every`-th request (0: never)."""

    def __init__(self, upstream_port: int, fail_every: int = 0):
        self.upstream_port = upstream_port
        self.fail_every = fail_every
        self.requests = 0
        self.failed = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, headers, body: bytes):
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in HOP_HEADERS:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self):
                body = self._body()
                with proxy._lock:
                    proxy.requests += 1
                    fail = proxy.fail_every and proxy.requests % proxy.fail_every == 0
                    proxy.failed += bool(fail)
                if fail:
                    msg = b'{"error": {"code": 503, "message": "injected fault"}}'
                    self._reply(503, [("Content-Type", "application/json")], msg)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self._reply(resp.status, resp.getheaders(), data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def gcs_server(tmp_path_factory):
    """fake-gcs-server with its filesystem backend (restartable), gcsfs pointed at it; bucket `test`."""
    server = emulator.FakeGCS(root=str(tmp_path_factory.mktemp("gcs-root"))).start()
    server.create_bucket("test")
    emulator.set_environ(server.url)
    yield server
    server.stop()
    storage.reset_gcs_client()


# A tiny trained model (inference tests) ----------------------------------------------------------------------

COLOURS = {"Red": (220, 30, 30), "Blue": (30, 30, 220)}
QUESTION = "What colour is the video?"


def colour_video(path, rgb, seed, frames=6):
    rng = np.random.default_rng(seed)
    base = np.array(rgb, np.int16)[None, None, None] + rng.integers(-20, 20, (frames, 32, 32, 3))
    synthetic.write_video(path, np.clip(base, 0, 255).astype(np.uint8), fps=4)


@pytest.fixture
def question() -> str:
    return QUESTION


def tiny_tokenizers(root):
    """An untrained tiny VQGAN at `root/vqgan` (32x32 frames -> 8x8 codes) and a 400-piece SentencePiece model
    at `root/sp.model` (returned)."""
    cfg = load_vqgan_config("tiny", ["model.resolution=32", "model.channel_mult=1,2,2"])
    save_model(cfg, init_variables(cfg.model), root / "vqgan")
    return text.train(TEXT_CORPUS, 400, root / "sp")


@pytest.fixture(scope="session")
def trained(tmp_path_factory, worker_id):
    """A tiny model trained on red / blue video QA, once per `make test` (the first worker that asks trains it,
    the other waits for it): the folder with the videos, `run/` and `export/`. Tests only read it."""
    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # xdist: each worker's base folder sits in the run's own shared folder
        shared = shared.parent
    root = shared / "trained-qa"
    with filelock.FileLock(f"{root}.lock"):
        if not (root / "complete").is_file():
            shutil.rmtree(root, ignore_errors=True)  # a worker that died while training left a partial one
            root.mkdir()
            _train_qa_model(root)
    return root


def _train_qa_model(root):
    tok = tiny_tokenizers(root)
    lines = []
    for i in range(16):
        name = list(COLOURS)[i % 2]
        colour_video(root / f"v{i}.mp4", COLOURS[name], seed=i)
        lines.append({"video": f"v{i}.mp4", "qa": [{"question": QUESTION, "answer": f"{name}."}]})
        lines.append({"video": f"v{i}.mp4", "prompt": f"a {name.lower()} video"})  # text to video
    (root / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    run_command("pretokenize", ["--manifest", str(root / "manifest.jsonl"), "--output", str(root / "corpus"),
                                "--vqgan", str(root / "vqgan"), "--text-tokenizer", tok.model_file,
                                "--num-frames", "2", "--uncond-prob", "0.25", "--no-progress"])  # fmt: skip
    sets = ["mesh=1,8,1,1", "train.seq_len=256", "train.batch_size=8", "train.steps=100", "train.lr=1e-2",
            "train.warmup_steps=5", f"data.train=[{root / 'corpus'}]", "train.checkpoint_every=100"]  # fmt: skip
    argv = ["--config", "model/tiny", "--workdir", str(root / "run"), "--no-progress"]
    assert run_command("train", [*argv, *[a for s in sets for a in ("--set", s)]]) == 0
    run_command("export", ["--workdir", str(root / "run"), "--out", str(root / "export")])
    colour_video(root / "held_out_red.mp4", COLOURS["Red"], seed=100)
    colour_video(root / "held_out_blue.mp4", COLOURS["Blue"], seed=101)
    (root / "complete").touch()
