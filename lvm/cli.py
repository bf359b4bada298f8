"""The `lvm` console script: one thin subcommand per job, each a module with `add_arguments` and `run`."""

from __future__ import annotations

import argparse
import importlib
import sys

from lvm.data_pipeline.storage import StorageError

# command name -> module defining `add_arguments(parser)` and `run(args) -> int | None`.
COMMANDS = {
    "bench": "lvm.bench.cli",
    "train-text-tokenizer": "lvm.commands.train_text_tokenizer",
    "train-vqgan": "lvm.commands.train_vqgan",
    "eval-vqgan": "lvm.commands.eval_vqgan",
    "pretokenize": "lvm.commands.pretokenize",
    "plan": "lvm.commands.plan",
    "train": "lvm.commands.train",
    "curriculum": "lvm.commands.curriculum",
    "export": "lvm.commands.export",
    "qa": "lvm.commands.qa",
    "generate": "lvm.commands.generate",
    "convert-lwm": "lvm.commands.convert_lwm",
    "export-hf": "lvm.commands.export_hf",
    "demo": "lvm.commands.demo",
    "eval-qa": "lvm.commands.eval_qa",
    "eval-needle": "lvm.commands.eval_needle",
    "chat": "lvm.commands.chat",
}


def add_subcommands(parser: argparse.ArgumentParser, dest: str, modules: dict[str, str], attr: str) -> None:
    """One subparser per `name -> module` (help: the module docstring's first line); the chosen module is set
    as `args.<attr>`."""
    sub = parser.add_subparsers(dest=dest, required=True)
    for name, module_name in modules.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(cmd)
        cmd.set_defaults(**{attr: module})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lvm", description="Long-context video-language models in JAX.")
    add_subcommands(parser, "command", COMMANDS, "_module")
    return parser


def run_command(name: str, argv: list[str]):
    """Run one subcommand from Python, importing only its module (tests and scripts use this)."""
    module = importlib.import_module(COMMANDS[name])
    parser = argparse.ArgumentParser(prog=f"lvm {name}")
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except (ValueError, FileNotFoundError, StorageError) as err:  # bad input, failed gs://: one line
        print(f"lvm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
