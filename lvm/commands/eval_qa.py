"""Multiple-choice video QA (Video-MME layout): accuracy by option log-likelihood and by generated letter.

The report (--out) is rewritten as questions are scored, so a crash or Ctrl-C keeps what was finished (`complete`
false). A video that cannot be read (missing, truncated, corrupt) is named with its cause on stderr and listed in
the report (`failed`, `failures`: input, error, question ids); its questions are left out of the scores and the
rest goes on. Exit status: 0; 3 when some videos or questions were left out; 2 for bad arguments, a malformed
questions file or when no question could be scored (the report still lists why).
"""

from __future__ import annotations

import json
import sys

from lvm.commands.common import add_frame_arguments, add_model_arguments, model_from


def add_arguments(parser) -> None:
    from lvm.job_report import EXIT_HELP

    parser.epilog = EXIT_HELP
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="JSONL of questions in the Video-MME layout")
    parser.add_argument("--video-dir", help="folder of {videoID}.mp4 files (and of relative `video` paths)")
    parser.add_argument("--out", required=True, help="report JSON to write (kept up to date while it runs)")
    add_frame_arguments(parser)
    parser.add_argument(
        "--max-new-tokens", type=int, default=8, help="generated answer length (default: %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args) -> int:
    from lvm.evals.qa import METHODS, evaluate, read_questions, summarize
    from lvm.job_report import JobReport

    items = read_questions(args.data)
    model = model_from(args)
    records: list[dict | None] = [None] * len(items)
    header = {"checkpoint": str(args.checkpoint), "data": str(args.data)}
    with JobReport("lvm eval-qa", args.out, lambda: {**header, **summarize(records)}) as report:
        result = evaluate(
            model, items, args.video_dir, max_new_tokens=args.max_new_tokens, fps=args.fps,
            num_frames=args.num_frames, max_frames=args.max_frames, progress=not args.no_progress,
            report=report, records=records,
        )  # fmt: skip
    if not result["scored"]:
        raise ValueError(
            f"no question could be scored: {len(report.failures)} failures, listed in {args.out}"
        )
    overall = result["overall"]
    scores = ", ".join(f"{m} {overall[m]:.3f}" for m in METHODS)
    print(
        f"{result['scored']} of {result['questions']} questions scored ({len(report.failures)} failures): "
        f"{scores} (chance {overall['chance']:.3f}) -> {args.out}",
        file=sys.stderr,
    )
    print(json.dumps({"out": str(args.out), "failed": len(report.failures), **overall}))
    return report.exit_code
