"""Answer questions about a video with a trained model (the answer alone is the last line of stdout)."""

from __future__ import annotations

import json
import sys

from lvm.commands.common import (
    add_frame_arguments,
    add_model_arguments,
    add_sampling_arguments,
    model_from,
    sampling_from,
)


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--video", required=True, help="video file or gs:// URI")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--question", help="one question")
    group.add_argument(
        "--questions", help='JSONL file of {"question": ...} lines (the video is encoded once)'
    )
    add_frame_arguments(parser)
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="answer length limit (default: %(default)s)"
    )
    add_sampling_arguments(parser)


def read_questions(path: str) -> list[str]:
    questions = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                item = json.loads(line)
                if not isinstance(item, dict) or not isinstance(item.get("question"), str):
                    raise ValueError(f'{path}:{n}: each line must be a JSON object with a "question" string')
                questions.append(item["question"])
    return questions


def run(args) -> int:
    questions = [args.question] if args.question else read_questions(args.questions)
    model = model_from(args)
    room = max(len(model.codec.encode(q)) for q in questions) + 32 + args.max_new_tokens
    codes = model.read_video(
        args.video, fps=args.fps, num_frames=args.num_frames, max_frames=args.max_frames, reserve=room
    )
    print(f"video: {len(codes)} frames, {len(codes) * model.frame_tokens()} tokens", file=sys.stderr)
    ctx = model.video_context(codes, room)
    sampling = sampling_from(args)
    answers = []
    for q in questions:
        if len(questions) > 1:
            print(f"Q: {q}", file=sys.stderr)
        answer = model.answer(
            ctx,
            q,
            max_new_tokens=args.max_new_tokens,
            sampling=sampling,
            seed=args.seed,
            on_text=lambda t: print(t, end="", file=sys.stderr, flush=True),
        )
        print(file=sys.stderr)
        answers.append(answer)
    if len(questions) > 1:
        for q, a in zip(questions, answers, strict=True):
            print(json.dumps({"question": q, "answer": a}))
    print(answers[-1])
    return 0
