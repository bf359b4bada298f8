"""The attention benchmark's targets: pass/fail verdicts computed from result rows alone.

Each target returns its rule, the numbers behind it, "met" (True / False, or None when nothing was measured to
judge by) and a "reason" naming the numbers that decided it (`common.verdict`). Verdicts are taken at the
largest sequence length: shorter ones are dominated by fixed overheads. A row is a dict with at least series,
seq_len, sp, causal and time_s (and memory.per_device_bytes, matmul_fraction where a target reads them).
"""

from __future__ import annotations

from typing import Any

from lvm.bench import common

CAUSAL_OVER_FULL = 0.6  # causal attention should cost about half of non-causal: at most this time ratio
RING_OVER_BLOCKWISE = 1.0  # the largest ring no slower than blockwise attention on one device
MATMUL_FRACTION = 0.6  # attention's model FLOP/s at least this fraction of the matmul's


def ours(results, seq_len: int, sp: int, causal: bool) -> dict[str, Any] | None:
    """The project's default setting at (seq_len, sp, causal): blockwise at sp=1, else the ring, zigzag when
    causal."""
    if sp == 1:
        return common.find_row(results, series="blockwise", seq_len=seq_len, causal=causal)
    series = "ring-zigzag" if causal else "ring"
    return common.find_row(results, series=series, seq_len=seq_len, sp=sp, causal=causal)


def largest_ring(results, sp_values) -> int:
    """The largest sp with a measured zigzag ring (1 when there is none)."""
    return max((sp for sp in sp_values if common.find_row(results, series="ring-zigzag", sp=sp)), default=1)


def _mask(row) -> str:
    return "causal" if row["causal"] else "full"


def _at(items, seq_len: int) -> list[dict[str, Any]]:
    return [i for i in items if i["seq_len"] == seq_len]


def _ratios_at_most(ratios, key: str, limit: float, label, seq_len: int, unit: str, missing: str) -> dict:
    """The verdict that every ratio `key` at `seq_len` is at most `limit`; `label` names a ratio's setting."""
    return common.verdict(
        _at(ratios, seq_len),
        lambda r: r[key] <= limit,
        lambda r: f"{label(r)}: {r[key]:.2f}{unit}",
        need=f"<= {limit}{unit}",
        missing=missing,
    )


def causal_about_half(results, seq_lens, max_sp: int) -> dict[str, Any]:
    """time(causal) / time(non-causal) of blockwise and of the largest ring: at most CAUSAL_OVER_FULL."""
    ratios = []
    for s in seq_lens:
        for sp in sorted({1, max_sp}):
            c, n = ours(results, s, sp, True), ours(results, s, sp, False)
            if c and n:
                ratios.append({"seq_len": s, "sp": sp, "causal_over_noncausal": c["time_s"] / n["time_s"]})
    largest = max(seq_lens)
    return {
        "rule": f"time(causal) / time(non-causal) <= {CAUSAL_OVER_FULL} for blockwise (sp=1) and the largest "
        "ring, at the largest sequence length (smaller lengths are dominated by fixed overheads)",
        "ratios": ratios,
        **_ratios_at_most(
            ratios,
            "causal_over_noncausal",
            CAUSAL_OVER_FULL,
            lambda r: f"sp={r['sp']}",
            largest,
            unit="",
            missing=f"no causal and non-causal pair measured at {largest} tokens",
        ),
    }


def ring_no_slower_than_blockwise(results, seq_lens, max_sp: int) -> dict[str, Any]:
    """time(ring at the largest sp) / time(blockwise, sp=1) at the same global length: at most 1."""
    ratios = []
    for s in seq_lens:
        for causal in (True, False):
            b, r = ours(results, s, 1, causal), ours(results, s, max_sp, causal)
            if b and r and max_sp > 1:
                ratios.append(
                    {
                        "seq_len": s,
                        "sp": max_sp,
                        "causal": causal,
                        "ring_over_blockwise": r["time_s"] / b["time_s"],
                    }
                )
    largest = max(seq_lens)
    return {
        "rule": f"time(ring, sp={max_sp}, zigzag when causal) / time(blockwise, sp=1) <= {RING_OVER_BLOCKWISE} "
        "at the largest sequence length; on simulated CPU devices the ring's time is the total over all its "
        "devices",
        "ratios": ratios,
        **_ratios_at_most(
            ratios,
            "ring_over_blockwise",
            RING_OVER_BLOCKWISE,
            _mask,
            largest,
            unit="x",
            missing=f"no ring (sp > 1) and blockwise pair measured at {largest} tokens",
        ),
    }


def faster_and_leaner_than_reference(results, seq_lens) -> dict[str, Any]:
    """Against the public reference at equal settings: faster, and fewer bytes per device."""
    pairs = []
    for ref in results:
        if ref.get("series") != "reference" or not ref.get("time_s"):
            continue
        mine = ours(results, ref["seq_len"], ref["sp"], ref["causal"])
        if not mine:
            continue
        pairs.append(
            {
                "seq_len": ref["seq_len"],
                "sp": ref["sp"],
                "causal": ref["causal"],
                "speedup": ref["time_s"] / mine["time_s"],
                "memory_ratio": mine["memory"]["per_device_bytes"] / ref["memory"]["per_device_bytes"],
            }
        )
    largest = max(seq_lens)
    wins = lambda p: p["speedup"] > 1 and p["memory_ratio"] < 1
    return {
        "rule": "speedup = time(reference) / time(ours) > 1 and memory_ratio = per-device bytes (temp + args) "
        "ours / reference < 1, for every (sp, causal) at the largest sequence length; ours is blockwise at sp=1, "
        "zigzag ring when causal",
        "pairs": pairs,
        "met_all_lengths": bool(pairs) and all(map(wins, pairs)),
        **common.verdict(
            _at(pairs, largest),
            wins,
            lambda p: f"sp={p['sp']} {_mask(p)}: {p['speedup']:.2f}x faster, {p['memory_ratio']:.2f}x memory",
            need="speedup > 1 and memory ratio < 1",
            missing="reference not run" if not pairs else f"no reference row measured at {largest} tokens",
        ),
    }


def attention_60pct_of_matmul(results, seq_lens) -> dict[str, Any]:
    """The best model-FLOP/s fraction of the matmul's among blockwise/ring at the largest length."""
    largest = max(seq_lens)
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
    return {
        "rule": "best model-FLOP/s fraction of the matmul's FLOP/s among the project's blockwise/ring settings "
        f"at the largest sequence length >= {MATMUL_FRACTION}",
        "best": best,
        "fractions": fractions,
        **common.verdict(
            [best] if best else [],
            lambda f: f["matmul_fraction"] >= MATMUL_FRACTION,
            lambda f: f"{100 * f['matmul_fraction']:.0f}% ({f['series']}, sp={f['sp']}, {_mask(f)})",
            need=f">= {100 * MATMUL_FRACTION:.0f}%",
            missing=f"no blockwise or ring row measured at {largest} tokens",
        ),
        "best_per_cpu_second": best_cpu,
        "per_cpu_second_rule": "the same with FLOPs per second of process CPU time on both sides (robust to "
        "other load; neither rewards nor punishes using more cores)",
    }


def evaluate_targets(results, settings) -> dict[str, Any]:
    """Every target from the rows (settings give the sequence lengths and ring sizes that were asked for)."""
    seq_lens = settings["seq_lens"]
    max_sp = largest_ring(results, settings["sp_values"])
    return {
        "causal_about_half": causal_about_half(results, seq_lens, max_sp),
        "ring_no_slower_than_blockwise": ring_no_slower_than_blockwise(results, seq_lens, max_sp),
        "faster_and_leaner_than_reference": faster_and_leaner_than_reference(results, seq_lens),
        "attention_60pct_of_matmul": attention_60pct_of_matmul(results, seq_lens),
    }
