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
    import dataclasses
    from pathlib import Path

    import jax
    import yaml

    from lvm import checkpoint
    from lvm.config import MeshConfig, config_from_dict, config_to_dict
    from lvm.inference import read_tokenizers
    from lvm.sharding import make_mesh
    from lvm.trainer import TOKENIZERS_FILE, load_params

    workdir = Path(args.workdir)
    if not (workdir / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{workdir} is not a training run folder (no config.yaml); give `lvm train`'s --workdir"
        )
    cfg = config_from_dict(yaml.safe_load((workdir / "config.yaml").read_text()))
    cfg = dataclasses.replace(cfg, mesh=MeshConfig(1, -1, 1, 1))  # FSDP over this host's devices
    mesh = make_mesh(cfg.mesh.resolve(jax.device_count()))
    params = load_params(workdir, cfg, mesh)
    out = Path(args.out)
    path = checkpoint.export_params(params, out)
    tokenizers = read_tokenizers(workdir)
    for key, value in (("text_tokenizer", args.text_tokenizer), ("vqgan", args.vqgan)):
        if value:
            tokenizers[key] = str(Path(value).resolve())
    if jax.process_index() == 0:
        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        (out / TOKENIZERS_FILE).write_text(json.dumps(tokenizers, indent=1))
    print(json.dumps({"params": path, "config": str(out / "config.yaml"), **tokenizers}))
    return 0
