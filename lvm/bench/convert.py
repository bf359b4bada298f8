"""LWM import benchmark: peak memory and time of `convert-lwm` on a large synthetic LWM params file.

Writes a params file in LWM's on-disk format (tux streaming msgpack, bf16, stacked layers, flax's 2**30-byte
chunking) for a model of the given shape (default: configs/model/1b.yaml's, about 2 GB), then converts it in a
fresh process that first converts a tiny file (so imports and thread pools are counted in its baseline) and
reports its resident-memory growth (VmHWM - VmRSS before the conversion) against the file's array bytes.
Writes OUT/convert.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

SHAPE_1B = {"d_model": 2048, "n_layers": 16, "mlp_dim": 5504, "vocab": 32000, "vision_vocab": 8448}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for key, value in SHAPE_1B.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    parser.add_argument("--quick", action="store_true", help="a smoke run: a ~60 MB model")
    parser.add_argument("--out", default="runs/bench/convert", help="output folder (default: %(default)s)")


def write_synthetic(path, d_model, n_layers, mlp_dim, vocab, vision_vocab, seed=0) -> int:
    """An LWM-format bf16 params file (stacked layers) of random weights, one record in memory at a time."""
    import ml_dtypes
    import numpy as np

    from lvm.interop import lwm, tux_stream

    rng = np.random.default_rng(seed)
    shapes = lwm.lwm_llama_shapes(d_model, n_layers, vocab, mlp_dim, vision_vocab, stacked=True)
    with open(path, "wb") as f:
        for key, shape in shapes.items():
            arr = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)
            tux_stream.write(f, {tuple(key.split("/")): arr})
            del arr
    return pathlib.Path(path).stat().st_size


def _status(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(params: str, tiny: str, out: str) -> None:
    from lvm.interop.lwm import convert_lwm

    quiet = lambda *_: None
    convert_lwm(tiny, out + "-warmup", head_dim=64, log=quiet)
    base = _status("VmRSS")
    start = time.perf_counter()
    summary = convert_lwm(params, out, head_dim=128, log=quiet)
    seconds = time.perf_counter() - start
    print(json.dumps({"baseline_rss_bytes": base, "peak_rss_bytes": _status("VmHWM"), "seconds": seconds,
                      "array_bytes": summary["array_bytes"]}))  # fmt: skip


def measure(workdir, **shape) -> dict:
    """Write a synthetic file of `shape` (keys of SHAPE_1B) under `workdir`, convert it in a child process."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    shape = {**SHAPE_1B, **shape}
    file_bytes = write_synthetic(workdir / "params", **shape)
    write_synthetic(workdir / "tiny", 128, 1, 256, 256, 256)
    code = "import sys; from lvm.bench.convert import _child; _child(*sys.argv[1:])"
    args = [sys.executable, "-c", code, str(workdir / "params"), str(workdir / "tiny"), str(workdir / "out")]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"conversion failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result |= {"shape": shape, "file_bytes": file_bytes}
    result["peak_rss_growth_bytes"] = result["peak_rss_bytes"] - result["baseline_rss_bytes"]
    return result


def run(args) -> int:
    import shutil
    import tempfile

    shape = {k: getattr(args, k) for k in SHAPE_1B}
    if args.quick:
        shape = {"d_model": 512, "n_layers": 4, "mlp_dim": 1536, "vocab": 8000, "vision_vocab": 2048}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="lvm-bench-convert-", dir=out)
    try:
        result = measure(scratch, **shape)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    gib = lambda b: round(b / 2**30, 3)
    result["summary"] = {
        "file_gib": gib(result["file_bytes"]),
        "peak_rss_growth_gib": gib(result["peak_rss_growth_bytes"]),
        "growth_over_file": round(result["peak_rss_growth_bytes"] / result["file_bytes"], 4),
    }
    (out / "convert.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0
