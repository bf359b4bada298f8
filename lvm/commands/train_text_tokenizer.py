"""Train a SentencePiece text tokenizer with <vision> and </vision> as single pieces."""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument("--corpus", required=True, help="plain-text file, one sentence or paragraph per line")
    parser.add_argument(
        "--vocab-size", type=int, required=True, help="number of pieces (32000 for LLaMA size)"
    )
    parser.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])


def run(args) -> int:
    from lvm.tokenizers import text

    tok = text.train(args.corpus, args.vocab_size, args.out, model_type=args.model_type)
    print(
        json.dumps(
            {
                "model": tok.model_file,
                "vocab_size": tok.vocab_size,
                "bos_id": tok.bos_id,
                "eos_id": tok.eos_id,
            }
        )
    )
    return 0
