"""Answer questions about a video with a trained model (one question: the answer is the last line of stdout;
--questions: one JSON object per question on stdout, nothing else)."""

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

EXAMPLE = '{"question": "What happens?"}'


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--video", required=True, help="video file or gs:// URI (an image is a one-frame video)"
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--question", help="one question")
    group.add_argument(
        "--questions",
        help=f"JSONL file or gs:// URI, one {EXAMPLE} per line (the video is encoded once); "
        '{"question": ..., "answer": ...} lines are written to stdout',
    )
    add_frame_arguments(parser)
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="answer length limit (default: %(default)s)"
    )
    add_sampling_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no decoding progress bar")


def read_questions(uri: str) -> list[tuple[str, str]]:
    """(where, question) of each non-blank line of a JSONL file or gs:// URI; `where` is 'file:line'."""
    from lvm.data_pipeline import storage

    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"--questions {uri}: no such file") from None
    except UnicodeDecodeError:
        raise ValueError(f"--questions {uri} is not a UTF-8 text file of JSON lines like {EXAMPLE}") from None
    questions = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{uri}:{n}: not JSON ({err.msg}); each line must be like {EXAMPLE}") from None
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            raise ValueError(
                f'{uri}:{n}: each line must be a JSON object with a "question" string, like {EXAMPLE}'
            )
        questions.append((f"{uri}:{n}", item["question"]))
    if not questions:
        raise ValueError(f"--questions {uri} holds no questions (one {EXAMPLE} per line)")
    return questions


def run(args) -> int:
    if args.question is not None:
        questions = [("--question", args.question)]
    else:
        questions = read_questions(args.questions)
    model = model_from(args)
    tokens = [len(model.codec.encode(q)) for _, q in questions]
    room = max(tokens) + 32 + args.max_new_tokens
    if model.frames_that_fit(room) < 1:  # the question, not the video, is too long
        where, q = questions[tokens.index(max(tokens))]
        short = q if len(q) <= 60 else q[:57] + "..."
        raise ValueError(
            f"the question ({where}: {short!r}) is too long: its {max(tokens)} tokens plus --max-new-tokens "
            f"{args.max_new_tokens} leave no room for a single frame in the model's context of {model.context} "
            "tokens; shorten the question or lower --max-new-tokens"
        )
    codes = model.read_video(
        args.video,
        fps=args.fps,
        num_frames=args.num_frames,
        max_frames=args.max_frames,
        reserve=room,
        progress=False if args.no_progress else None,
    )
    print(f"video: {len(codes)} frames, {len(codes) * model.frame_tokens()} tokens", file=sys.stderr)
    ctx = model.video_context(codes, room)
    sampling = sampling_from(args)
    for _, q in questions:
        if args.questions:
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
        # each answer is written as soon as it is known, so a later failure keeps the earlier ones
        print(json.dumps({"question": q, "answer": answer}) if args.questions else answer, flush=True)
    return 0
