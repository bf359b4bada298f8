"""Pre-tokenize a JSONL manifest of videos and texts into token shards on disk or gs:// (resumable)."""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    from lvm.data_pipeline.decode import default_decode_workers
    from lvm.tokenizers import format as fmt

    parser.add_argument(
        "--manifest", required=True, help="JSONL file or gs:// URI (see lvm.data_pipeline.pretokenize)"
    )
    parser.add_argument("--output", required=True, help="output folder or gs://bucket/prefix")
    parser.add_argument("--vqgan", help="VQGAN workdir from `lvm train-vqgan` (needed for videos)")
    parser.add_argument("--text-tokenizer", required=True, help="SentencePiece .model file")
    parser.add_argument(
        "--fps", type=float, default=1.0, help="frames sampled per second (default: %(default)s)"
    )
    parser.add_argument("--num-frames", type=int, help="sample N frames uniformly instead of --fps")
    parser.add_argument(
        "--max-frames", type=int, help="at most this many frames per video (spread uniformly)"
    )
    parser.add_argument(
        "--shard-size", type=int, default=256, help="manifest lines per shard (default: %(default)s)"
    )
    parser.add_argument(
        "--process-index", type=int, default=0, help="this process's index (shard k -> k %% count)"
    )
    parser.add_argument("--process-count", type=int, default=1, help="processes sharing the work")
    parser.add_argument(
        "--template", default="video_first", choices=list(fmt.TEMPLATES), help="chat template"
    )
    parser.add_argument("--video-loss", type=float, default=0.0, help="loss weight of video tokens")
    parser.add_argument(
        "--uncond-prob",
        type=float,
        default=0.0,
        help="share of text-to-video examples trained without their prompt (classifier-free guidance)",
    )
    parser.add_argument(
        "--cache-dir", help="local folder for gs:// videos being decoded (default: a temp folder)"
    )
    parser.add_argument(
        "--cache-gb", type=float, default=8.0, help="bound on that cache (default: %(default)s)"
    )
    parser.add_argument(
        "--decode-timeout", type=float, default=600.0, help="seconds before a hung decode fails"
    )
    parser.add_argument(
        "--decode-workers",
        type=int,
        help="video decoding processes (default: one per CPU but one, at most 32; here "
        f"{default_decode_workers()})",
    )
    parser.add_argument(
        "--decode-frames-in-flight",
        type=int,
        help="frames decoded ahead of the encoder at most (default: max(1024, 128 per worker); "
        "a 256x256 frame is 192 KiB)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from lvm.data_pipeline.decode import DecodeConfig
    from lvm.data_pipeline.pretokenize import PretokenizeConfig
    from lvm.data_pipeline.pretokenize import run as pretokenize

    cfg = PretokenizeConfig(
        manifest=args.manifest,
        output=args.output,
        vqgan=args.vqgan,
        text_tokenizer=args.text_tokenizer,
        decode=DecodeConfig(fps=args.fps, num_frames=args.num_frames, max_frames=args.max_frames),
        shard_size=args.shard_size,
        process_index=args.process_index,
        process_count=args.process_count,
        template=args.template,
        video_loss=args.video_loss,
        uncond_prob=args.uncond_prob,
        cache_dir=args.cache_dir,
        cache_bytes=int(args.cache_gb * (1 << 30)),
        decode_timeout_s=args.decode_timeout,
        decode_workers=args.decode_workers,
        decode_frames_in_flight=args.decode_frames_in_flight,
        progress=not args.no_progress,
    )
    print(json.dumps(pretokenize(cfg)))
    return 0
