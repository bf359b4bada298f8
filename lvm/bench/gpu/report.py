"""The GPU check's markdown report: targets, attention, training, the longest context, sections and notes."""

from __future__ import annotations

from typing import Any

from lvm.bench import common
from lvm.bench.gpu.settings import GRAD_TOLERANCE, IMPLS, USABLE_MEMORY

NOTES = [
    "Attention FLOPs (model FLOPs, one convention for every row): forward 4*S^2*D*H, backward 2x forward, so "
    "fwd+bwd = 12*S^2*D*H per batch row, HALVED when causal. Kernels that skip masked tiles still compute the "
    "diagonal tiles and the backward recomputes the scores, so hardware FLOPs exceed these.",
    "Times: compiled first (lower().compile()), one warm-up call, then up to `reps` calls with "
    "block_until_ready, stopping early (after 2) when a case's timing budget is spent; the headline is the "
    "median. 'compile' is lower+compile wall time.",
    "Training FLOPs: lvm.metrics.flops_per_token (6 x matmul parameters incl. both output heads + 6*L*H*D*S "
    "causal attention) x tokens; rematerialisation is not counted. MFU uses lvm.metrics.PEAK_FLOPS "
    "(vendor dense bf16 peak; H100 SXM/H200 989 TFLOP/s); 'of matmul' uses the measured matmul instead.",
    "Max context: XLA's compiled memory analysis of the whole training step (arguments + outputs - aliased + "
    f"temporaries + code) against {USABLE_MEMORY:.0%} of the device's memory limit (bytes_limit of the "
    "allocator: XLA_PYTHON_CLIENT_MEM_FRACTION of the card); lengths are doubled, then predicted from a "
    "straight line through the probes (memory grows linearly with length), then bisected. A real step then "
    "runs at the longest fitting length whose estimated time (the 32K step scaled by model FLOPs) fits.",
]


def tflops(x) -> str:
    """FLOP/s as TFLOP/s, 3 significant digits below 100 (smoke runs on CPU are far below 1)."""
    return "-" if x is None else f"{x / 1e12:.0f}" if x >= 1e14 else f"{x / 1e12:.3g}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _tiles(row) -> str:
    t = row.get("tiles")
    return f"{t['forward'][0]}x{t['forward'][1]} / {t['backward'][0]}x{t['backward'][1]}" if t else "-"


def _status(row) -> str:
    if row.get("error"):
        return "error: " + row["error"][:80].replace("|", "/")
    return "skipped (budget)" if row.get("skipped") else "-"


def attention_table(rows) -> str:
    """Every attention row: by length, causal first, in IMPLS order."""
    body = []
    for r in sorted(rows, key=lambda r: (r["seq_len"], not r["causal"], IMPLS.index(r["impl"]))):
        ok = bool(r.get("time_s"))
        err = r.get("grad_max_rel_err")
        body.append(
            [
                r["seq_len"],
                "causal" if r["causal"] else "full",
                r["impl"],
                _tiles(r),
                common.fmt_seconds(r.get("time_s")) if ok else _status(r),
                tflops(r.get("flops_per_s")),
                _pct(r.get("of_matmul")),
                _pct(r.get("of_cudnn")),
                "-" if err is None else f"{err:.1e}{'' if err <= GRAD_TOLERANCE else ' (!)'}",
                f"{r['compile_s']:.1f}" if ok else "-",
            ]
        )
    headers = ["seq", "mask", "impl", "tiles fwd / bwd", "fwd+bwd", "TFLOP/s", "of matmul", "of cuDNN"]
    return common.markdown_table(headers + ["grad err vs cuDNN", "compile s"], body)


def train_table(rows) -> str:
    body = []
    for r in rows:
        ok = bool(r.get("step_s"))
        mem = (r.get("memory") or {}).get("peak_bytes")
        body.append(
            [
                r["kernel"],
                r["seq_len"],
                common.fmt_seconds(r.get("step_s")) if ok else _status(r),
                f"{r['tokens_per_s']:.0f}" if ok else "-",
                tflops(r.get("model_flops_per_s")),
                _pct(r.get("mfu")),
                _pct(r.get("of_matmul")),
                common.fmt_bytes(mem),
                f"{r['compile_s']:.1f}" if r.get("compile_s") else "-",
                "-" if not ok else ("yes" if r["loss_finite"] else "NO"),
            ]
        )
    headers = [
        "attention.kernel",
        "seq",
        "step",
        "tokens/s",
        "model TFLOP/s",
        "MFU",
        "of matmul",
        "peak memory",
    ]
    return common.markdown_table(headers + ["compile s", "loss finite"], body)


def max_context_text(mc) -> str:
    """The max_context section's result: the limit, the probes, the straight line and the confirming step."""
    if not mc:
        return "not run"
    lines = [
        f"Memory limit {common.fmt_bytes(mc.get('memory_limit_bytes'))} ({mc.get('memory_limit_source', '-')}), "
        f"usable {mc['usable_fraction']:.0%}; kernel {mc.get('kernel')}."
    ]
    if mc.get("why_not"):
        lines.append(mc["why_not"])
    probes = [
        [
            p["seq_len"],
            common.fmt_bytes(p.get("peak_bytes")),
            "yes" if p.get("fits") else "NO",
            f"{p['compile_s']:.1f}",
        ]
        if p.get("peak_bytes")
        else [p["seq_len"], "-", "error: " + p["error"][:80], "-"]
        for p in mc.get("probes", [])
    ]
    if probes:
        lines.append(
            "\n" + common.markdown_table(["seq", "compiled peak", "fits", "compile s"], probes) + "\n"
        )
    if mc.get("predicted_max"):
        lines.append(
            f"Straight line through the two longest probes: {common.fmt_bytes(mc['bytes_per_token'])} per token, "
            f"reaching the usable memory at about {mc['predicted_max']} tokens."
        )
    lines.append(
        f"Longest fitting length compiled: {mc.get('fits_up_to')}; shortest too big: {mc.get('too_big_from')}."
    )
    c = mc.get("confirmed")
    if c and c.get("step_s"):
        lines.append(
            f"Confirmed: one step at {c['seq_len']} tokens ran in {c['step_s']:.1f} s ({c['tokens_per_s']:.0f} "
            f"tokens/s, MFU {_pct(c.get('mfu'))}, loss finite: {c['loss_finite']})."
        )
    elif c:
        lines.append(f"Confirmed at {c['seq_len']} tokens by {c['by']}.")
    for nr in mc.get("not_run", []):
        lines.append(f"Not run at {nr['seq_len']}: estimated {nr['estimated_step_s']:.0f} s a step.")
    for fr in mc.get("failed_runs", []):
        lines.append(f"Running at {fr['seq_len']} failed: {fr['error'][:200]}")
    return "\n".join(lines)


def vqgan_text(v) -> str:
    """The vqgan_encode section's result: encode frames/s per batch, decode workers, whether they keep up."""
    if not v:
        return "not run"
    lines = []
    if v.get("error"):
        lines.append("Encode error: " + v["error"][:300])
    rows = [
        [r["batch"], common.fmt_seconds(r["time_s"]), f"{r['frames_per_s']:.0f}", f"{r['compile_s']:.1f}"]
        if r.get("time_s")
        else [r["batch"], "skipped (budget)", "-", "-"]
        for r in v.get("encode", [])
    ]
    if rows:
        lines.append(common.markdown_table(["frames a call", "call", "frames/s", "compile s"], rows) + "\n")
    d = v.get("decode") or {}
    if d.get("rows"):
        rates = ", ".join(f"{r['workers']} worker(s) {r['frames_per_s']:.1f} frames/s" for r in d["rows"])
        lines.append(
            f"Decode ({d['clip']} h264 clip at {d['sample_fps']:g} fps, {d['cpus']} CPUs, default "
            f"{d['workers']} workers): {rates}."
        )
    for key in ("skipped", "error"):
        if d.get(key):
            lines.append(f"Decode {key}: {d[key][:300]}")
    if v.get("keeps_up") is not None:
        needed = f"; about {v['workers_needed']} workers would" if v.get("workers_needed") else ""
        lines.append(
            f"Decoding keeps up with the encode: {common.fmt_met(v['keeps_up'])} ({v['decode_frames_per_s']:.0f} "
            f"against {v['encode_frames_per_s']:.0f} frames/s{needed})."
        )
    return "\n".join(lines) or "not measured"


def targets_table(targets) -> str:
    """One row a target: its rule, the reason of its verdict, and the verdict."""
    rows = [[t["rule"], t["reason"].replace("|", "/"), common.fmt_met(t["met"])] for t in targets.values()]
    return common.markdown_table(["target", "measured", "met"], rows)


def render_markdown(p: dict[str, Any]) -> str:
    """OUT/gpu_check.md from the payload (run.Run.payload), complete or not."""
    m, s, mm = p["machine"], p["settings"], p["matmul"]
    head = (
        f"# GPU check{' (SMOKE: tiny shapes, not a measurement)' if p['smoke'] else ''}\n\n"
        f"{m['device_kind']} ({m['backend']}), memory limit {common.fmt_bytes(m.get('memory_limit_bytes'))}; "
        f"jax {m['jax_version']}, Python {m['python']}, {m['cpu_count']} CPUs ({m['cpu_model']}); {p['created']}; "
        f"{p.get('wall_s', 0):.0f} s in all.\n\n"
        f"Matmul {s['matmul_n']}^3 {s['dtype']}: "
        + (
            f"{tflops(mm['flops_per_s'])} TFLOP/s (median of {len(mm['times_s'])})."
            if mm
            else "not measured."
        )
    )
    sections = [
        [
            name,
            f"{r['budget_s']:.0f}",
            f"{r['used_s']:.0f}",
            "; ".join(r["notes"] + ([r["error"]] if r["error"] else []))[:300] or "-",
        ]
        for name, r in p["sections"].items()
    ]
    parts = [
        head,
        "## Targets\n\n" + targets_table(p["targets"]),
        f"## Attention fwd+bwd (batch 1, {s['heads']} heads x {s['head_dim']}, {s['dtype']})\n\n"
        + attention_table(p["attention"]),
        f"## Training step ({s['model']}, batch 1, one device)\n\n" + train_table(p["train"]),
        "## Longest trainable context\n\n" + max_context_text(p["max_context"]),
        f"## VQGAN encode ({s['vqgan_config']} config) and decode workers\n\n"
        + vqgan_text(p.get("vqgan_encode")),
        "## Sections (seconds)\n\n" + common.markdown_table(["section", "budget", "used", "notes"], sections),
        "## Notes\n\n" + "\n".join(f"- {n}" for n in p["notes"]),
    ]
    return "\n\n".join(parts) + "\n"
