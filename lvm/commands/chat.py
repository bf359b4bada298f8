"""Chat about videos in the browser: a local web page over a trained model (upload or pick a video, ask)."""

from __future__ import annotations

import ipaddress
import sys

from lvm.commands.common import add_model_arguments, model_from


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s, this machine only; the page has no login)",
    )
    parser.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    parser.add_argument(
        "--video-dir",
        help="folder or gs:// prefix whose videos the page offers (paths are read only inside it)",
    )
    parser.add_argument(
        "--max-upload-mb", type=float, default=512, help="largest upload accepted (default: %(default)s MB)"
    )
    parser.add_argument(
        "--cached-videos",
        type=int,
        default=4,
        help="prefilled videos kept in memory across sessions; older ones are prefilled again when asked "
        "about (default: %(default)s)",
    )


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    if args.video_dir:
        from lvm.data_pipeline import storage

        if not storage.is_gcs(args.video_dir) and not storage.exists(args.video_dir):
            raise FileNotFoundError(f"--video-dir {args.video_dir}: no such folder")
    if not loopback(args.host):
        print(
            f"lvm chat: warning: listening on {args.host}: anyone who can reach this port can use the model "
            "(the page has no login)",
            file=sys.stderr,
        )
    from lvm.chat import Chat, serve

    model = model_from(args)
    chat = Chat(model, video_dir=args.video_dir, cached_videos=args.cached_videos, name=str(args.checkpoint))
    try:
        serve(chat, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb)
    except KeyboardInterrupt:
        pass
    return 0
