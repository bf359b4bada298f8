"""VQGAN tokenizer benchmark: encode and decode frames/s for the default (256x256) and tiny configs.

For each config it builds a `VQGANTokenizer` (random weights unless --checkpoint: speed does not depend on the
weights) over the local devices, encodes and decodes `--frames` random uint8 frames through the public
`encode`/`decode` API (chunking, host transfers and padding included) after one warm-up call (the compile), and
reports frames/s from the fastest of the timed calls. Writes OUT/tokenizer.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from lvm.bench import common

FRAMES = {"tiny": 64, "default": 8}
QUICK_FRAMES = {"tiny": 16, "default": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--configs", nargs="+", default=["tiny", "default"], help="configs/vqgan names or paths"
    )
    parser.add_argument("--frames", type=int, help=f"frames per call (default per config: {FRAMES})")
    parser.add_argument("--frames-per-device", type=int, default=8, help="chunk size per device")
    parser.add_argument("--reps", type=int, default=3, help="timed calls after the warm-up")
    parser.add_argument(
        "--budget", type=float, default=20.0, help="stop timing a setting after this many seconds"
    )
    parser.add_argument("--devices", type=int, help="simulated CPU devices (CPU only; default: jax's own)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: frames {QUICK_FRAMES}, 2 reps")
    parser.add_argument("--out", default="runs/bench/tokenizer", help="output folder (default: %(default)s)")


def run(args) -> int:
    if args.devices:
        common.configure_cpu_devices(args.devices)  # before jax is imported
    import jax
    import numpy as np

    from lvm.tokenizers.config import load_config
    from lvm.tokenizers.vqgan import VQGANTokenizer, init_variables

    reps = 2 if args.quick else args.reps
    results = []
    for name in args.configs:
        cfg = load_config(name).model
        frames_n = args.frames or (QUICK_FRAMES if args.quick else FRAMES).get(name, 8)
        t0 = time.perf_counter()
        tok = VQGANTokenizer(cfg, init_variables(cfg), max_frames_per_device=args.frames_per_device)
        init_s = time.perf_counter() - t0
        frames = np.random.default_rng(0).integers(
            0, 256, (frames_n, cfg.resolution, cfg.resolution, 3), np.uint8
        )
        enc = common.time_calls(tok.encode, (frames,), reps=reps, budget_s=args.budget)
        codes = tok.encode(frames)
        dec = common.time_calls(tok.decode, (codes,), reps=reps, budget_s=args.budget)
        n_params = sum(x.size for x in jax.tree.leaves(tok.variables["params"]))
        results.append(
            {
                "config": name,
                "resolution": cfg.resolution,
                "codes_per_frame": cfg.code_shape[0] * cfg.code_shape[1],
                "codebook_size": cfg.codebook_size,
                "params": int(n_params),
                "frames": frames_n,
                "devices": len(tok.devices),
                "encode_frames_per_s": frames_n / enc["time_s"],
                "decode_frames_per_s": frames_n / dec["time_s"],
                "encode": enc,
                "decode": dec,
                "init_s": init_s,
            }
        )
        print(
            f"{name}: {cfg.resolution}x{cfg.resolution}, {frames_n} frames on {len(tok.devices)} device(s): "
            f"encode {results[-1]['encode_frames_per_s']:.1f} frames/s, "
            f"decode {results[-1]['decode_frames_per_s']:.1f} frames/s"
        )
    payload = {
        "benchmark": "tokenizer",
        "date": common.utc_now(),
        "machine": common.machine_info(),
        "load_average": common.load_average(),
        "notes": [
            "frames/s = frames per call / fastest timed call after one warm-up (compile) call; uint8 frames in, "
            "int32 codes out (encode) and back (decode), host transfers included; random weights."
        ],
        "results": results,
    }
    path = common.write_json(pathlib.Path(args.out) / "tokenizer.json", payload)
    keys = ("config", "resolution", "frames", "devices", "encode_frames_per_s", "decode_frames_per_s")
    print(json.dumps({"out": str(path), "results": [{k: r[k] for k in keys} for r in results]}))
    return 0
