"""Train a VQGAN video tokenizer on frames sampled from a folder or manifest of videos (resumes from --workdir).

Unreadable videos (missing, empty, truncated, corrupt) are skipped, each named with its cause on stderr and listed
in {workdir}/skipped_videos.json. Exit status: 0; 3 when training finished without some videos; 2 (before
training) when no video is readable or the arguments are wrong.
"""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    from lvm.job_report import EXIT_HELP

    parser.epilog = EXIT_HELP
    parser.add_argument("--config", required=True, help="configs/vqgan NAME (tiny, default) or a YAML path")
    parser.add_argument(
        "--videos", required=True, help="folder of videos, or a manifest with one path per line"
    )
    parser.add_argument(
        "--steps", type=int, required=True, help="total training steps (resuming counts earlier ones)"
    )
    parser.add_argument(
        "--workdir",
        required=True,
        help="checkpoints, TensorBoard logs, image grids, config.yaml, skipped_videos.json",
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="config overrides")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from lvm.job_report import EXIT_BAD_INPUTS
    from lvm.tokenizers.config import load_config
    from lvm.tokenizers.train_vqgan import train

    if args.steps <= 0:
        raise ValueError(f"--steps={args.steps} must be positive")
    cfg = load_config(args.config, args.set)
    metrics = train(cfg, args.videos, args.steps, args.workdir, progress=not args.no_progress)
    print(json.dumps(metrics))
    return EXIT_BAD_INPUTS if metrics["skipped_videos"] else 0
