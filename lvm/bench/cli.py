"""Benchmarks that print and save numbers: `lvm bench attention|tokenizer|data|convert|generate`."""

from __future__ import annotations

# benchmark name -> module defining `add_arguments(parser)` and `run(args)`.
BENCHMARKS = {
    "attention": "lvm.bench.attention",
    "tokenizer": "lvm.bench.tokenizer",
    "data": "lvm.bench.data",
    "convert": "lvm.bench.convert",
    "generate": "lvm.bench.generate",
}


def add_arguments(parser) -> None:
    from lvm.cli import add_subcommands

    add_subcommands(parser, "benchmark", BENCHMARKS, "_bench")


def run(args):
    return args._bench.run(args)
