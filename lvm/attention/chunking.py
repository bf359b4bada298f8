"""The attention settings a config can name, and the checks on them that need no arrays (no jax import).

`lvm.config` validates a config with these before anything is compiled; the kernels import them from here.
"""

from __future__ import annotations

LAYOUTS = ("zigzag", "contiguous")
KERNELS = ("auto", "xla", "fused")
MAX_DEFAULT_CHUNK = 512


def check_layout(layout: str, seq_len: int, n_devices: int) -> None:
    """Raise a clear error when `seq_len` cannot be laid out over `n_devices` with `layout`."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown token layout {layout!r}; choose one of {LAYOUTS}")
    parts = 2 * n_devices if layout == "zigzag" else n_devices
    if seq_len % parts:
        raise ValueError(
            f"sequence length {seq_len} must be divisible by {parts} for the {layout} layout over "
            f"{n_devices} devices; pad the sequence to a multiple of {parts}"
        )


def run_length(layout: str, block_len: int, n_devices: int) -> int:
    """Length of the runs of consecutive global indices inside one device's block."""
    return block_len // 2 if (layout == "zigzag" and n_devices > 1) else block_len


def default_chunk(run: int, limit: int = MAX_DEFAULT_CHUNK) -> int:
    """Largest divisor of `run` that is at most `limit` (chunks never straddle a layout run)."""
    for c in range(min(run, limit), 0, -1):
        if run % c == 0:
            return c
    return 1


def resolve_chunks(block_len: int, n_devices: int, layout: str, q_chunk, kv_chunk) -> tuple[int, int]:
    """Chunk sizes for a local block: defaults derived from the block, explicit ones validated."""
    run = run_length(layout, block_len, n_devices)
    out = []
    for name, value in (("q_chunk", q_chunk), ("kv_chunk", kv_chunk)):
        if value is None:
            value = default_chunk(run)
        elif value <= 0 or block_len % value:
            raise ValueError(
                f"{name}={value} must be a positive divisor of the per-device block of {block_len} tokens "
                f"(sequence / sp); try {default_chunk(run)}"
            )
        out.append(int(value))
    return out[0], out[1]
