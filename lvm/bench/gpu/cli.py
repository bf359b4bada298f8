"""`python -m lvm.bench.gpu` (what scripts/gpu_check.sh runs): flags, then each section under its budget."""

from __future__ import annotations

import argparse
import pathlib
import signal
import traceback

import jax

import lvm.bench.gpu as package
from lvm.bench.gpu.attention import run_attention
from lvm.bench.gpu.budget import Budget
from lvm.bench.gpu.matmul import run_matmul
from lvm.bench.gpu.max_context import run_max_context
from lvm.bench.gpu.measure import card_slug, error_text
from lvm.bench.gpu.report import render_markdown
from lvm.bench.gpu.run import Run
from lvm.bench.gpu.settings import SECTIONS, settings_from_args
from lvm.bench.gpu.train import run_train
from lvm.bench.gpu.vqgan_encode import run_vqgan_encode

REPO = pathlib.Path(__file__).resolve().parents[3]
SECTION_FUNCS = {
    "matmul": run_matmul,
    "attention": run_attention,
    "train": run_train,
    "vqgan_encode": run_vqgan_encode,
    "max_context": run_max_context,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, every code path (CPU tests)")
    parser.add_argument("--out", help="output folder (default: docs/bench/<card>/)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="SECTION=SECONDS",
        help="override one section's time budget (repeatable), e.g. max_context=500",
    )
    parser.add_argument("--deadline", type=float, help="seconds for the whole run, from process start")
    parser.add_argument(
        "--memory-limit-bytes", type=int, help="device memory to fit (default: the allocator's)"
    )


def run(args) -> int:
    settings = settings_from_args(args)
    kind = jax.devices()[0].device_kind
    out_dir = pathlib.Path(args.out) if args.out else REPO / "docs" / "bench" / card_slug(kind)
    out_dir.mkdir(parents=True, exist_ok=True)
    bench = Run(settings, out_dir, args.smoke, args.memory_limit_bytes)
    print(
        f"gpu check: {kind} ({bench.backend}), jax {jax.__version__}, writing {out_dir}"
        f"{' (smoke)' if args.smoke else ''}",
        flush=True,
    )
    budget = Budget(settings.budgets, settings.deadline_s)
    signal.signal(signal.SIGTERM, _on_sigterm)
    for name in SECTIONS:
        if name not in args.sections:
            continue
        section = budget.open(name)
        print(f"[{name}] budget {section.budget_s:.0f} s", flush=True)
        try:
            SECTION_FUNCS[name](bench, section)
        except Exception as err:  # a broken section must not lose the others
            section.error = error_text(err)
            traceback.print_exc()
        finally:
            budget.close(section)
            bench.payload["sections"][name] = section.record()
            bench.save()
    print("\n" + render_markdown(bench.payload))
    print(f"wrote {out_dir / 'gpu_check.json'} and {out_dir / 'gpu_check.md'}")
    return 0


def _on_sigterm(signum, frame):
    """The script's timeout sends SIGTERM: end through SystemExit so the last report written stands."""
    raise SystemExit(f"stopped by signal {signum} (time limit): the report holds what was measured so far")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lvm.bench.gpu", description=package.__doc__.splitlines()[0]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
