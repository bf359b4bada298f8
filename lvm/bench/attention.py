"""Attention benchmark: dense vs blockwise vs ring attention (and the public reference), time, memory, FLOP/s.

For each sequence length it jit-compiles forward+backward (`jax.grad` of `sum(attention(q, k, v) * w)` with
respect to q, k and v) of

  * dense attention on one device (materialises the score matrix),
  * blockwise attention on one device (`sharded_attention` over a 1-device mesh, sp=1),
  * ring attention over sp = 2, 4, 8: causal with the zigzag (balanced) layout, causal with the contiguous
    (unbalanced) layout, and non-causal,
  * the public reference ring attention (PyPI ringattention 0.1.2, subprocess in `.venv-ref`) at the same
    settings (sp = 1, 2, 4, 8; causal and not; contiguous blocks, the only layout it has),

and records XLA's compiled per-device memory (temp + argument bytes) and wall time, and model FLOP/s as a
fraction of a plain matmul's FLOP/s measured in the same run. Writes OUT/attention.json, OUT/attention.png and
OUT/attention.md, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import time
from typing import Any

from lvm.bench import common

FULL = dict(
    seq_lens=(1024, 2048, 4096, 8192),
    sp=(1, 2, 4, 8),
    heads=4,
    head_dim=64,
    reps=3,
    budget=6.0,
    matmul_size=4096,
)
# --quick is a smoke run (under a minute, dominated by compiles): two lengths, sp 1 and 8 only.
QUICK = dict(seq_lens=(256, 512), sp=(1, 8), heads=2, head_dim=32, reps=2, budget=0.5, matmul_size=1024)
REPO = pathlib.Path(__file__).resolve().parents[2]
REFERENCE_SCRIPT = REPO / "scripts" / "reference_ring_attention.py"
DEFAULT_REFERENCE_PYTHON = REPO / ".venv-ref" / "bin" / "python"

# Plot/table order and labels of the settings.
SERIES = (
    ("dense", "dense (1 device)"),
    ("blockwise", "blockwise (sp=1)"),
    ("ring-zigzag", "ring zigzag"),
    ("ring-contiguous", "ring contiguous"),
    ("ring", "ring"),
    ("reference", "reference"),
)

NOTES = [
    "Time: forward+backward wall time (jax.grad of sum(attention(q, k, v) * w) w.r.t. q, k, v), minimum over "
    "the timed calls after one warm-up call (interference on shared cores only adds time); the median is "
    "recorded too, and so is the process CPU time of each call (all threads; 'CPU time' in the table), which "
    "other work on the machine disturbs far less than wall time.",
    "Memory: XLA's compiled memory analysis of that program for ONE device (an SPMD program describes one "
    "device): per_device_bytes = temp + argument bytes; output, alias and peak bytes are recorded as well.",
    "Model FLOPs: forward 4*S^2*D*H per batch element, half when causal; backward counted as 2x forward, so "
    "fwd+bwd = 3x forward. Kernels that skip masked tiles still compute the diagonal tiles in full and the "
    "backward recomputes the scores, so hardware FLOPs exceed model FLOPs.",
    "Matmul fraction: attention model FLOP/s over the FLOP/s of one plain [n, n] x [n, n] matmul of the same "
    "dtype on one device, measured at the start and at the end of the run (the faster is used). 'per CPU-s' "
    "divides FLOPs by process CPU seconds (all threads) on both sides instead: robust to other load, and it "
    "neither rewards nor punishes using more cores.",
    "Sequence parallelism on a CPU host: the sp 'devices' are simulated (XLA_FLAGS "
    "--xla_force_host_platform_device_count) and all share the same cpu_count cores, so a ring over sp devices "
    "reports the TOTAL time of all devices' work, not one device's time on a real cluster, and per-device "
    "memory is what one device of a real ring would need. Timings on time-shared cores cannot show load "
    "balance; the balanced-layout test counts computed tiles instead.",
    "Layouts: causal ring runs use zigzag (balanced) or contiguous (unbalanced) token layouts; non-causal rings "
    "use contiguous (no imbalance to fix). The reference only has contiguous blocks.",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny sizes (under a minute): a smoke run")
    parser.add_argument("--out", default="runs/bench/attention", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--seq-lens", type=int, nargs="+", help=f"global sequence lengths ({FULL['seq_lens']})"
    )
    parser.add_argument("--sp", type=int, nargs="+", help=f"ring sizes, 1 = blockwise (default {FULL['sp']})")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--heads", type=int, help=f"query heads (default {FULL['heads']}, quick {QUICK['heads']})"
    )
    parser.add_argument("--head-dim", type=int, help=f"default {FULL['head_dim']}, quick {QUICK['head_dim']}")
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
        "--reference-python", default=str(DEFAULT_REFERENCE_PYTHON), help="python of .venv-ref"
    )


def settings_from_args(args) -> dict[str, Any]:
    base = QUICK if args.quick else FULL
    pick = lambda name: base[name] if getattr(args, name) is None else getattr(args, name)
    return {
        "quick": bool(args.quick),
        "seq_lens": sorted(pick("seq_lens")),
        "sp_values": sorted(set(pick("sp"))),
        "batch": args.batch,
        "heads": pick("heads"),
        "kv_heads": pick("heads"),
        "head_dim": pick("head_dim"),
        "dtype": args.dtype,
        "reps": pick("reps"),
        "budget_s": pick("budget"),
        "matmul_size": pick("matmul_size"),
        "dense_max_len": args.dense_max_len,
        "chunk": args.chunk,
        "kernel": args.kernel,
    }


def cases(settings: dict[str, Any], n_devices: int) -> list[dict[str, Any]]:
    """The project's settings for every sequence length, in run order."""
    out = []
    for s in settings["seq_lens"]:
        for causal in (True, False):
            if s <= settings["dense_max_len"]:
                out.append(dict(series="dense", impl="dense", seq_len=s, sp=1, causal=causal, layout=None))
        for sp in settings["sp_values"]:
            if sp > n_devices:
                continue
            if sp == 1:
                for causal in (True, False):
                    out.append(
                        dict(series="blockwise", impl="blockwise", seq_len=s, sp=1, causal=causal, layout="-")
                    )
                continue
            out.append(
                dict(series="ring-zigzag", impl="ring", seq_len=s, sp=sp, causal=True, layout="zigzag")
            )
            out.append(
                dict(
                    series="ring-contiguous", impl="ring", seq_len=s, sp=sp, causal=True, layout="contiguous"
                )
            )
            out.append(dict(series="ring", impl="ring", seq_len=s, sp=sp, causal=False, layout="contiguous"))
    return out


def model_flops(seq_len: int, heads: int, head_dim: int, batch: int, causal: bool) -> float:
    """Model FLOPs of attention forward+backward: 3 x (4 S^2 D H), halved when causal."""
    forward = 4.0 * seq_len**2 * head_dim * heads * batch
    return 3.0 * forward * (0.5 if causal else 1.0)


def _measure_ours(case, settings, jax, jnp, common_mod):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from lvm.attention import dense_attention, sharded_attention
    from lvm.attention.layout import run_length
    from lvm.attention.ring import choose_kernel, default_chunk, mesh_platform

    s, sp, causal = case["seq_len"], case["sp"], case["causal"]
    dtype = jnp.dtype(settings["dtype"])
    shape = (settings["batch"], s, settings["heads"], settings["head_dim"])
    keys = jax.random.split(jax.random.key(0), 4)
    if case["impl"] == "dense":

        def attention(q, k, v):
            return dense_attention(q, k, v, causal=causal)

        place = lambda x: x
    else:
        layout = "contiguous" if case["layout"] == "-" else case["layout"]
        mesh = jax.make_mesh(
            (sp,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:sp]
        )
        chunk = None
        if settings["chunk"]:
            chunk = default_chunk(run_length(layout, s // sp, sp), settings["chunk"])
        kernel = settings.get("kernel", "auto")
        target, tiles, _ = choose_kernel(
            kernel, mesh_platform(mesh), s // sp, sp, layout, shape[3], chunk, chunk
        )
        case["kernel"] = "xla" if target is None else "fused"
        case["q_chunk"], case["kv_chunk"] = tiles

        def attention(q, k, v):
            return sharded_attention(
                q,
                k,
                v,
                mesh,
                causal=causal,
                layout=layout,
                q_chunk=chunk,
                kv_chunk=chunk,
                kernel=kernel,
            )

        sharding = NamedSharding(mesh, P(None, "sp", None, None))
        place = lambda x: jax.device_put(x, sharding)

    def loss(q, k, v, w):
        return jnp.sum(attention(q, k, v).astype(jnp.float32) * w)

    q, k, v = (place(jax.random.normal(kk, shape, dtype)) for kk in keys[:3])
    w = place(jax.random.normal(keys[3], shape, jnp.float32))
    grad = jax.grad(loss, argnums=(0, 1, 2))
    return common_mod.compile_and_measure(
        grad, (q, k, v, w), reps=settings["reps"], budget_s=settings["budget_s"]
    )


def run_reference(settings, python: str, n_devices: int, timeout_s: float = 3600) -> tuple[list[dict], dict]:
    """Run scripts/reference_ring_attention.py in the reference env; returns (rows, info)."""
    sp_values = [sp for sp in settings["sp_values"] if sp <= n_devices]
    cmd = [
        python,
        str(REFERENCE_SCRIPT),
        "--seq-lens",
        *map(str, settings["seq_lens"]),
        "--sp",
        *map(str, sp_values),
        "--batch",
        str(settings["batch"]),
        "--heads",
        str(settings["heads"]),
        "--head-dim",
        str(settings["head_dim"]),
        "--dtype",
        settings["dtype"],
        "--reps",
        str(settings["reps"]),
        "--budget",
        str(settings["budget_s"]),
        "--max-chunk",
        str(settings["chunk"] or 512),
    ]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the script sets its own device count
    env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu") or "cpu"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return [], {"error": f"reference run timed out after {timeout_s:.0f} s", "command": cmd}
    info: dict[str, Any] = {"command": cmd, "wall_s": time.perf_counter() - t0, "returncode": proc.returncode}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        info["error"] = f"reference run failed (exit {proc.returncode}): {proc.stderr[-2000:]}"
        return [], info
    payload = json.loads(lines[-1])
    info["implementation"] = payload.get("implementation")
    info["machine"] = payload.get("machine")
    rows = payload.get("results", [])
    for row in rows:
        row["series"] = "reference"
    return rows, info


def _derive(row, settings, matmul):
    flops = model_flops(
        row["seq_len"], settings["heads"], settings["head_dim"], settings["batch"], row["causal"]
    )
    row["model_flops"] = flops
    if row.get("time_s"):
        row["flops_per_s"] = flops / row["time_s"]
        row["matmul_fraction"] = row["flops_per_s"] / matmul["flops_per_s"]
    if row.get("cpu_s") and matmul.get("flops_per_cpu_s"):
        row["flops_per_cpu_s"] = flops / row["cpu_s"]
        row["matmul_fraction_cpu"] = row["flops_per_cpu_s"] / matmul["flops_per_cpu_s"]


def _find(results, **match):
    for row in results:
        if all(row.get(k) == v for k, v in match.items()) and row.get("time_s"):
            return row
    return None


def _ours(results, seq_len, sp, causal):
    """The project's default setting at (seq_len, sp, causal): blockwise at sp=1, zigzag when causal."""
    if sp == 1:
        return _find(results, series="blockwise", seq_len=seq_len, causal=causal)
    return _find(results, series="ring-zigzag" if causal else "ring", seq_len=seq_len, sp=sp, causal=causal)


def evaluate_targets(results, settings) -> dict[str, Any]:
    """The issue's targets, each with the numbers behind it and whether it is met (never assumed)."""
    seq_lens = settings["seq_lens"]
    largest = max(seq_lens)
    max_sp = max(sp for sp in settings["sp_values"] if _find(results, series="ring-zigzag", sp=sp) or sp == 1)
    targets: dict[str, Any] = {}

    # 1. causal costs about half of non-causal (time ratio <= 0.6)
    ratios = []
    for s in seq_lens:
        for sp in sorted({1, max_sp}):
            c, n = _ours(results, s, sp, True), _ours(results, s, sp, False)
            if c and n:
                ratios.append({"seq_len": s, "sp": sp, "causal_over_noncausal": c["time_s"] / n["time_s"]})
    at_largest = [r for r in ratios if r["seq_len"] == largest]
    targets["causal_about_half"] = {
        "rule": "time(causal) / time(non-causal) <= 0.6 for blockwise (sp=1) and the largest ring, at the "
        "largest sequence length (smaller lengths are dominated by fixed overheads)",
        "ratios": ratios,
        "met": all(r["causal_over_noncausal"] <= 0.6 for r in at_largest) if at_largest else None,
    }

    # 2. ring on the largest sp costs no more than blockwise on one device at the same global length
    ring_ratios = []
    for s in seq_lens:
        for causal in (True, False):
            b, r = _ours(results, s, 1, causal), _ours(results, s, max_sp, causal)
            if b and r and max_sp > 1:
                ring_ratios.append(
                    {
                        "seq_len": s,
                        "sp": max_sp,
                        "causal": causal,
                        "ring_over_blockwise": r["time_s"] / b["time_s"],
                    }
                )
    at_largest = [r for r in ring_ratios if r["seq_len"] == largest]
    targets["ring_no_slower_than_blockwise"] = {
        "rule": f"time(ring, sp={max_sp}, zigzag when causal) / time(blockwise, sp=1) <= 1.0 at the largest "
        "sequence length; on simulated CPU devices the ring's time is the total over all its devices",
        "ratios": ring_ratios,
        "met": all(r["ring_over_blockwise"] <= 1.0 for r in at_largest) if at_largest else None,
    }

    # 3. faster than the reference and less memory per device, at equal settings
    pairs = []
    for ref in results:
        if ref.get("series") != "reference" or not ref.get("time_s"):
            continue
        ours = _ours(results, ref["seq_len"], ref["sp"], ref["causal"])
        if not ours:
            continue
        pairs.append(
            {
                "seq_len": ref["seq_len"],
                "sp": ref["sp"],
                "causal": ref["causal"],
                "speedup": ref["time_s"] / ours["time_s"],
                "memory_ratio": ours["memory"]["per_device_bytes"] / ref["memory"]["per_device_bytes"],
            }
        )
    at_largest = [p for p in pairs if p["seq_len"] == largest]
    targets["faster_and_leaner_than_reference"] = {
        "rule": "speedup = time(reference) / time(ours) > 1 and memory_ratio = per-device bytes (temp + args) "
        "ours / reference < 1, for every (sp, causal) at the largest sequence length; ours is blockwise at sp=1, "
        "zigzag ring when causal",
        "pairs": pairs,
        "met_all_lengths": bool(pairs) and all(p["speedup"] > 1 and p["memory_ratio"] < 1 for p in pairs),
        "met": bool(at_largest) and all(p["speedup"] > 1 and p["memory_ratio"] < 1 for p in at_largest),
    }
    if not pairs:
        targets["faster_and_leaner_than_reference"]["met"] = None
        targets["faster_and_leaner_than_reference"]["why_unknown"] = "reference not run"

    # 4. attention reaches >= 60% of the matmul's FLOP/s
    fractions = [
        {
            "series": r["series"],
            "sp": r["sp"],
            "causal": r["causal"],
            "matmul_fraction": r["matmul_fraction"],
            "matmul_fraction_cpu": r.get("matmul_fraction_cpu"),
        }
        for r in results
        if r.get("seq_len") == largest
        and r.get("series") in ("blockwise", "ring", "ring-zigzag")
        and r.get("matmul_fraction") is not None
    ]
    best = max(fractions, key=lambda f: f["matmul_fraction"], default=None)
    best_cpu = max(
        (f for f in fractions if f["matmul_fraction_cpu"] is not None),
        key=lambda f: f["matmul_fraction_cpu"],
        default=None,
    )
    targets["attention_60pct_of_matmul"] = {
        "rule": "best model-FLOP/s fraction of the matmul's FLOP/s among the project's blockwise/ring settings "
        "at the largest sequence length >= 0.6",
        "best": best,
        "fractions": fractions,
        "met": best["matmul_fraction"] >= 0.6 if best else None,
        "best_per_cpu_second": best_cpu,
        "per_cpu_second_rule": "the same with FLOPs per second of process CPU time on both sides (robust to "
        "other load; neither rewards nor punishes using more cores)",
    }
    return targets


def results_table(results) -> str:
    order = {name: i for i, (name, _) in enumerate(SERIES)}
    rows = sorted(
        (r for r in results),
        key=lambda r: (
            r["seq_len"],
            not r["causal"],
            order.get(r.get("series"), 99),
            r["sp"],
            str(r.get("layout")),
        ),
    )
    body = []
    for r in rows:
        mem = r.get("memory") or {}
        chunk = f"{r['q_chunk']}" if r.get("q_chunk") else "-"
        body.append(
            [
                r["seq_len"],
                dict(SERIES).get(r.get("series"), r.get("series")),
                r["sp"],
                "causal" if r["causal"] else "full",
                r.get("layout") or "-",
                chunk,
                common.fmt_seconds(r.get("time_s"))
                if r.get("time_s")
                else f"error: {r.get('error', '?')[:60]}",
                common.fmt_seconds(r.get("cpu_s")),
                f"{r['flops_per_s'] / 1e9:.1f}" if r.get("flops_per_s") else "-",
                f"{100 * r['matmul_fraction']:.0f}%" if r.get("matmul_fraction") else "-",
                f"{100 * r['matmul_fraction_cpu']:.0f}%" if r.get("matmul_fraction_cpu") else "-",
                common.fmt_bytes(mem.get("temp_bytes")),
                common.fmt_bytes(mem.get("per_device_bytes")),
            ]
        )
    headers = [
        "seq",
        "implementation",
        "sp",
        "mask",
        "layout",
        "chunk",
        "fwd+bwd",
        "CPU time",
        "GFLOP/s",
        "of matmul",
        "per CPU-s",
        "temp/dev",
        "temp+args/dev",
    ]
    return common.markdown_table(headers, body)


def _mask(r) -> str:
    return "causal" if r["causal"] else "full"


def _describe_matmul(t) -> str:
    best, cpu = t["best"], t.get("best_per_cpu_second")
    text = (
        f"best {100 * best['matmul_fraction']:.0f}% ({best['series']}, sp={best['sp']}, {_mask(best)})"
        if best
        else "-"
    )
    if cpu:
        text += f"; per CPU-second: best {100 * cpu['matmul_fraction_cpu']:.0f}% ({cpu['series']}, sp={cpu['sp']})"
    return text


# target key -> (row title, how its measurements read)
TARGET_ROWS = {
    "causal_about_half": (
        "causal ~ half of non-causal",
        lambda t: ", ".join(f"sp={r['sp']}: {r['causal_over_noncausal']:.2f}" for r in _largest(t["ratios"])),
    ),
    "ring_no_slower_than_blockwise": (
        "ring (max sp) <= blockwise (sp=1)",
        lambda t: ", ".join(f"{_mask(r)}: {r['ring_over_blockwise']:.2f}x" for r in _largest(t["ratios"])),
    ),
    "faster_and_leaner_than_reference": (
        "faster than reference, less memory/device",
        lambda t: (
            "; ".join(
                f"sp={p['sp']} {_mask(p)}: {p['speedup']:.2f}x faster, {p['memory_ratio']:.2f}x memory"
                for p in _largest(t["pairs"])
            )
            or t.get("why_unknown", "-")
        ),
    ),
    "attention_60pct_of_matmul": ("attention >= 60% of matmul FLOP/s", _describe_matmul),
}


def targets_table(targets) -> str:
    rows = [
        [title, describe(targets[key]), _yes(targets[key]["met"])]
        for key, (title, describe) in TARGET_ROWS.items()
    ]
    return common.markdown_table(["target (largest sequence length)", "measured", "met"], rows)


def _load(values) -> str:
    return "/".join(f"{v:.1f}" for v in values) if values else "?"


def _largest(items):
    if not items:
        return []
    s = max(i["seq_len"] for i in items)
    return [i for i in items if i["seq_len"] == s]


def _yes(flag) -> str:
    return "n/a" if flag is None else ("yes" if flag else "NO")


def plot(results, settings, matmul, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5), constrained_layout=True)
    styles = {"dense": "k", "blockwise": "C0", "ring-zigzag": "C1", "ring-contiguous": "C2", "ring": "C1"}
    markers = {1: "o", 2: "s", 4: "^", 8: "D"}
    for row_i, causal in enumerate((True, False)):
        lines: dict[tuple, list] = {}
        for r in results:
            if r["causal"] != causal or not r.get("time_s"):
                continue
            lines.setdefault((r["series"], r["sp"]), []).append(r)
        for (series, sp), rows in sorted(lines.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            rows.sort(key=lambda r: r["seq_len"])
            x = [r["seq_len"] for r in rows]
            label = dict(SERIES).get(series, series) + (
                "" if series in ("dense", "blockwise") else f" sp={sp}"
            )
            color = "C3" if series == "reference" else styles.get(series, "C4")
            ls = "--" if series == "reference" else (":" if series == "ring-contiguous" else "-")
            kw = dict(color=color, linestyle=ls, marker=markers.get(sp, "x"), label=label, alpha=0.9)
            axes[row_i, 0].plot(x, [r["time_s"] for r in rows], **kw)
            axes[row_i, 1].plot(x, [r["memory"]["per_device_bytes"] / 2**20 for r in rows], **kw)
            axes[row_i, 2].plot(x, [100 * r["matmul_fraction"] for r in rows], **kw)
        mask = "causal" if causal else "non-causal"
        axes[row_i, 0].set(
            title=f"{mask}: forward+backward time", ylabel="seconds", xscale="log", yscale="log"
        )
        axes[row_i, 1].set(
            title=f"{mask}: per-device memory (temp + args)", ylabel="MiB", xscale="log", yscale="log"
        )
        axes[row_i, 2].set(
            title=f"{mask}: model FLOP/s as % of matmul", ylabel="% of matmul FLOP/s", xscale="log"
        )
        axes[row_i, 2].axhline(60, color="gray", linestyle=":", linewidth=1)
        for ax in axes[row_i]:
            ax.set_xlabel("global sequence length")
            ax.set_xticks(settings["seq_lens"], [str(s) for s in settings["seq_lens"]])
            ax.minorticks_off()
            ax.grid(True, alpha=0.3)
        axes[row_i, 2].legend(fontsize=7, ncol=2, loc="best")
    fig.suptitle(
        f"Attention fwd+bwd, batch {settings['batch']}, {settings['heads']} heads x {settings['head_dim']}, "
        f"{settings['dtype']}; matmul {matmul['n']}^3: {matmul['flops_per_s'] / 1e9:.0f} GFLOP/s; "
        "sp>1 on simulated CPU devices sharing the same cores (time = total over devices)",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _progress(row) -> None:
    what = (
        f"{row['series']:<16} S={row['seq_len']:<6} sp={row['sp']} {'causal' if row['causal'] else 'full  '}"
    )
    print(
        f"  {what} " + (common.fmt_seconds(row["time_s"]) if row.get("time_s") else row["error"]), flush=True
    )


def run(args) -> int:
    settings = settings_from_args(args)
    for s in settings["seq_lens"]:
        for sp in settings["sp_values"]:
            if s % (2 * sp):
                raise ValueError(f"sequence length {s} must be divisible by 2*sp = {2 * sp} (zigzag layout)")
    common.configure_cpu_devices(args.devices)  # before jax is imported

    import jax
    import jax.numpy as jnp

    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    machine = common.machine_info()
    n_dev = machine["device_count"]
    skipped_sp = [sp for sp in settings["sp_values"] if sp > n_dev]
    print(
        f"lvm bench attention: {machine['backend']} x{n_dev} ({machine['device_kind']}, {machine['cpu_count']} CPUs), "
        f"seq {settings['seq_lens']}, heads {settings['heads']} x {settings['head_dim']}, {settings['dtype']}",
        flush=True,
    )
    matmul_start = common.matmul_throughput(settings["matmul_size"], settings["dtype"], reps=3)
    matmul = matmul_start
    print(
        f"  matmul {matmul['n']}^3 {matmul['dtype']}: {matmul['flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True
    )

    reference: dict[str, Any] = {"run": False, "runs": []}
    python = pathlib.Path(args.reference_python)
    if not args.reference:
        reference["why_not"] = "--no-reference"
    elif not python.exists():
        reference["why_not"] = f"{python} not found: run scripts/setup_reference_env.sh to create .venv-ref"
        print(f"  reference skipped: {reference['why_not']}", flush=True)

    results: list[dict[str, Any]] = []
    all_cases = cases(settings, n_dev)
    # One sequence length at a time, ours then the reference's, so both see the same conditions on shared cores.
    for seq_len in settings["seq_lens"]:
        for case in (c for c in all_cases if c["seq_len"] == seq_len):
            row = dict(case)
            try:
                row.update(_measure_ours(row, settings, jax, jnp, common))
            except Exception as err:  # keep going: one failing setting must not lose the rest
                row["error"] = f"{type(err).__name__}: {err}"
            results.append(row)
            _progress(row)
        if args.reference and python.exists():
            rows, info = run_reference(dict(settings, seq_lens=[seq_len]), str(python), n_dev)
            reference["runs"].append(info)
            if info.get("error"):
                print(f"  reference failed: {info['error']}", flush=True)
            for row in rows:
                results.append(row)
                _progress(row)
    if reference["runs"]:
        reference["run"] = not any(info.get("error") for info in reference["runs"])
        reference["implementation"] = reference["runs"][0].get("implementation")

    machine["load_average_end"] = common.load_average()
    # The yardstick again at the end; the faster of the two (the one less disturbed by other load) is used.
    matmul_end = common.matmul_throughput(settings["matmul_size"], settings["dtype"], reps=3)
    print(
        f"  matmul again: {matmul_end['flops_per_s'] / 1e9:.1f} GFLOP/s (the faster one is used)", flush=True
    )
    matmul = dict(max((matmul_start, matmul_end), key=lambda m: m["flops_per_s"]))
    matmul.update(start=matmul_start, end=matmul_end)
    for row in results:
        _derive(row, settings, matmul)
    targets = evaluate_targets(results, settings)
    notes = list(NOTES)
    if any(s > settings["dense_max_len"] for s in settings["seq_lens"]):
        notes.append(
            f"Dense attention was skipped above {settings['dense_max_len']} tokens (--dense-max-len): it "
            "materialises the S x S score matrix and its backward, which is slow and large on this host."
        )
    if skipped_sp:
        notes.append(f"sp values {skipped_sp} skipped: only {n_dev} devices (jax was started with fewer).")
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
        "targets": targets,
        "notes": notes,
        "wall_s": time.perf_counter() - started,
    }
    json_path = common.write_json(out_dir / "attention.json", payload)
    plot(results, settings, matmul, out_dir / "attention.png")
    table = results_table(results)
    summary = targets_table(targets)
    header = (
        f"Machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs, jax {machine['jax_version']} "
        f"{machine['backend']} with {n_dev} {'simulated ' if machine['simulated_cpu_devices'] else ''}devices; "
        f"batch {settings['batch']}, {settings['heads']} heads x {settings['head_dim']}, {settings['dtype']}; "
        f"matmul {matmul['n']}^3 = {matmul['flops_per_s'] / 1e9:.1f} GFLOP/s; load average (1/5/15 min) "
        f"{_load(machine.get('load_average_start'))} at start, {_load(machine.get('load_average_end'))} at end."
    )
    (out_dir / "attention.md").write_text(f"{header}\n\n{table}\n\n{summary}\n")
    print()
    print(header)
    print()
    print(table)
    print()
    print(summary)
    print(
        f"\nwrote {json_path}, {out_dir / 'attention.png'}, {out_dir / 'attention.md'} ({payload['wall_s']:.0f} s)"
    )
    return 0
