"""Export a checkpoint's text model as a Hugging Face LlamaForCausalLM folder (vision parts in a side file)."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="`lvm export` / `lvm convert-lwm` folder or a training workdir"
    )
    parser.add_argument(
        "--out", required=True, help="output folder: config.json, model.safetensors, vision.safetensors"
    )


def run(args) -> int:
    import json

    from lvm.interop.hf import export_hf

    print(json.dumps(export_hf(args.checkpoint, args.out)))
    return 0
