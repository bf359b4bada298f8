"""Generate text, an image or a video from a text prompt (classifier-free guidance for vision)."""

from __future__ import annotations

import os
import sys

from lvm.commands.common import add_model_arguments, add_sampling_arguments, model_from, sampling_from

FORMATS = (".png", ".gif", ".mp4")


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="text prompt")
    parser.add_argument(
        "--output",
        help="image or video to write: .png (one frame), .gif (animated) or .mp4; without it, text is generated",
    )
    parser.add_argument(
        "--frames", type=int, default=1, help="frames of video to generate (default: 1, an image)"
    )
    parser.add_argument("--fps", type=float, default=4.0, help="frame rate of a written .gif or .mp4")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (0: off)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="text generation length limit")
    add_sampling_arguments(parser)


def check_output(path: str, frames: int, fps: float) -> None:
    """Refuse, before any generation, an --output that cannot be written as asked."""
    if frames < 1:
        raise ValueError(f"--frames must be at least 1, got {frames}")
    if fps <= 0:
        raise ValueError(f"--fps must be positive, got {fps}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(
            f"--output {path}: write a .png (one frame), .gif or .mp4, not {ext or 'no extension'}"
        )
    if ext == ".png" and frames > 1:
        raise ValueError(
            f"--output {path}: a PNG holds one frame; for --frames {frames} write a .gif or .mp4"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--output {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--output {path}: the folder {folder} is not writable")


def run(args) -> int:
    if args.output:
        check_output(args.output, args.frames, args.fps)
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
    """uint8 frames [T, H, W, 3] as a PNG (one frame), an animated GIF or an h264 mp4."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".mp4":
        from lvm.tokenizers.synthetic import write_video

        write_video(path, frames, fps)
        return
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    if ext == ".gif" and len(images) > 1:
        duration = max(20, round(1000 / fps))  # ms per frame; browsers slow down anything under 20
        images[0].save(path, save_all=True, append_images=images[1:], duration=duration, loop=0)
    else:
        images[0].save(path)
