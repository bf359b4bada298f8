"""Flags and helpers shared by the commands that load a trained model (qa, generate, eval-qa, eval-needle)."""

from __future__ import annotations


def add_model_arguments(parser) -> None:
    """--checkpoint, --mesh and the tokenizer overrides (every command that loads a model)."""
    parser.add_argument("--checkpoint", required=True, help="training workdir or `lvm export` folder")
    parser.add_argument("--mesh", help="dp,fsdp,tp,sp for inference (default: sp over all devices)")
    parser.add_argument("--text-tokenizer", help="override the checkpoint's SentencePiece model")
    parser.add_argument("--vqgan", help="override the checkpoint's VQGAN workdir")


def model_from(args):
    from lvm.inference import load_model

    return load_model(args.checkpoint, text_tokenizer=args.text_tokenizer, vqgan=args.vqgan, mesh=args.mesh)


def add_frame_arguments(parser) -> None:
    """How frames are sampled from a video (default: as many as fit the context, evenly)."""
    parser.add_argument(
        "--fps", type=float, help="sample frames at this rate (default: as many as fit, evenly)"
    )
    parser.add_argument("--num-frames", type=int, help="sample exactly this many frames, evenly")
    parser.add_argument("--max-frames", type=int, help="at most this many frames")


def add_sampling_arguments(parser) -> None:
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")


def sampling_from(args):
    from lvm.generation import Sampling

    return Sampling(args.temperature, args.top_k, args.top_p)
