"""Token layouts for causal ring attention.

A layout says which global token indices each device of the ring holds. `contiguous` gives device r the r-th
block; it leaves causal work unbalanced (device 0 attends to almost nothing). `zigzag` cuts the sequence into 2N
chunks and gives device r chunks r and 2N-1-r, so every device does the same work at every ring step.

The permutation is applied once to the token stream and undone once at the output. Inside `shard_map` it is done
with collective permutes only (no all-gather).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lvm.attention.chunking import LAYOUTS, check_layout, run_length

__all__ = ["LAYOUTS", "check_layout", "from_layout", "global_permutation", "local_token_index", "run_length"]
__all__ += ["to_layout"]


def local_token_index(device, n_devices: int, block_len: int, layout: str) -> jax.Array:
    """Global token indices `[block_len]` held by `device` (may be traced) under `layout`."""
    if layout == "contiguous" or n_devices == 1:
        return device * block_len + jnp.arange(block_len, dtype=jnp.int32)
    half = block_len // 2
    ar = jnp.arange(half, dtype=jnp.int32)
    return jnp.concatenate([device * half + ar, (2 * n_devices - 1 - device) * half + ar])


def global_permutation(seq_len: int, n_devices: int, layout: str) -> jax.Array:
    """`perm` such that `x[:, perm]` is the laid-out stream (for host-side use and tests)."""
    check_layout(layout, seq_len, n_devices)
    block = seq_len // n_devices
    return jnp.concatenate([local_token_index(d, n_devices, block, layout) for d in range(n_devices)])


def _zigzag_home(chunk: int, n: int) -> int:
    """Device that holds global chunk `chunk` (of 2n) under zigzag."""
    return chunk if chunk < n else 2 * n - 1 - chunk


def to_layout(x: jax.Array, axis_name: str, layout: str, seq_axis: int = 1) -> jax.Array:
    """Inside shard_map: natural-order local block -> this device's block under `layout`."""
    n = lax.axis_size(axis_name)
    if layout == "contiguous" or n == 1:
        return x
    # Device r holds chunks 2r (even) and 2r+1 (odd); device d needs chunks d and 2n-1-d, one even, one odd.
    even, odd = jnp.split(x, 2, axis=seq_axis)
    got_even = lax.ppermute(even, axis_name, [(r, _zigzag_home(2 * r, n)) for r in range(n)])
    got_odd = lax.ppermute(odd, axis_name, [(r, _zigzag_home(2 * r + 1, n)) for r in range(n)])
    d_is_even = lax.axis_index(axis_name) % 2 == 0  # chunk d has d's parity and goes first
    first = jnp.where(d_is_even, got_even, got_odd)
    second = jnp.where(d_is_even, got_odd, got_even)
    return jnp.concatenate([first, second], axis=seq_axis)


def from_layout(x: jax.Array, axis_name: str, layout: str, seq_axis: int = 1) -> jax.Array:
    """Inside shard_map: inverse of `to_layout`."""
    n = lax.axis_size(axis_name)
    if layout == "contiguous" or n == 1:
        return x
    first, second = jnp.split(x, 2, axis=seq_axis)  # chunks d and 2n-1-d
    d_is_even = lax.axis_index(axis_name) % 2 == 0
    even = jnp.where(d_is_even, first, second)
    odd = jnp.where(d_is_even, second, first)
    even_id = [d if d % 2 == 0 else 2 * n - 1 - d for d in range(n)]
    odd_id = [2 * n - 1 - d if d % 2 == 0 else d for d in range(n)]
    got_even = lax.ppermute(even, axis_name, [(d, even_id[d] // 2) for d in range(n)])
    got_odd = lax.ppermute(odd, axis_name, [(d, odd_id[d] // 2) for d in range(n)])
    return jnp.concatenate([got_even, got_odd], axis=seq_axis)
