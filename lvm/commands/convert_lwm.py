"""Import LWM's released JAX checkpoint (params + VQGAN) as a folder `lvm qa` and `lvm generate` load.

Every input is checked before anything is written; the folder appears at --out only once the whole conversion
has succeeded (a failure leaves nothing behind, and an existing --out is kept unless --overwrite)."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument(
        "--params", required=True, help="LWM params file (tux streaming msgpack), path or gs://"
    )
    parser.add_argument("--vqgan", help="LWM VQGAN file (a pickle of its param dict), path or gs://")
    parser.add_argument("--text-tokenizer", help="SentencePiece .model (LLaMA-2's for LWM), path or gs://")
    parser.add_argument(
        "--out", required=True, help="output folder: params/, config.yaml, tokenizers.json, vqgan/"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out (its contents are removed only after the new conversion succeeded)",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="unpickle the VQGAN file without restrictions (runs its code)",
    )
    parser.add_argument("--head-dim", type=int, default=128, help="attention head size (LWM 7B: 128)")
    parser.add_argument("--theta", type=float, default=5e7, help="RoPE theta (LWM *-1M: 5e7; 128K/256K: 1e7)")
    parser.add_argument(
        "--seq-len", type=int, default=32768, help="context used by qa/generate (LWM-1M: 1048576)"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"),
        help="compute dtype of the converted model (default: float32, as LWM computes; bfloat16 is faster "
        "but flips some argmaxes, see README)",
    )  # fmt: skip
    parser.add_argument(
        "--param-dtype",
        default="auto",
        choices=("auto", "bfloat16", "float32"),
        help="stored dtype of the params (default auto: the file's, e.g. bfloat16 for LWM's release)",
    )
    parser.add_argument(
        "--rope-layout", default="interleaved", choices=("interleaved", "half"),
        help="interleaved: LWM's pairs as they are; half: permute q/k to Hugging Face's pairs at import",
    )  # fmt: skip
    parser.add_argument("--set", action="append", default=[], help="config override section.key=value")


def run(args) -> int:
    import json

    from lvm.interop.lwm import convert_lwm

    summary = convert_lwm(
        args.params, args.out, vqgan=args.vqgan, text_tokenizer=args.text_tokenizer,
        trust_pickle=args.trust_pickle, head_dim=args.head_dim, rope_theta=args.theta, seq_len=args.seq_len,
        dtype=args.dtype, param_dtype=args.param_dtype, rope_layout=args.rope_layout, overrides=args.set,
        overwrite=args.overwrite,
    )  # fmt: skip
    print(json.dumps(summary))
    return 0
