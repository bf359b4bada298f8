"""Export a training run's params alone (no optimizer state) for inference."""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument(
        "--workdir", required=True, help="training run folder, local or gs:// (its newest checkpoint)"
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output folder, local or gs://: params/ (Orbax), config.yaml, tokenizers.json",
    )
    parser.add_argument(
        "--text-tokenizer", help="SentencePiece model (default: the one the training data used)"
    )
    parser.add_argument("--vqgan", help="VQGAN workdir (default: the one the training data used)")


def run(args) -> int:
    from lvm import checkpoint
    from lvm.config import MeshConfig
    from lvm.data_pipeline import storage

    workdir, out = checkpoint.resolve_uri(args.workdir), checkpoint.resolve_uri(args.out)
    if not checkpoint.is_folder(storage.join(workdir, "checkpoints")):
        raise FileNotFoundError(
            f"{workdir} is not a training run folder (no checkpoints/); give `lvm train`'s --workdir"
        )
    cfg, _, params = checkpoint.restore_model(
        workdir, MeshConfig(1, -1, 1, 1)
    )  # FSDP over this host's devices
    tokenizers = checkpoint.read_tokenizers(workdir)
    for key, value in (("text_tokenizer", args.text_tokenizer), ("vqgan", args.vqgan)):
        if value:
            tokenizers[key] = checkpoint.resolve_uri(value)
    path = checkpoint.export(out, params, cfg, tokenizers)
    print(json.dumps({"params": path, "config": storage.join(out, checkpoint.CONFIG_FILE), **tokenizers}))
    return 0
