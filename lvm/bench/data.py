"""Data pipeline benchmark: decode frames/s vs ffmpeg, the decode settings that cost speed, decode frames/s with
1, 2 and N worker processes, decode + VQGAN encode end to end before and after the worker pool, loader tokens/s
from disk and from a GCS server.

- Decode: one h264 mp4 (a synthetic moving pattern unless --video) decoded with every frame kept, three ways:
  `ffmpeg -i FILE -f rawvideo -pix_fmt rgb24 -` (imageio-ffmpeg's binary, output discarded), decord through the
  pipeline's `Decoder` at native size-ish work (all frames, resized + centre-cropped to --resolution, in the
  worker process, over the pipe), and the pipeline at the default 1 fps sampling (frames delivered per second
  of wall time).
- Decode settings (`decode_settings`, in this process, CPU time, on a --settings-size 30 fps clip): decord's
  decode alone, and decode + RGB conversion with 1 thread and with its own threads; the pipeline's resize + crop (PIL bicubic) and
  two faster resizes with the pixels they change (swscale inside decord, PIL's box crop-then-resize); 1 fps
  sampling by seeking (`get_batch`, the pipeline's) against reading every frame in order (`skip_frames`).
- Workers (`decode_workers`): pretokenize's decode stage, a `DecodePool` reading --clips copies of a --clip-size
  --clip-seconds 30 fps clip at --sample-fps, with 1, 2 and N workers (N: the CPUs; --workers): frames/s of wall
  time from the pool's start, per CPU second of the workers, and the cores the workers got (their CPU seconds
  per second: on a busy machine with Linux's sched_autogroup, one session's fair share however many workers).
  Target (`decode_scaling`): frames/s grows with the workers up to the CPUs, each step at least half the ideal.
- End to end (`decode_encode`): the same clips decoded and encoded by the tiny VQGAN (configs/vqgan/tiny.yaml,
  random weights, one CPU device) chunk by chunk as pretokenize does it: before (one `Decoder`, the next video
  queued, as pretokenize read them before the pool) and after (the pool, with the default and with N workers).
- Loader: a synthetic pre-tokenized corpus (random records of --record-tokens) read by `Loader` for --steps
  batches of --batch x --seq-len tokens from local disk and from a loopback fake-gcs-server (gcsfs path), after
  one warm-up batch; tokens/s counts every position of the packed batches.
- Consumption reference: tokens/s one host's training step eats = chips_per_host * peak_flops * mfu / (6 *
  params) (defaults: 4 chips of 275 TFLOP/s (TPUv4), 50% MFU, a 7B model: about 13K tokens/s per host).
The machine (CPU model, CPUs, load average at the start and the end) is recorded: other work on shared cores
slows every wall-time number. Writes OUT/data.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

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
    parser.add_argument(
        "--workers", type=int, nargs="+", help="decode worker counts to measure (default: 1, 2 and the CPUs)"
    )
    parser.add_argument(
        "--clips", type=int, default=8, help="videos in the workers' run (default: %(default)s)"
    )
    parser.add_argument("--clip-seconds", type=float, default=10.0, help="length of the workers' clip")
    parser.add_argument(
        "--clip-size", default="640x360", help="WxH of the workers' clip (default: %(default)s)"
    )
    parser.add_argument("--sample-fps", type=float, default=3.0, help="sampling rate of the workers' run")
    parser.add_argument("--settings-size", default="1280x720", help="WxH of the decode settings' clip")
    parser.add_argument("--no-settings", action="store_true", help="skip the decode settings")
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


# Decode workers ---------------------------------------------------------------------------------------------

SCALING_SHARE = 0.5  # target: each step up in workers (within the CPUs) gains at least half the ideal


def make_clip(path: str, size: str, seconds: float, fps: int = 30) -> str:
    """An h264 mp4 of ffmpeg's `testsrc2` pattern (WxH `size`), written by imageio-ffmpeg's or the PATH's ffmpeg."""
    import shutil

    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except ImportError:
        exe = shutil.which("ffmpeg")
        if exe is None:
            raise FileNotFoundError("no ffmpeg: install imageio-ffmpeg or put ffmpeg on PATH") from None
    subprocess.run(
        [exe, "-y", "-loglevel", "error", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={fps}", "-t",
         f"{seconds:g}", "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", path],
        check=True, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    return path


def one_worker_chunks(cfg, uris: Sequence[str]) -> Iterator:
    """The chunks of `uris` as pretokenize read them before the pool: one `Decoder`, the next video queued."""
    from lvm.data_pipeline.decode import Decoder

    with Decoder(cfg) as decoder:
        for uri, then in zip(uris, [*uris[1:], None], strict=True):
            yield from decoder.frames(uri, then)


def pool_chunks(cfg, uris: Sequence[str], workers: int) -> Iterator:
    """The chunks of `uris` in order from a `DecodePool` of `workers`, as pretokenize reads them."""
    from lvm.data_pipeline.decode import DecodePool

    with DecodePool(cfg, workers=workers) as pool:
        pool.schedule(uris)
        for uri in uris:
            yield from pool.frames(uri)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_chunks(chunks: Iterator, encode: Callable | None = None) -> dict[str, Any]:
    """Frames/s of wall time of a chunk stream (from its start, worker start-up included, to its end), each
    chunk's frames passed to `encode` when given; CPU seconds of this process and of the worker processes."""
    children, main, t0 = _children_cpu_s(), time.process_time(), time.perf_counter()
    frames, first_s, first_n = 0, None, 0
    for chunk in chunks:
        if encode is not None:
            encode(chunk.frames)
        frames += len(chunk.frames)
        if first_s is None:
            first_s, first_n = time.perf_counter() - t0, frames
    seconds = time.perf_counter() - t0
    workers_cpu = _children_cpu_s() - children  # the workers are joined when the stream ends
    return {
        "frames": frames,
        "seconds": seconds,
        "frames_per_s": frames / seconds,
        "first_chunk_s": first_s,  # worker start-up and the first chunk
        "frames_per_s_after_first_chunk": (frames - first_n) / (seconds - first_s)
        if frames > first_n
        else None,
        "main_cpu_s": time.process_time() - main,
        "workers_cpu_s": workers_cpu,
        "cores_used": workers_cpu / seconds,  # the CPU the workers got: on shared cores, what limits them
        "frames_per_worker_cpu_s": frames / workers_cpu if workers_cpu > 0 else None,
    }


def decode_scaling(rows: Sequence[dict[str, Any]], cpus: int) -> dict[str, Any]:
    """Target: decode frames/s grows with the workers up to the CPUs. Over the rows ({"workers",
    "frames_per_s"}) with at most `cpus` workers, in order of workers, each step from a to b workers must reach
    (1 + SCALING_SHARE * (b / a - 1)) x a's frames/s: at least half the ideal gain."""
    within = sorted(
        (r for r in rows if r["workers"] <= cpus and r.get("frames_per_s")), key=lambda r: r["workers"]
    )
    steps = [(a, b) for a, b in zip(within, within[1:], strict=False) if b["workers"] > a["workers"]]

    def needs(step) -> float:
        a, b = step
        return 1 + SCALING_SHARE * (b["workers"] / a["workers"] - 1)

    def describe(step) -> str:
        a, b = step
        gain = b["frames_per_s"] / a["frames_per_s"]
        return f"{a['workers']} -> {b['workers']} workers {gain:.2f}x (needs {needs(step):.2f}x)"

    return {
        "rule": f"decode frames/s grows with the workers up to the {cpus} CPUs: each step from a to b workers "
        f"gains >= {SCALING_SHARE:g} x the ideal b/a",
        **common.verdict(
            steps,
            lambda step: step[1]["frames_per_s"] >= needs(step) * step[0]["frames_per_s"],
            describe,
            need=f">= {SCALING_SHARE:g} x the ideal gain per step",
            missing=f"needs two worker counts within the {cpus} CPUs",
        ),
    }


def random_vqgan(cfg, devices, **kwargs):
    """A `VQGANTokenizer` of config `cfg` with random weights, without compiling the initialiser (that takes
    longer than the encoder's compile on CPU): encode speed does not depend on the values."""
    import jax

    from lvm.tokenizers.vqgan import VQGANTokenizer, init_variables

    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: init_variables(cfg))
    variables = jax.tree.map(lambda x: (0.02 * rng.standard_normal(x.shape)).astype(x.dtype), shapes)
    return VQGANTokenizer(cfg, variables, devices=devices, **kwargs)


def _autogroup() -> bool | None:
    """Whether Linux shares CPU time fairly between sessions first (sched_autogroup): then all the workers of
    this benchmark, one session, get one session's share of a busy machine however many they are."""
    try:
        return pathlib.Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return None


def _worker_counts(args, cpus: int) -> list[int]:
    from lvm.data_pipeline.decode import default_decode_workers

    return sorted(set(args.workers or [1, 2, cpus, default_decode_workers()]))


def _decode_workers(args, workdir: pathlib.Path) -> tuple[dict, dict]:
    """pretokenize's decode stage with 1, 2 and N workers; decode + tiny VQGAN encode before and after."""
    import jax

    from lvm.data_pipeline.decode import DecodeConfig, available_cpus, default_decode_workers
    from lvm.tokenizers.config import load_config

    cpus = available_cpus()
    clip = make_clip(str(workdir / "workers.mp4"), args.clip_size, args.clip_seconds)
    uris = [clip] * args.clips
    cfg = DecodeConfig(resolution=args.resolution, fps=args.sample_fps, chunk_frames=8)
    setup = {"clip": args.clip_size, "clip_seconds": args.clip_seconds, "clips": args.clips,
             "sample_fps": args.sample_fps, "resolution": args.resolution, "cpus": cpus,
             "default_workers": default_decode_workers(), "sched_autogroup": _autogroup()}  # fmt: skip
    rows = []
    for workers in _worker_counts(args, cpus):
        rows.append({"workers": workers, **measure_chunks(pool_chunks(cfg, uris, workers))})
        print(f"decode, {workers} worker(s): {rows[-1]['frames_per_s']:.1f} frames/s", flush=True)
    decode = {**setup, "rows": rows, "target": decode_scaling(rows, cpus)}

    vq = load_config("tiny").model  # 64x64 frames; chunks of 8 frames, as pretokenize on one device
    tok = random_vqgan(vq, jax.devices()[:1])
    tok.encode(np.zeros((8, vq.resolution, vq.resolution, 3), np.uint8))  # compiled before timing
    cfg = DecodeConfig(resolution=vq.resolution, fps=args.sample_fps, chunk_frames=8)
    before = {
        "decoder": "one Decoder, next video queued",
        **measure_chunks(one_worker_chunks(cfg, uris), tok.encode),
    }
    print(f"decode + encode before (one worker): {before['frames_per_s']:.1f} frames/s", flush=True)
    after = []
    for workers in sorted({default_decode_workers(), max(cpus, 2)}):
        after.append({"workers": workers, **measure_chunks(pool_chunks(cfg, uris, workers), tok.encode)})
        print(
            f"decode + encode after, {workers} worker(s): {after[-1]['frames_per_s']:.1f} frames/s",
            flush=True,
        )
    encode = {
        **setup,
        "vqgan": "tiny (64x64, random weights, 1 CPU device)",
        "before": before,
        "after": after,
    }
    return decode, encode


def _decode_settings(args, workdir: pathlib.Path) -> dict:
    """CPU time per frame of the decode settings that cost speed, in this process (see the module docstring)."""
    import decord

    from lvm.tokenizers.video import resize_crop

    path = make_clip(str(workdir / "settings.mp4"), args.settings_size, 2 if args.quick else 10)
    r = args.resolution
    n = 16 if args.quick else 120

    def cpu(fn):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        return out, time.process_time() - c0, time.perf_counter() - t0

    def batches(reader, idx):
        return np.concatenate([reader.get_batch(idx[i : i + 4]).asnumpy() for i in range(0, len(idx), 4)])

    rows = {}

    def row(name, frames, cpu_s, wall_s, **extra):
        rows[name] = {
            "frames": frames,
            "frames_per_cpu_s": frames / cpu_s,
            "frames_per_s": frames / wall_s,
            **extra,
        }

    first = list(range(n))
    reader = decord.VideoReader(
        path, num_threads=1
    )  # n frames from the start, all before the second keyframe
    _, c, w = cpu(lambda: reader.skip_frames(n))
    row("decode only (decord skip_frames: no RGB conversion)", n, c, w)
    for threads in (1, 0):
        reader = decord.VideoReader(path, num_threads=threads)
        full, c, w = cpu(lambda reader=reader: batches(reader, first))
        row(f"decode + RGB, decord threads={threads}", n, c, w)
    h, width = full.shape[1:3]
    ref, c, w = cpu(lambda: np.concatenate([resize_crop(full[i : i + 4], r) for i in range(0, n, 4)]))
    row("resize + crop, PIL bicubic (the pipeline's)", n, c, w)
    scale = r / min(h, width)
    new_h, new_w = max(r, round(h * scale)), max(r, round(width * scale))
    top, left = (new_h - r) // 2, (new_w - r) // 2
    reader = decord.VideoReader(path, num_threads=1, width=new_w, height=new_h)
    small, c, w = cpu(lambda: batches(reader, first)[:, top : top + r, left : left + r])
    row("decode + RGB + resize in swscale (decord width/height), crop", n, c, w, **_pixels(small, ref))
    boxed, c, w = cpu(lambda: _box_resize_crop(full, r))
    row("resize + crop, PIL bicubic of the crop's box only", n, c, w, **_pixels(boxed, ref))
    reader = decord.VideoReader(path, num_threads=1)
    sparse = list(range(0, len(reader), round(reader.get_avg_fps())))  # 1 fps
    seek, c, w = cpu(lambda: batches(reader, sparse))
    row("1 fps by seeking (get_batch, the pipeline's)", len(sparse), c, w)
    reader = decord.VideoReader(path, num_threads=1)
    seq, c, w = cpu(lambda: _sequential(reader, sparse))
    row("1 fps reading every frame in order (skip_frames + next)", len(sparse), c, w, **_pixels(seq, seek))
    return {"clip": args.settings_size, "resolution": r, "rows": rows}


def _pixels(got, ref) -> dict[str, Any]:
    diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
    return {
        "identical": bool(not diff.any()),
        "max_abs_diff": int(diff.max()),
        "mean_abs_diff": float(diff.mean()),
    }


def _box_resize_crop(frames, r: int):
    """resize_crop computing only the crop: PIL's resize of the crop's box in source coordinates."""
    from PIL import Image

    h, w = frames.shape[1:3]
    scale = r / min(h, w)
    new_h, new_w = max(r, round(h * scale)), max(r, round(w * scale))
    top, left = (new_h - r) // 2, (new_w - r) // 2
    box = (left * w / new_w, top * h / new_h, (left + r) * w / new_w, (top + r) * h / new_h)
    resample = Image.BICUBIC
    return np.stack(
        [np.asarray(Image.fromarray(f).resize((r, r), resample, box, reducing_gap=2.0)) for f in frames]
    )


def _sequential(reader, idx):
    out, at = [], 0
    for i in idx:
        if i > at:
            reader.skip_frames(i - at)
        out.append(reader.next().asnumpy())
        at = i + 1
    return np.stack(out)


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
        args.clips, args.clip_seconds, args.clip_size, args.settings_size = 2, 2.0, "160x120", "320x180"
    common.configure_cpu_devices(1)
    from lvm.data_pipeline import emulator, storage

    consumption = args.chips_per_host * args.peak_flops * args.mfu / (6 * args.params)
    with tempfile.TemporaryDirectory(prefix="lvm-bench-data-") as tmp:
        workdir = pathlib.Path(tmp)
        result = {"machine": common.machine_info(), "measured_at": common.utc_now()}
        m = result["machine"]
        print(f"machine: {m['cpu_model']}, {m['cpu_affinity'] or m['cpu_count']} CPUs, load average "
              f"{m['load_average_start']} at the start", flush=True)  # fmt: skip
        result["decode"] = _decode(args, workdir)
        if not args.no_settings:
            result["decode_settings"] = _decode_settings(args, workdir)
        result["decode_workers"], result["decode_encode"] = _decode_workers(args, workdir)
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
    result["load_average_end"] = common.load_average()
    path = common.write_json(pathlib.Path(args.out) / "data.json", result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2, default=str))
    print(f"wrote {path}")
    return 0
