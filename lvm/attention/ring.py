"""Ring attention: the sequence is split over a mesh axis; key/value blocks travel round the ring.

Each device keeps its query block and online-softmax state. At ring step s it holds the key/value block of
device (r - s) mod N. The transfer of the next block is issued before the current block's compute so XLA can
overlap the two; the backward pass sends key/value gradients round the ring the same way and they arrive home
after N hops.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lvm.attention import blockwise, fused
from lvm.attention.chunking import KERNELS, check_layout, resolve_chunks, run_length
from lvm.attention.layout import from_layout, local_token_index, to_layout

_log = logging.getLogger(__name__)
_fallbacks_logged: set[str] = set()


class RingConfig(NamedTuple):
    axis_name: str
    layout: str
    tiling: blockwise.Tiling  # forward tiles
    backward_tiling: blockwise.Tiling
    target: fused.Target | None  # None: the XLA blockwise kernel


def choose_kernel(
    kernel: str, platform: str, block_len: int, n_devices: int, layout: str, head_dim: int, q_chunk, kv_chunk
):
    """Resolve `kernel` ("auto", "xla" or "fused") for `platform` to (target, forward tiles, backward tiles).

    `target` is None for the XLA blockwise kernel. "fused" where the fused kernels cannot run these shapes is a
    ValueError naming the reason; "auto" is "fused" on TPU and GPU and "xla" elsewhere, and falls back to "xla"
    (logging why, once) where the fused kernels cannot run.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {KERNELS}")
    cq, ck = resolve_chunks(block_len, n_devices, layout, q_chunk, kv_chunk)
    xla = None, (cq, ck), _backward_tiles(cq, ck)
    if kernel == "xla" or (kernel == "auto" and platform not in ("tpu", "gpu", "cuda", "rocm")):
        return xla
    target = fused.target_for(platform)
    run = run_length(layout, block_len, n_devices)
    try:
        tiles = fused.resolve_tiles(target, block_len, run, q_chunk, kv_chunk, head_dim)
    except fused.Unsupported as err:
        if kernel == "fused":
            raise
        if str(err) not in _fallbacks_logged:
            _fallbacks_logged.add(str(err))
            _log.warning("attention kernel 'auto' uses 'xla': %s", err)
        return xla
    return target, tiles[False], tiles[True]


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


def _block_forward(cfg: RingConfig, *args, count: bool):
    """One ring step's forward on the configured kernel: (stats, score tiles computed or None)."""
    if cfg.target is None:
        return blockwise.block_forward(*args, cfg.tiling)
    stats, tiles = fused.block_forward(*args, cfg.tiling, target=cfg.target, count=count)
    return stats, None if tiles is None else tiles[0, 0]


def _block_backward(cfg: RingConfig, *args):
    if cfg.target is None:
        return blockwise.block_backward(*args, cfg.backward_tiling)
    return fused.block_backward(*args, cfg.backward_tiling, target=cfg.target)


def _ring_forward(q, k, v, seg, cfg: RingConfig, count: bool = False):
    """Forward over the ring (q pre-scaled). Returns (out, lse, tiles computed per ring step [N] if `count`)."""
    n, c = lax.axis_size(cfg.axis_name), q.shape[3]
    q_idx, q = _local_query_index(cfg, q, n, c)

    def visit(step, kv, stats, counts):
        k_idx = _key_index(cfg, step, n, c)
        stats, tiles = _block_forward(cfg, q, kv[0], kv[1], q_idx, k_idx, seg, kv[2], stats, count=count)
        return stats, counts if tiles is None else counts.at[step].set(tiles)

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


def _backward_tiles(q_chunk: int, kv_chunk: int) -> tuple[int, int]:
    """The XLA backward keeps about twice as many score tiles alive as the forward; tiles of half the chunk in
    each direction keep its peak memory below the forward's (and stay aligned with the causal diagonal)."""
    if q_chunk % 2 or kv_chunk % 2:
        return q_chunk, kv_chunk
    return q_chunk // 2, kv_chunk // 2


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
        dq, dk, dv = _block_backward(cfg, qs, kv[0], kv[1], do, lse, delta, q_idx, k_idx, seg, kv[2], dq)
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


def _config(
    q,
    k,
    *,
    axis_name="sp",
    causal=True,
    layout="zigzag",
    q_chunk=None,
    kv_chunk=None,
    kernel="auto",
    platform=None,
) -> RingConfig:
    check_heads(q.shape[2], k.shape[2])
    n = lax.axis_size(axis_name)
    target, fwd, bwd = choose_kernel(
        kernel, platform or jax.default_backend(), q.shape[1], n, layout, q.shape[3], q_chunk, kv_chunk
    )
    return RingConfig(
        axis_name, layout, blockwise.Tiling(*fwd, causal), blockwise.Tiling(*bwd, causal), target
    )


def ring_attention(q, k, v, segment_ids=None, **kw):
    """Attention of local blocks inside `shard_map` (tokens already in `layout` order).

    q: [batch, block, heads, head_dim]; k, v: [batch, block, kv_heads, head_dim]; segment_ids: [batch, block]
    (this device's slice, same layout). Keywords (see `_config`): axis_name ("sp"), causal (True), layout
    ("zigzag"), q_chunk / kv_chunk (None: the kernel's defaults), kernel ("auto"; see `choose_kernel`) and
    platform (default: jax's default backend). Returns [batch, block, heads, head_dim] in q's dtype.
    """
    cfg = _config(q, k, **kw)
    qi, ki, vi = _to_internal(q, k, v)
    return _from_internal_q(_ring_core(qi, ki, vi, segment_ids, cfg))


def ring_block_counts(q, k, v, segment_ids=None, **kw):
    """Inside `shard_map`: score tiles the forward kernel computes on this device at each ring step, int32 [N].
    Keywords as for `ring_attention`."""
    cfg = _config(q, k, **kw)
    qi, ki, vi = _to_internal(q, k, v)
    return _ring_forward(_scale(qi), ki, vi, segment_ids, cfg, count=True)[2]


def checks_vma(kernel: str, platform: str) -> bool:
    """Whether a shard_map around ring attention can check varying manual axes. Pallas's interpreter (jax 0.10)
    re-traces kernels at lowering time with grid indices that do not vary, so the interpreted fused kernels
    ("fused" on CPU; "auto" is "xla" there) need `check_vma=False`; compiled kernels and "xla" keep the check."""
    return not (kernel == "fused" and fused.target_for(platform).interpret)


def mesh_platform(mesh: Mesh) -> str:
    """The platform ("cpu", "gpu", "tpu") of the mesh's devices (TPU for ahead-of-time topology meshes)."""
    return mesh.devices.flat[0].platform


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
    kernel="auto",
):
    """Exact attention of global arrays with the sequence sharded over `axis_name` of `mesh`.

    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim], natural token order;
    segment_ids: [batch, seq] (tokens attend only within their segment). `kernel`: "xla" (blockwise XLA),
    "fused" (Pallas kernels; interpret mode on CPU) or "auto" ("fused" on TPU and GPU, else "xla").
    Returns [batch, seq, heads, head_dim].
    """
    b, s, h, d = q.shape
    check_heads(h, k.shape[2])
    n = mesh.shape[axis_name] if axis_name in mesh.axis_names else 1
    check_layout(layout, s, n)
    platform = mesh_platform(mesh)
    choose_kernel(kernel, platform, s // n, n, layout, d, q_chunk, kv_chunk)  # fail before tracing
    act, tok = _specs(mesh, axis_name, b, h, k.shape[2])
    kw = dict(
        axis_name=axis_name,
        causal=causal,
        layout=layout,
        q_chunk=q_chunk,
        kv_chunk=kv_chunk,
        kernel=kernel,
        platform=platform,
    )

    def local(q, k, v, seg):
        q, k, v = (to_layout(x, axis_name, layout) for x in (q, k, v))
        seg = None if seg is None else to_layout(seg, axis_name, layout)
        return from_layout(ring_attention(q, k, v, seg, **kw), axis_name, layout)

    seg_spec = None if segment_ids is None else tok
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(act, act, act, seg_spec),
        out_specs=act,
        check_vma=checks_vma(kernel, platform),
    )
    return fn(q, k, v, segment_ids)
