"""Evaluate a trained VQGAN on a folder of videos: PSNR, SSIM, codebook usage and perplexity as JSON."""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="the --workdir of `lvm train-vqgan`")
    parser.add_argument(
        "--videos", required=True, help="folder of videos, or a manifest with one path per line"
    )
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument(
        "--frames-per-video", type=int, default=16, help="frames spread evenly over each video"
    )


def run(args) -> int:
    from lvm.tokenizers.train_vqgan import evaluate
    from lvm.tokenizers.vqgan import VQGANTokenizer

    result = evaluate(VQGANTokenizer.load(args.checkpoint), args.videos, args.frames_per_video)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0
