"""Data pipeline benchmark: decode frames/s vs ffmpeg, loader tokens/s from disk and from a GCS server.

- Decode: one h264 mp4 (a synthetic moving pattern unless --video) decoded with every frame kept, three ways:
  `ffmpeg -i FILE -f rawvideo -pix_fmt rgb24 -` (imageio-ffmpeg's binary, output discarded), decord through the
  pipeline's `Decoder` at native size-ish work (all frames, resized + centre-cropped to --resolution, in the
  worker process, over the pipe), and the pipeline at the default 1 fps sampling (frames delivered per second
  of wall time).
- Loader: a synthetic pre-tokenized corpus (random records of --record-tokens) read by `Loader` for --steps
  batches of --batch x --seq-len tokens from local disk and from a loopback fake-gcs-server (gcsfs path), after
  one warm-up batch; tokens/s counts every position of the packed batches.
- Consumption reference: tokens/s one host's training step eats = chips_per_host * peak_flops * mfu / (6 *
  params) (defaults: 4 chips of 275 TFLOP/s (TPUv4), 50% MFU, a 7B model: about 13K tokens/s per host).
Writes OUT/data.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import tempfile
import time

from lvm.bench import common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--video", help="mp4 to decode (default: a synthetic 256x256 clip)")
    parser.add_argument(
        "--frames", type=int, default=240, help="frames of the synthetic clip (default: %(default)s)"
    )
    parser.add_argument("--size", type=int, default=256, help="height and width of the synthetic clip")
    parser.add_argument("--resolution", type=int, default=256, help="decoder output resolution")
    parser.add_argument("--seq-len", type=int, default=32768, help="loader sequence length")
    parser.add_argument("--batch", type=int, default=4, help="loader rows per batch")
    parser.add_argument("--steps", type=int, default=8, help="timed loader batches")
    parser.add_argument("--record-tokens", type=int, default=4096, help="mean tokens per synthetic record")
    parser.add_argument("--records", type=int, default=512, help="records in the synthetic corpus")
    parser.add_argument("--no-gcs", action="store_true", help="skip the GCS server measurement")
    parser.add_argument(
        "--params", type=float, default=7e9, help="model parameters for the consumption reference"
    )
    parser.add_argument("--chips-per-host", type=int, default=4)
    parser.add_argument("--peak-flops", type=float, default=275e12, help="per chip")
    parser.add_argument("--mfu", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="a smoke run: small clip, short sequences")
    parser.add_argument("--out", default="runs/bench/data", help="output folder (default: %(default)s)")


def _decode(args, workdir: pathlib.Path) -> dict:
    import imageio_ffmpeg

    from lvm.data_pipeline.decode import DecodeConfig, Decoder
    from lvm.tokenizers import synthetic

    path = args.video
    if path is None:
        path = str(workdir / "clip.mp4")
        synthetic.write_video(
            path, synthetic.moving_pattern(args.size, args.size, args.frames, seed=0), fps=30
        )
    t0 = time.perf_counter()
    raw = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-threads", "1", "-i", path, "-f", "rawvideo",
         "-pix_fmt", "rgb24", "-"],
        check=True, stdout=subprocess.PIPE,
    ).stdout  # fmt: skip
    ffmpeg_s = time.perf_counter() - t0
    out = {"video": path}
    with Decoder(DecodeConfig(resolution=args.resolution, fps=1e9, threads=1)) as dec:
        for _ in dec.frames(path):  # warm-up (worker start), a chunk at a time as in the timed run
            pass
        frames = dec.info.frames
        h, w, fps = dec.info.height, dec.info.width, dec.info.fps
        t0 = time.perf_counter()
        n = sum(len(c.frames) for c in dec.frames(path))
        all_s = time.perf_counter() - t0
    with Decoder(DecodeConfig(resolution=args.resolution, fps=1.0, threads=1)) as dec:
        for _ in dec.frames(path):
            pass
        t0 = time.perf_counter()
        sampled = sum(len(c.frames) for c in dec.frames(path))
        sampled_s = time.perf_counter() - t0
    assert len(raw) == frames * h * w * 3, "ffmpeg and decord disagree on the frame count"
    out.update(
        frames=frames, height=h, width=w,
        ffmpeg_raw_frames_per_s=frames / ffmpeg_s,
        pipeline_all_frames_per_s=n / all_s,
        pipeline_vs_ffmpeg=(n / all_s) / (frames / ffmpeg_s),
        pipeline_1fps_sampled_frames=sampled,
        pipeline_1fps_frames_per_s=sampled / sampled_s,
        pipeline_1fps_video_seconds_per_s=(frames / fps) / sampled_s,
    )  # fmt: skip
    return out


def _corpus(folder: str, records: int, mean_tokens: int) -> None:
    import numpy as np

    from lvm.data_pipeline import shards, storage
    from lvm.tokenizers.format import TokenRecord, VisionVocab

    rng = np.random.default_rng(0)
    recs = []
    for _ in range(records):
        n = int(rng.integers(mean_tokens // 2, mean_tokens * 3 // 2))
        recs.append(
            TokenRecord(
                rng.integers(0, 8000, n).astype(np.int32), rng.random(n) < 0.5, np.ones(n, np.float32)
            )
        )
    per = 64
    n_shards = -(-records // per)
    for k in range(n_shards):
        part = recs[k * per : (k + 1) * per]
        shards.write_shard(folder, k, n_shards, part, [str(i) for i in range(len(part))], VisionVocab(), [])
    storage.write_json(storage.join(folder, shards.HEADER), {"format": shards.FORMAT, "num_shards": n_shards})


def _loader(uri: str, args, cache_dir: str) -> dict:
    import jax
    import numpy as np

    from lvm.data_pipeline.loader import Loader, LoaderConfig, Source

    mesh = jax.make_mesh((1, 1, 1, 1), ("dp", "fsdp", "tp", "sp"), devices=jax.devices()[:1])
    cfg = LoaderConfig((Source(uri),), seq_len=args.seq_len, batch_size=args.batch, cache_dir=cache_dir)
    it = Loader(cfg, mesh)
    jax.block_until_ready(next(it))
    t0 = time.perf_counter()
    for _ in range(args.steps):
        batch = next(it)
        jax.block_until_ready(batch)
    seconds = time.perf_counter() - t0
    filled = float(np.mean(np.asarray(batch.segment_ids) > 0))
    it.close()
    tokens = args.steps * args.batch * args.seq_len
    return {"uri": uri, "steps": args.steps, "tokens_per_s": tokens / seconds, "fill_last_batch": filled}


def run(args) -> int:
    if args.quick:
        args.frames, args.size, args.resolution = 60, 128, 64
        args.seq_len, args.steps, args.records, args.record_tokens = 4096, 4, 64, 1024
    common.configure_cpu_devices(1)
    from lvm.data_pipeline import emulator, storage

    consumption = args.chips_per_host * args.peak_flops * args.mfu / (6 * args.params)
    with tempfile.TemporaryDirectory(prefix="lvm-bench-data-") as tmp:
        workdir = pathlib.Path(tmp)
        result = {"machine": common.machine_info(), "measured_at": common.utc_now()}
        result["decode"] = _decode(args, workdir)
        corpus = str(workdir / "corpus")
        _corpus(corpus, args.records, args.record_tokens)
        result["loader_disk"] = _loader(corpus, args, str(workdir / "cache-disk"))
        if not args.no_gcs:
            with emulator.FakeGCS() as server:
                server.create_bucket("bench")
                old = os.environ.get("STORAGE_EMULATOR_HOST")
                emulator.set_environ(server.url)
                try:
                    for name in storage.listdir(corpus):
                        storage.write_bytes(
                            f"gs://bench/corpus/{name}", open(os.path.join(corpus, name), "rb").read()
                        )
                    result["loader_gcs"] = _loader("gs://bench/corpus", args, str(workdir / "cache-gcs"))
                finally:
                    if old is None:
                        os.environ.pop("STORAGE_EMULATOR_HOST", None)
                    else:
                        os.environ["STORAGE_EMULATOR_HOST"] = old
                    storage.reset_gcs_client()
    result["training_consumption"] = {
        "tokens_per_s_per_host": consumption,
        "formula": "chips_per_host * peak_flops * mfu / (6 * params)",
        "params": args.params, "chips_per_host": args.chips_per_host, "peak_flops": args.peak_flops, "mfu": args.mfu,
    }  # fmt: skip
    for key in ("loader_disk", "loader_gcs"):
        if key in result:
            result[key]["x_training_consumption"] = result[key]["tokens_per_s"] / consumption
    path = common.write_json(pathlib.Path(args.out) / "data.json", result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2, default=str))
    print(f"wrote {path}")
    return 0
