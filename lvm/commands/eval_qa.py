"""Multiple-choice video QA (Video-MME layout): accuracy by option log-likelihood and by generated letter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lvm.commands.common import add_frame_arguments, add_model_arguments, model_from


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="JSONL of questions in the Video-MME layout")
    parser.add_argument("--video-dir", help="folder of {videoID}.mp4 files (and of relative `video` paths)")
    parser.add_argument("--out", required=True, help="report JSON to write")
    add_frame_arguments(parser)
    parser.add_argument(
        "--max-new-tokens", type=int, default=8, help="generated answer length (default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args) -> int:
    from lvm.evals.qa import METHODS, evaluate, read_questions

    items = read_questions(args.data)
    model = model_from(args)
    report = evaluate(
        model,
        items,
        args.video_dir,
        max_new_tokens=args.max_new_tokens,
        fps=args.fps,
        num_frames=args.num_frames,
        max_frames=args.max_frames,
        progress=not args.no_progress,
    )
    report = {"checkpoint": str(args.checkpoint), "data": str(args.data), **report}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    overall = report["overall"]
    scores = ", ".join(f"{m} {overall[m]:.3f}" for m in METHODS)
    print(
        f"{overall['count']} questions: {scores} (chance {overall['chance']:.3f}) -> {out}", file=sys.stderr
    )
    print(json.dumps({"out": str(out), **overall}))
    return 0
