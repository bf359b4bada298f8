"""Plan a training step's per-device memory by compiling it from abstract shapes (TPU AOT, or simulated CPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from lvm import cpu_devices

CHILD_ENV = "LVM_PLAN_CHILD"  # set in a re-executed child so it never re-executes again


def add_arguments(parser) -> None:
    parser.add_argument(
        "--config", required=True, help="curriculum name/path (with --stage) or a config file"
    )
    parser.add_argument("--stage", help="the curriculum stage to plan (optional for one-stage curricula)")
    parser.add_argument("--devices", type=int, required=True, help="chips (TPU) or simulated devices (CPU)")
    parser.add_argument("--chip-memory", type=float, help="GiB per chip (default: the chip's HBM)")
    parser.add_argument("--topology", help="TPU topology, e.g. v4:4x8x8 (default: the usual --chip slice)")
    parser.add_argument("--chip", default="v4", help="TPU generation: v4, v5e or v5p (default: %(default)s)")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "tpu", "cpu"],
        help="auto: TPU AOT if libtpu works, else CPU",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument(
        "--no-suggest", action="store_true", help="do not re-plan variants when it does not fit"
    )
    parser.add_argument("--out", help="also write the JSON report to this file")


def run(args) -> int:
    simulated = args.devices * (1 if args.no_suggest else 2)  # the "devices x2" suggestion compiles too
    if _cpu_devices_short(args):  # jax fixed its CPU device count at import: rerun with enough of them
        env = {**cpu_devices.cpu_env(simulated), CHILD_ENV: "1"}
        return subprocess.run([sys.executable, "-m", "lvm.cli", "plan", *_argv(args)], env=env).returncode
    cpu_devices.simulate(simulated, cpu_only=True)  # libtpu is only used for ahead-of-time compiles

    from lvm.curriculum import resolve_config
    from lvm.planner import plan

    cfg, stage = resolve_config([args.config], args.stage, args.set)
    report = plan(
        cfg,
        args.devices,
        chip_memory_gib=args.chip_memory,
        topology=args.topology,
        chip=args.chip,
        backend=args.backend,
        stage=stage,
        suggest=not args.no_suggest,
    )
    report["config"] = args.config
    print(summary(report), file=sys.stderr)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


def summary(r: dict) -> str:
    """A few human-readable lines of a plan report."""
    g = r["gib_per_device"]
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [
        f"plan {r['stage'] or r.get('config', '')}: {r['params'] / 1e9:.2f}B params, mesh {mesh}, {r['devices']} devices, "
        f"{r['backend']} ({r['device_kind']}), compile {r['compile_s']} s",
        "GiB/device: "
        + "  ".join(f"{k} {g[k]}" for k in ("params", "opt_state", "batch", "temporaries", "peak")),
        r["verdict"],
    ]
    if "attention" in r:
        lines.append(attention_line(r["attention"]))
    for key in ("warning", "note"):
        if key in r:
            lines.append(f"{key}: {r[key]}")
    for s in r.get("suggestions", []):
        result = f"peak {s['peak_gib']} GiB on mesh {s['mesh']}: {'fits' if s['fits'] else 'does not fit'}"
        if s["peak_gib"] >= g["peak"]:
            result += " (no lower than now)"
        lines.append(f"  try {s['change']:<40} {result}")
    if "suggestions" in r and not r["suggestions"]:
        lines.append("no suggestion: no variant can be planned here (the JSON's not_offered says why)")
    return "\n".join(lines)


def attention_line(a: dict) -> str:
    """The attention kernel, its tiles and (TPU) the Mosaic kernels found in the compiled step, on one line."""
    kernel = a["kernel"] + (" (interpret mode)" if a.get("interpret") else "")
    line = (
        f"attention: {kernel} kernel on {a['platform']} ({a['requested']} requested), {a['layout']} runs of "
        f"{a['layout_run']}, tiles q x kv forward {a['q_tile']}x{a['kv_tile']}, "
        f"backward {a['backward_q_tile']}x{a['backward_kv_tile']}"
    )
    if "compiled_mosaic_kernels" in a:
        found = a["compiled_mosaic_kernels"]
        line += "; Mosaic kernels in the program: " + (
            ", ".join(f"{k} x{n}" for k, n in found.items()) if found else "none"
        )
    return line


def _cpu_devices_short(args) -> bool:
    """True when the CPU path needs more simulated devices than an already-imported jax has."""
    if "jax" not in sys.modules or os.environ.get(CHILD_ENV):
        return False
    if args.backend == "tpu" or (args.backend == "auto" and importlib.util.find_spec("libtpu") is not None):
        return False
    import jax

    return len(jax.devices("cpu")) < args.devices


def _argv(args) -> list[str]:
    """The command line of `args` (for the re-executed child)."""
    out = [
        "--config",
        args.config,
        "--devices",
        str(args.devices),
        "--chip",
        args.chip,
        "--backend",
        args.backend,
    ]
    for flag, value in (
        ("--stage", args.stage),
        ("--chip-memory", args.chip_memory),
        ("--topology", args.topology),
    ):
        if value is not None:
            out += [flag, str(value)]
    for o in args.set:
        out += ["--set", o]
    return out + (["--no-suggest"] if args.no_suggest else []) + (["--out", args.out] if args.out else [])
