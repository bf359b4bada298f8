"""`lvm bench attention`: its flags, and the run (matmul yardstick, every case, the reference, the report)."""

from __future__ import annotations

import argparse
import pathlib
import time
from typing import Any

from lvm.bench import common
from lvm.bench.attention import cases, measure, report, targets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    full, quick = cases.FULL, cases.QUICK
    parser.add_argument("--quick", action="store_true", help="tiny sizes (under a minute): a smoke run")
    parser.add_argument("--out", default="runs/bench/attention", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--seq-lens", type=int, nargs="+", help=f"global sequence lengths ({full['seq_lens']})"
    )
    parser.add_argument("--sp", type=int, nargs="+", help=f"ring sizes, 1 = blockwise (default {full['sp']})")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--heads", type=int, help=f"query heads (default {full['heads']}, quick {quick['heads']})"
    )
    parser.add_argument("--head-dim", type=int, help=f"default {full['head_dim']}, quick {quick['head_dim']}")
    parser.add_argument("--dtype", default="float32", help="float32 on CPU (bf16 matmuls are slow there)")
    parser.add_argument("--reps", type=int, help="timed calls per setting (after one warm-up)")
    parser.add_argument(
        "--budget", type=float, help="stop timing a setting after this many seconds (min 2 calls)"
    )
    parser.add_argument(
        "--dense-max-len",
        type=int,
        default=4096,
        help="skip dense attention above this length (it materialises S^2 scores; %(default)s)",
    )
    parser.add_argument(
        "--chunk",
        type=int,
        help="largest query/key chunk for ours and the reference (default: ours its own defaults, reference "
        "min(512, seq/sp))",
    )
    parser.add_argument(
        "--kernel",
        default="auto",
        choices=["auto", "xla", "fused"],
        help="ring attention's per-step kernel (auto: fused on TPU/GPU, xla on CPU; %(default)s)",
    )
    parser.add_argument("--matmul-size", type=int, help="n of the [n, n] x [n, n] yardstick matmul")
    parser.add_argument(
        "--devices", type=int, default=8, help="simulated CPU devices (set before jax starts)"
    )
    parser.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the public ringattention 0.1.2 in .venv-ref (scripts/setup_reference_env.sh)",
    )
    parser.add_argument(
        "--reference-python", default=str(measure.DEFAULT_REFERENCE_PYTHON), help="python of .venv-ref"
    )


def _matmul(settings: dict[str, Any]) -> dict[str, Any]:
    return common.matmul_throughput(settings["matmul_size"], settings["dtype"], reps=3)


def run(args) -> int:
    settings = cases.settings_from_args(args)
    common.configure_cpu_devices(args.devices)  # before jax is imported (measure imports it)

    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    machine = common.machine_info()
    n_dev = machine["device_count"]
    print(
        f"lvm bench attention: {machine['backend']} x{n_dev} ({machine['device_kind']}, {machine['cpu_count']} CPUs), "
        f"seq {settings['seq_lens']}, heads {settings['heads']} x {settings['head_dim']}, {settings['dtype']}",
        flush=True,
    )
    matmul_start = _matmul(settings)
    print(
        f"  matmul {matmul_start['n']}^3 {matmul_start['dtype']}: {matmul_start['flops_per_s'] / 1e9:.1f} GFLOP/s",
        flush=True,
    )

    reference: dict[str, Any] = {"run": False, "runs": []}
    python = pathlib.Path(args.reference_python)
    if not args.reference:
        reference["why_not"] = "--no-reference"
    elif not python.exists():
        reference["why_not"] = f"{python} not found: run scripts/setup_reference_env.sh to create .venv-ref"
        print(f"  reference skipped: {reference['why_not']}", flush=True)

    results: list[dict[str, Any]] = []
    all_cases = cases.cases(settings, n_dev)
    # One sequence length at a time, ours then the reference's: both see the same conditions on shared cores.
    for seq_len in settings["seq_lens"]:
        for case in (c for c in all_cases if c["seq_len"] == seq_len):
            row = dict(case)
            try:
                row.update(measure.measure_ours(case, settings))
            except Exception as err:  # keep going: one failing setting must not lose the rest
                row["error"] = f"{type(err).__name__}: {err}"
            results.append(row)
            print(report.progress_line(row), flush=True)
        if args.reference and python.exists():
            rows, info = measure.run_reference(dict(settings, seq_lens=[seq_len]), str(python), n_dev)
            reference["runs"].append(info)
            if info.get("error"):
                print(f"  reference failed: {info['error']}", flush=True)
            for row in rows:
                results.append(row)
                print(report.progress_line(row), flush=True)
    if reference["runs"]:
        reference["run"] = not any(info.get("error") for info in reference["runs"])
        reference["implementation"] = reference["runs"][0].get("implementation")

    machine["load_average_end"] = common.load_average()
    # The yardstick again at the end; the faster of the two (the one less disturbed by other load) is used.
    matmul_end = _matmul(settings)
    print(
        f"  matmul again: {matmul_end['flops_per_s'] / 1e9:.1f} GFLOP/s (the faster one is used)", flush=True
    )
    matmul = dict(max((matmul_start, matmul_end), key=lambda m: m["flops_per_s"]))
    matmul.update(start=matmul_start, end=matmul_end)
    for row in results:
        measure.derive(row, settings, matmul)
    skipped_sp = [sp for sp in settings["sp_values"] if sp > n_dev]
    payload = {
        "benchmark": "attention",
        "created": common.utc_now(),
        "args": {
            k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("command", "benchmark")
        },
        "machine": machine,
        "settings": settings,
        "matmul": matmul,
        "results": results,
        "reference": reference,
        "targets": targets.evaluate_targets(results, settings),
        "notes": report.notes(settings, skipped_sp, n_dev),
        "wall_s": time.perf_counter() - started,
    }
    text = report.write(out_dir, payload)
    print("\n" + text)
    names = ", ".join(str(out_dir / f"attention.{ext}") for ext in ("json", "png", "md"))
    print(f"\nwrote {names} ({payload['wall_s']:.0f} s)")
    return 0
