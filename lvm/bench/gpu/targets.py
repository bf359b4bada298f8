"""The GPU check's targets: pass/fail verdicts computed from result rows alone.

Each target returns its rule, the measured number, "met" (True / False, or None when it was not measured) and a
"reason" naming the number that decided it or why there is none (`common.verdict`).
"""

from __future__ import annotations

from typing import Any

from lvm.bench import common
from lvm.bench.gpu.settings import FUSED_VS_CUDNN, MFU_TARGET, Settings


def _why_not(rows, **match) -> str:
    """Why the row matching `match` has no measurement: its error, its skip (time budget), or it was not run."""
    row = next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)
    if row is None:
        return "not run"
    if row.get("error"):
        return "error: " + row["error"][:200]
    return "skipped (time budget)" if row.get("skipped") else "no time measured"


def fused_vs_cudnn(attention_rows, settings: Settings) -> dict[str, Any]:
    """fwd+bwd FLOP/s of our fused kernel over cuDNN's at target_seq tokens, causal: at least FUSED_VS_CUDNN."""
    at = dict(seq_len=settings.target_seq, causal=True)
    rows = {impl: common.find_row(attention_rows, impl=impl, **at) for impl in ("fused", "cudnn")}
    ratio = rows["fused"]["flops_per_s"] / rows["cudnn"]["flops_per_s"] if all(rows.values()) else None
    absent = "; ".join(
        f"{impl} {_why_not(attention_rows, impl=impl, **at)}" for impl, r in rows.items() if not r
    )
    return {
        "rule": f"fwd+bwd FLOP/s of kernel 'fused' >= {FUSED_VS_CUDNN} x cuDNN's at {settings.target_seq} tokens, "
        "causal",
        "measured": ratio,
        **common.verdict(
            [] if ratio is None else [ratio],
            lambda r: r >= FUSED_VS_CUDNN,
            lambda r: f"{r:.2f}x cuDNN",
            need=f">= {FUSED_VS_CUDNN}x cuDNN",
            missing=f"not measured at {settings.target_seq} tokens, causal: {absent}",
        ),
    }


def mfu_1b(train_rows, settings: Settings) -> dict[str, Any]:
    """MFU of the model's training step at train_seq tokens with the fused kernel: at least MFU_TARGET."""
    row = next((r for r in train_rows if r["kernel"] == "fused" and r.get("step_s")), None)
    mfu = row.get("mfu") if row else None
    if row:
        missing = "no peak FLOP/s to divide by (no vendor peak and no measured matmul)"
    else:
        missing = f"fused training step {_why_not(train_rows, kernel='fused')}"
    return {
        "rule": f"{settings.model} training step at {settings.train_seq} tokens (attention.kernel=fused) >= "
        f"{MFU_TARGET:.0%} MFU",
        "measured": mfu,
        **common.verdict(
            [] if mfu is None else [mfu],
            lambda m: m >= MFU_TARGET,
            lambda m: f"{m:.1%} MFU",
            need=f">= {MFU_TARGET:.0%}",
            missing=missing,
        ),
    }


def evaluate_targets(attention_rows, train_rows, settings: Settings) -> dict[str, Any]:
    return {
        "fused_vs_cudnn": fused_vs_cudnn(attention_rows, settings),
        "mfu_1b": mfu_1b(train_rows, settings),
    }
