"""What the attention benchmark runs: the sizes (full and --quick) and the settings at each length."""

from __future__ import annotations

from typing import Any

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


def settings_from_args(args) -> dict[str, Any]:
    """The run's settings: each flag left unset takes its FULL (or, with --quick, QUICK) value."""
    base = QUICK if args.quick else FULL
    pick = lambda name: base[name] if getattr(args, name) is None else getattr(args, name)
    settings = {
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
    for s in settings["seq_lens"]:
        for sp in settings["sp_values"]:
            if s % (2 * sp):  # the zigzag layout cuts the sequence into 2*sp chunks
                raise ValueError(f"sequence length {s} must be divisible by 2*sp = {2 * sp} (zigzag layout)")
    return settings


def cases(settings: dict[str, Any], n_devices: int) -> list[dict[str, Any]]:
    """The project's settings for every sequence length, in run order.

    Dense up to --dense-max-len; blockwise at sp=1; at each sp > 1 (that the devices allow) the causal ring
    with the zigzag (balanced) and the contiguous (unbalanced) layout, and the non-causal ring (contiguous:
    nothing to balance). Each is a row template: series, impl, seq_len, sp, causal, layout.
    """
    out = []
    for s in settings["seq_lens"]:
        if s <= settings["dense_max_len"]:
            for causal in (True, False):
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
            ring = dict(impl="ring", seq_len=s, sp=sp)
            out.append(dict(ring, series="ring-zigzag", causal=True, layout="zigzag"))
            out.append(dict(ring, series="ring-contiguous", causal=True, layout="contiguous"))
            out.append(dict(ring, series="ring", causal=False, layout="contiguous"))
    return out
