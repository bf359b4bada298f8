"""Evaluate a trained VQGAN on a folder of videos: PSNR, SSIM, codebook usage and perplexity as JSON.

Unreadable videos (missing, empty, truncated, corrupt) are left out, each named with its cause on stderr and
listed in the JSON (`failed`, `failures`). Exit status: 0; 3 when some videos were left out; 2 when none is
readable (the JSON still lists them) or the arguments are wrong.
"""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    from lvm.job_report import EXIT_HELP

    parser.epilog = EXIT_HELP
    parser.add_argument("--checkpoint", required=True, help="the --workdir of `lvm train-vqgan`")
    parser.add_argument(
        "--videos", required=True, help="folder of videos, or a manifest with one path per line"
    )
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument(
        "--frames-per-video", type=int, default=16, help="frames spread evenly over each video"
    )


def run(args) -> int:
    from lvm.job_report import JobReport
    from lvm.tokenizers.train_vqgan import evaluate
    from lvm.tokenizers.vqgan import VQGANTokenizer

    tokenizer = VQGANTokenizer.load(args.checkpoint)
    result: dict = {"checkpoint": str(args.checkpoint), "data": str(args.videos)}
    with JobReport("lvm eval-vqgan", args.out, lambda: result) as report:
        result.update(evaluate(tokenizer, args.videos, args.frames_per_video, report))
    print(json.dumps({"out": str(args.out), "failed": len(report.failures), **result}))
    return report.exit_code
