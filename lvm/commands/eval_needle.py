"""Needle in a haystack over a grid of context lengths x depths (text or video): JSON and a heatmap PNG.

The JSON is rewritten as cells finish, so a crash or Ctrl-C keeps them (`complete` false). A --haystack-video that
cannot be read (missing, truncated, corrupt) is named with its cause on stderr, listed in the JSON (`failed`,
`failures`) and left out of the haystack, which is made of the others. Exit status: 0; 3 when some haystack
videos were left out; 2 for bad arguments, an unreadable --needle-video or no readable --haystack-video.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

from lvm.commands.common import add_model_arguments, model_from

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def add_arguments(parser) -> None:
    from lvm.job_report import EXIT_HELP

    parser.epilog = EXIT_HELP
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, help="folder for needle_{mode}.json and needle_{mode}.png")
    parser.add_argument("--mode", choices=("text", "video"), default="text", help="default: %(default)s")
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        help="haystack tokens (text) or frames (video); default: 4 up to the context",
    )
    parser.add_argument("--depths", type=float, nargs="+", default=DEPTHS, help="needle depths in [0, 1]")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="answer length (default: %(default)s)")
    text = parser.add_argument_group("text mode")
    text.add_argument(
        "--filler", help="text file of haystack sentences (default: LWM's grass/sky/sun filler)"
    )
    text.add_argument("--trials", type=int, default=1, help="random magic numbers per cell (default: 1)")
    video = parser.add_argument_group("video mode")
    video.add_argument(
        "--haystack-video",
        nargs="+",
        help="video files or URIs whose frames, in order, make the haystack (default: grey noise)",
    )
    video.add_argument("--needle-video", help="video file or URI for the needle (default: a coloured frame)")
    video.add_argument("--needle-frames", type=int, default=1, help="needle frames (default: %(default)s)")
    video.add_argument("--needle-colour", default="220,30,30", help="R,G,B of the default needle frame")
    video.add_argument("--question", default="What colour is the video?", help="question about the needle")
    video.add_argument("--answer", default="Red", help="expected answer (substring match, case-insensitive)")
    video.add_argument("--options", nargs="+", help="also score by option log-likelihood (answer is one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args) -> int:
    from lvm.evals import needle
    from lvm.job_report import JobReport

    model = model_from(args)
    progress = not args.no_progress
    out = Path(args.out)
    grid: dict = {}
    with JobReport(
        "lvm eval-needle",
        out / f"needle_{args.mode}.json",
        lambda: {"checkpoint": str(args.checkpoint), **grid},
    ) as report:
        if args.mode == "text":
            filler = Path(args.filler).read_text() if args.filler else needle.FILLER
            lengths = args.lengths or _default_lengths(model.context - 64 - args.max_new_tokens)
            needle.text_needle_grid(
                model, lengths, args.depths, filler=filler, trials=args.trials,
                max_new_tokens=args.max_new_tokens, progress=progress, result=grid, report=report,
            )  # fmt: skip
        else:
            lengths = args.lengths or _default_lengths(model.frames_that_fit(64 + args.max_new_tokens))
            res = model.vqgan.cfg.resolution
            if args.haystack_video:
                haystack = _haystack(model, args.haystack_video, max(lengths), report)
            else:
                haystack = model.vqgan.encode(needle.procedural_frames(max(lengths), res, seed=0))
            if args.needle_video:
                needle_codes = model.read_video(args.needle_video, num_frames=args.needle_frames)
            else:
                rgb = tuple(int(c) for c in args.needle_colour.split(","))
                needle_codes = model.vqgan.encode(
                    needle.procedural_frames(args.needle_frames, res, rgb, seed=1)
                )
            needle.video_needle_grid(
                model, haystack, needle_codes, lengths, args.depths, args.question, args.answer, args.options,
                max_new_tokens=args.max_new_tokens, progress=progress, result=grid, report=report,
            )  # fmt: skip
    needle.plot_heatmap(grid, out / f"needle_{args.mode}.png")
    print(
        f"mean accuracy {grid['mean_accuracy']:.3f} over {len(grid['cells'])} cells"
        f" ({len(report.failures)} failures) -> {out}",
        file=sys.stderr,
    )
    summary = {k: grid[k] for k in ("mean_accuracy", "accuracy")}
    print(json.dumps({"out": str(out), "failed": len(report.failures), **summary}))
    return report.exit_code


def _haystack(model, uris: list[str], frames: int, report):
    """The codes of the videos that can be read, in order (`frames` in all); the others recorded in `report`."""
    import numpy as np

    from lvm.job_report import attempt

    each = -(-frames // len(uris))  # frames per video, rounded up
    codes = [attempt(report, uri, functools.partial(model.read_video, uri, num_frames=each)) for uri in uris]
    codes = [c for c in codes if c is not None]
    if not codes:
        raise ValueError(f"none of the {len(uris)} --haystack-video files could be read (causes above)")
    return np.concatenate(codes)


def _default_lengths(longest: int) -> list[int]:
    """Four lengths evenly up to `longest`."""
    if longest < 4:
        raise ValueError(f"the model's context leaves room for only {longest} haystack units; give --lengths")
    return [longest * i // 4 for i in range(1, 5)]
