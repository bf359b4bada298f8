"""Benchmarks that print and save numbers: `lvm bench attention|tokenizer|data|convert|generate`."""

from __future__ import annotations

import importlib

# benchmark name -> module defining `add_arguments(parser)` and `run(args)`.
BENCHMARKS = {
    "attention": "lvm.bench.attention",
    "tokenizer": "lvm.bench.tokenizer",
    "data": "lvm.bench.data",
    "convert": "lvm.bench.convert",
    "generate": "lvm.bench.generate",
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(cmd)
        cmd.set_defaults(_bench=module)


def run(args):
    return args._bench.run(args)
