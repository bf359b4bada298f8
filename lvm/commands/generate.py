"""Generate text, an image or a video from a text prompt (classifier-free guidance for vision)."""

from __future__ import annotations

import sys

from lvm.commands.common import add_model_arguments, add_sampling_arguments, model_from, sampling_from


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="text prompt")
    parser.add_argument("--output", help="PNG (one frame) or mp4 to write; without it, text is generated")
    parser.add_argument(
        "--frames", type=int, default=1, help="frames of video to generate (default: 1, an image)"
    )
    parser.add_argument("--fps", type=float, default=4.0, help="frame rate of a written mp4")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (0: off)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="text generation length limit")
    add_sampling_arguments(parser)


def run(args) -> int:
    model = model_from(args)
    sampling = sampling_from(args)
    if not args.output:
        text = model.generate_text(
            args.prompt, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
            on_text=lambda t: print(t, end="", file=sys.stderr, flush=True),
        )  # fmt: skip
        print(file=sys.stderr)
        print(text)
        return 0
    frames = model.generate_video(
        args.prompt, args.frames, guidance=args.guidance or None, sampling=sampling, seed=args.seed
    )
    write_frames(frames, args.output, args.fps)
    print(args.output)
    return 0


def write_frames(frames, path: str, fps: float) -> None:
    """uint8 frames [T, H, W, 3] as a PNG (one frame; several frames tiled in a row) or an mp4."""
    import numpy as np

    if path.endswith(".mp4"):
        from lvm.tokenizers.synthetic import write_video

        write_video(path, frames, fps)
        return
    from PIL import Image

    Image.fromarray(np.concatenate(list(frames), axis=1)).save(path)
