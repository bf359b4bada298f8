"""Section vqgan_encode: the VQGAN's encode frames/s on the device (the default config's 256x256 frames to 16x16
codes, random weights), and whether the host's decode workers keep up with it.

Encode: `VQGANTokenizer.encode` of host uint8 frames to host codes (transfers included) in calls of each batch
size (8: what `lvm pretokenize` sends per device; 64: what the device can do), compiled first, median of a few
calls. Decode: `lvm pretokenize`'s decode stage (`DecodePool`, frames resized to the VQGAN's resolution) on copies
of an h264 clip at the pretokenize default of 1 fps, with 1 worker and with the default count (one per CPU but
one): frames/s of wall time, worker start-up included. Decoding keeps up when N workers deliver at least the
encode frames/s; the workers needed assumes decoding scales linearly from the one-worker rate. It needs decord,
Pillow, an ffmpeg (imageio-ffmpeg or on PATH) and the package installed (the workers import lvm.data_pipeline);
without them the decode half says what is missing.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from lvm.bench.data import random_vqgan
from lvm.bench.gpu import MAPPED
from lvm.bench.gpu.measure import error_text

if TYPE_CHECKING:
    from lvm.bench.gpu.budget import Section
    from lvm.bench.gpu.run import Run


def run_vqgan_encode(run: Run, section: Section) -> None:
    s = run.settings
    row: dict[str, Any] = {"config": s.vqgan_config, "encode": [], "decode": None}
    run.payload["vqgan_encode"] = row
    try:
        _encode(run, section, row)
    except Exception as err:  # the decode half still runs
        row["error"] = error_text(err)
        print(f"  vqgan encode error: {row['error'][:300]}", flush=True)
    finally:
        run.save()
    if section.allows(s.decode_estimate_s, "the decode workers"):
        row["decode"] = _decode(run, row)
    else:
        row["decode"] = {"skipped": section.notes[-1]}
    derive_keeps_up(row)
    run.save()


def _encode(run: Run, section: Section, row: dict[str, Any]) -> None:
    from lvm.tokenizers.config import load_config

    s = run.settings
    cfg = load_config(s.vqgan_config).model
    row.update(resolution=cfg.resolution, codes_per_frame=cfg.code_shape[0] * cfg.code_shape[1])
    compile_s = s.default_compile_s
    tok = random_vqgan(cfg, jax.devices()[:1])
    for batch in s.vqgan_batches:
        if not section.allows(1.5 * compile_s + 2 * s.case_timing_s, f"the VQGAN encode of {batch} frames"):
            row["encode"].append({"batch": batch, "skipped": section.notes[-1]})
            continue
        tok.max_frames_per_device = batch  # one call of `batch` frames
        frames = np.random.default_rng(batch).integers(
            0, 256, (batch, cfg.resolution, cfg.resolution, 3), np.uint8
        )
        t0 = time.perf_counter()
        tok.encode(frames)  # compiles
        compile_s = time.perf_counter() - t0
        times: list[float] = []
        while len(times) < max(s.reps, 2) and (len(times) < 2 or sum(times) < s.case_timing_s):
            t0 = time.perf_counter()
            tok.encode(frames)  # returns host codes: waits for the device
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        row["encode"].append(
            {
                "batch": batch,
                "compile_s": compile_s,
                "times_s": times,
                "time_s": median,
                "frames_per_s": batch / median,
            }
        )
        print(
            f"  vqgan encode {batch} frames: {batch / median:.0f} frames/s (compile {compile_s:.1f} s)",
            flush=True,
        )
        run.save()


def _decode(run: Run, row: dict[str, Any]) -> dict[str, Any]:
    """pretokenize's decode stage with 1 worker and with the default count, on copies of one clip."""
    s = run.settings
    if MAPPED:  # a worker process imports lvm.data_pipeline without this package's mapping
        return {"skipped": f"not measured: {', '.join(MAPPED)} not installed (pip install -e .)"}
    try:
        import decord  # noqa: F401  (what the workers decode with)
        import PIL  # noqa: F401

        from lvm.bench.data import make_clip, measure_chunks, pool_chunks
        from lvm.data_pipeline.decode import DecodeConfig, available_cpus, default_decode_workers
    except ImportError as err:
        return {"skipped": f"not measured: {err} (pip install decord pillow imageio-ffmpeg)"}
    out: dict[str, Any] = {
        "clip": s.decode_clip,
        "clip_seconds": s.decode_clip_seconds,
        "sample_fps": s.decode_fps,
        "cpus": available_cpus(),
        "workers": default_decode_workers(),
        "rows": [],
    }
    try:
        with tempfile.TemporaryDirectory(prefix="lvm-gpu-decode-") as tmp:
            clip = make_clip(os.path.join(tmp, "clip.mp4"), s.decode_clip, s.decode_clip_seconds)
            cfg = DecodeConfig(resolution=row.get("resolution", 256), fps=s.decode_fps)
            for workers in sorted({1, out["workers"]}):
                uris = [clip] * (s.decode_videos_per_worker * workers)
                out["rows"].append({"workers": workers, **measure_chunks(pool_chunks(cfg, uris, workers))})
                print(
                    f"  decode, {workers} worker(s): {out['rows'][-1]['frames_per_s']:.1f} frames/s",
                    flush=True,
                )
    except Exception as err:
        out["error"] = error_text(err)
        print(f"  decode error: {out['error'][:300]}", flush=True)
    return out


def derive_keeps_up(row: dict[str, Any]) -> None:
    """Whether the default decode workers deliver the encode's best frames/s, and the workers that would (from
    the one-worker rate, scaled linearly); None where either side was not measured."""
    encoded = [r["frames_per_s"] for r in row.get("encode", []) if r.get("frames_per_s")]
    decode = row.get("decode") or {}
    rates = {r["workers"]: r["frames_per_s"] for r in decode.get("rows", []) if r.get("frames_per_s")}
    row["encode_frames_per_s"] = max(encoded, default=None)
    many = rates.get(decode.get("workers"))
    row["decode_frames_per_s"] = many
    if not encoded or many is None:
        row["keeps_up"] = row["workers_needed"] = None
        return
    row["keeps_up"] = many >= row["encode_frames_per_s"]
    row["workers_needed"] = math.ceil(row["encode_frames_per_s"] / rates[1]) if rates.get(1) else None
