"""Ring attention: the sequence is split over a mesh axis; key/value blocks travel round the ring.

Each device keeps its query block and online-softmax state. At ring step s it holds the key/value block of
device (r - s) mod N. The transfer of the next block is issued before the current block's compute so XLA can
overlap the two; the backward pass sends key/value gradients round the ring the same way and they arrive home
after N hops.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lvm.attention import blockwise
from lvm.attention.layout import check_layout, from_layout, local_token_index, run_length, to_layout

MAX_DEFAULT_CHUNK = 512


class RingConfig(NamedTuple):
    axis_name: str
    layout: str
    tiling: blockwise.Tiling


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


def check_heads(num_heads: int, num_kv_heads: int) -> None:
    """Raise a clear error unless the query heads are a multiple of the key/value heads."""
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"query heads ({num_heads}) must be a multiple of key/value heads ({num_kv_heads}) for grouped-query "
            "attention; choose num_kv_heads dividing num_heads"
        )


def _to_internal(q, k, v):
    """[b, c, H, d] -> heads-first layouts of the kernel (q grouped by key/value head)."""
    b, c, h, d = q.shape
    hk = k.shape[2]
    qi = q.reshape(b, c, hk, h // hk, d).transpose(0, 2, 3, 1, 4)
    return qi, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _from_internal_q(x):
    b, hk, g, c, d = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b, c, hk * g, d)


def _shift(tree, axis_name, n):
    """Send to the next device on the ring."""
    return lax.ppermute(tree, axis_name, [(i, (i + 1) % n) for i in range(n)])


def _local_query_index(cfg: RingConfig, q, n, c):
    """Global indices of this device's queries, pinned to q so XLA cannot hoist the masks out of a layer scan."""
    q_idx = local_token_index(lax.axis_index(cfg.axis_name), n, c, cfg.layout)
    return lax.optimization_barrier((q_idx, q))


def _key_index(cfg: RingConfig, step, n, c):
    """Global indices of the key/value block held at ring `step` (it came from device r - step)."""
    return local_token_index((lax.axis_index(cfg.axis_name) - step) % n, n, c, cfg.layout)


def _ring_forward(q, k, v, seg, cfg: RingConfig):
    """Forward over the ring (q pre-scaled). Returns (out, lse, tiles computed per ring step [N])."""
    n, c = lax.axis_size(cfg.axis_name), q.shape[3]
    q_idx, q = _local_query_index(cfg, q, n, c)

    def visit(step, kv, stats, counts):
        k_idx = _key_index(cfg, step, n, c)
        stats, count = blockwise.block_forward(q, kv[0], kv[1], q_idx, k_idx, seg, kv[2], stats, cfg.tiling)
        return stats, counts.at[step].set(count)

    def ring_step(step, carry):
        stats, kv, counts = carry
        nxt = _shift(kv, cfg.axis_name, n)  # issued before this step's compute so the two can overlap
        stats, counts = visit(step, kv, stats, counts)
        return stats, nxt, counts

    counts = blockwise.varying_like(jnp.zeros((n,), jnp.int32), q, k, q_idx)
    carry = (blockwise.init_stats(q, k, q_idx), (k, v, seg), counts)
    stats, kv, counts = lax.fori_loop(0, n - 1, ring_step, carry)
    stats, counts = visit(n - 1, kv, stats, counts)  # the last block needs no onward transfer
    out, lse = blockwise.finalize(stats, q.dtype)
    return out, lse, counts


def _backward_tiling(tiling: blockwise.Tiling) -> blockwise.Tiling:
    """The backward keeps about twice as many score tiles alive as the forward; tiles of half the chunk in each
    direction keep its peak memory below the forward's (and stay aligned with the causal diagonal)."""
    if tiling.q_chunk % 2 or tiling.kv_chunk % 2:
        return tiling
    return tiling._replace(q_chunk=tiling.q_chunk // 2, kv_chunk=tiling.kv_chunk // 2)


def _scale(q):
    return q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring_core(q, k, v, seg, cfg: RingConfig):
    return _ring_forward(_scale(q), k, v, seg, cfg)[0]


def _ring_core_fwd(q, k, v, seg, cfg):
    out, lse, _ = _ring_forward(_scale(q), k, v, seg, cfg)
    return out, (q, k, v, seg, out, lse)


def _ring_core_bwd(cfg, res, do):
    q, k, v, seg, out, lse = res
    n, c = lax.axis_size(cfg.axis_name), q.shape[3]
    q_idx, qs = _local_query_index(cfg, _scale(q), n, c)
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    def visit(step, kv, dq, grads_in):
        """Add this device's share to the block's key/value gradients and pass them on."""
        k_idx = _key_index(cfg, step, n, c)
        dq, dk, dv = blockwise.block_backward(
            qs, kv[0], kv[1], do, lse, delta, q_idx, k_idx, seg, kv[2], dq, _backward_tiling(cfg.tiling)
        )
        return dq, _shift((dk + grads_in[0], dv + grads_in[1]), cfg.axis_name, n)

    def ring_step(step, carry):
        dq, kv, grads_in = carry
        nxt = _shift(kv, cfg.axis_name, n)
        dq, grads_in = visit(step, kv, dq, grads_in)
        return dq, nxt, grads_in

    zeros = lambda x: blockwise.varying_like(jnp.zeros(x.shape, jnp.float32), q, k, do, q_idx)
    carry = (zeros(q), (k, v, seg), (zeros(k), zeros(v)))
    dq, kv, grads_in = lax.fori_loop(0, n - 1, ring_step, carry)
    dq, (dk, dv) = visit(n - 1, kv, dq, grads_in)  # after n hops each block's gradient is home
    dq = dq * q.shape[-1] ** -0.5
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring_core.defvjp(_ring_core_fwd, _ring_core_bwd)


def _config(q, k, axis_name, causal, layout, q_chunk, kv_chunk) -> RingConfig:
    check_heads(q.shape[2], k.shape[2])
    n = lax.axis_size(axis_name)
    cq, ck = resolve_chunks(q.shape[1], n, layout, q_chunk, kv_chunk)
    return RingConfig(axis_name, layout, blockwise.Tiling(cq, ck, causal))


def ring_attention(
    q, k, v, segment_ids=None, *, axis_name="sp", causal=True, layout="zigzag", q_chunk=None, kv_chunk=None
):
    """Attention of local blocks inside `shard_map` (tokens already in `layout` order).

    q: [batch, block, heads, head_dim]; k, v: [batch, block, kv_heads, head_dim]; segment_ids: [batch, block]
    (this device's slice, same layout). Returns [batch, block, heads, head_dim] in q's dtype.
    """
    cfg = _config(q, k, axis_name, causal, layout, q_chunk, kv_chunk)
    qi, ki, vi = _to_internal(q, k, v)
    return _from_internal_q(_ring_core(qi, ki, vi, segment_ids, cfg))


def ring_block_counts(
    q, k, v, segment_ids=None, *, axis_name="sp", causal=True, layout="zigzag", q_chunk=None, kv_chunk=None
):
    """Inside `shard_map`: score tiles the forward kernel computes on this device at each ring step, int32 [N]."""
    cfg = _config(q, k, axis_name, causal, layout, q_chunk, kv_chunk)
    qi, ki, vi = _to_internal(q, k, v)
    return _ring_forward(_scale(qi), ki, vi, segment_ids, cfg)[2]


def _specs(mesh: Mesh, axis_name: str, batch: int, heads: int, kv_heads: int):
    """PartitionSpecs of [b, s, h, d] and [b, s] arrays for `sharded_attention`."""
    if axis_name not in mesh.axis_names:
        raise ValueError(f"mesh has no axis {axis_name!r} (axes: {mesh.axis_names})")
    tp = "tp" if "tp" in mesh.axis_names and mesh.shape["tp"] > 1 else None
    if tp and (heads % mesh.shape["tp"] or kv_heads % mesh.shape["tp"]):
        raise ValueError(
            f"heads ({heads}) and kv heads ({kv_heads}) must be divisible by tp={mesh.shape['tp']}"
        )
    batch_axes = tuple(a for a in mesh.axis_names if a not in (axis_name, "tp") and mesh.shape[a] > 1)
    size = 1
    for a in batch_axes:
        size *= mesh.shape[a]
    if batch % size:
        raise ValueError(
            f"batch {batch} must be divisible by the product of batch mesh axes {batch_axes} = {size}"
        )
    b = batch_axes or None
    return P(b, axis_name, tp, None), P(b, axis_name)


def sharded_attention(
    q,
    k,
    v,
    mesh: Mesh,
    *,
    causal=True,
    segment_ids=None,
    axis_name="sp",
    layout="zigzag",
    q_chunk=None,
    kv_chunk=None,
):
    """Exact attention of global arrays with the sequence sharded over `axis_name` of `mesh`.

    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim], natural token order;
    segment_ids: [batch, seq] (tokens attend only within their segment). Returns [batch, seq, heads, head_dim].
    """
    b, s, h, _ = q.shape
    check_heads(h, k.shape[2])
    n = mesh.shape[axis_name] if axis_name in mesh.axis_names else 1
    check_layout(layout, s, n)
    resolve_chunks(s // n, n, layout, q_chunk, kv_chunk)  # fail before tracing when a chunk cannot work
    act, tok = _specs(mesh, axis_name, b, h, k.shape[2])
    kw = dict(axis_name=axis_name, causal=causal, layout=layout, q_chunk=q_chunk, kv_chunk=kv_chunk)

    def local(q, k, v, seg):
        q, k, v = (to_layout(x, axis_name, layout) for x in (q, k, v))
        seg = None if seg is None else to_layout(seg, axis_name, layout)
        return from_layout(ring_attention(q, k, v, seg, **kw), axis_name, layout)

    seg_spec = None if segment_ids is None else tok
    fn = jax.shard_map(local, mesh=mesh, in_specs=(act, act, act, seg_spec), out_specs=act)
    return fn(q, k, v, segment_ids)
