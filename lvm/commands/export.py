"""Export a training run's params alone (no optimizer state) for inference."""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument("--workdir", required=True, help="training run folder (its newest checkpoint)")
    parser.add_argument(
        "--out", required=True, help="output folder: params/ (Orbax), config.yaml, tokenizers.json"
    )
    parser.add_argument(
        "--text-tokenizer", help="SentencePiece model (default: the one the training data used)"
    )
    parser.add_argument("--vqgan", help="VQGAN workdir (default: the one the training data used)")


def run(args) -> int:
    from pathlib import Path

    from lvm import checkpoint
    from lvm.config import MeshConfig

    workdir = Path(args.workdir)
    if not (workdir / "checkpoints").is_dir():
        raise FileNotFoundError(
            f"{workdir} is not a training run folder (no checkpoints/); give `lvm train`'s --workdir"
        )
    cfg, _, params = checkpoint.restore_model(
        workdir, MeshConfig(1, -1, 1, 1)
    )  # FSDP over this host's devices
    tokenizers = checkpoint.read_tokenizers(workdir)
    for key, value in (("text_tokenizer", args.text_tokenizer), ("vqgan", args.vqgan)):
        if value:
            tokenizers[key] = str(Path(value).resolve())
    path = checkpoint.export(args.out, params, cfg, tokenizers)
    print(json.dumps({"params": path, "config": str(Path(args.out) / checkpoint.CONFIG_FILE), **tokenizers}))
    return 0
