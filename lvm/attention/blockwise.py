"""Blockwise attention of a device's queries against one key/value block, forward and backward.

Internal layouts (heads first so tiles are contiguous):
  q, dq, o: [batch, kv_heads, group, q_len, head_dim]   (query heads = kv_heads * group)
  k, v, dk, dv: [batch, kv_heads, kv_len, head_dim]
  m, l, lse, delta: [batch, kv_heads, group, q_len]      (float32)
  q_idx [q_len], k_idx [kv_len]: global token indices, used for the causal mask
  q_seg [batch, q_len], k_seg [batch, kv_len]: segment ids (compared for equality only) or None

Queries are visited in chunks of `q_chunk`, keys in chunks of `kv_chunk`; a (query chunk, key chunk) tile that
the causal mask hides completely is skipped with `lax.cond`, so its FLOPs are never spent. The largest
temporary is one score tile [batch, kv_heads, group, q_chunk, kv_chunk]; statistics are float32.
Queries arrive pre-scaled by 1/sqrt(head_dim), so no pass over a tile is spent on scaling. Tiles wholly below
the causal diagonal take a branch without the causal mask; only diagonal tiles build it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


class Tiling(NamedTuple):
    q_chunk: int
    kv_chunk: int
    causal: bool


class Stats(NamedTuple):
    """Running online-softmax state of the local queries."""

    o: jax.Array  # [b, h, g, c, d] f32, unnormalised output
    m: jax.Array  # [b, h, g, c] f32, running max
    l: jax.Array  # noqa: E741  [b, h, g, c] f32, running denominator


def varying_like(x, *refs):
    """Mark a fresh array as varying over the manual mesh axes of `refs` (needed under shard_map's check_vma)."""
    vma = lambda a: jax.typeof(a).manual_axis_type.varying
    missing = tuple(sorted(frozenset().union(*map(vma, refs)) - vma(x)))
    return lax.pcast(x, missing, to="varying") if missing else x


def init_stats(q: jax.Array, *refs) -> Stats:
    """Empty online-softmax state for queries `q` [b, h, g, c, d]."""
    b, h, g, c, d = q.shape
    fresh = (
        jnp.zeros((b, h, g, c, d), F32),
        jnp.full((b, h, g, c), -jnp.inf, F32),
        jnp.zeros((b, h, g, c), F32),
    )
    return Stats(*(varying_like(x, q, *refs) for x in fresh))


def finalize(stats: Stats, dtype) -> tuple[jax.Array, jax.Array]:
    """Normalised output in `dtype` and float32 log-sum-exp (+inf for rows that saw no key)."""
    seen = stats.l > 0
    out = stats.o / jnp.where(seen, stats.l, 1.0)[..., None]
    lse = jnp.where(seen, stats.m + jnp.log(jnp.where(seen, stats.l, 1.0)), jnp.inf)
    return out.astype(dtype), lse


def _slice(x, start, size, axis):
    return lax.dynamic_slice_in_dim(x, start, size, axis)


SKIP, VISIBLE, DIAGONAL = 0, 1, 2


def _tile_kind(q_idx_c, k_idx_c):
    """SKIP when the causal mask hides the whole tile, VISIBLE when it hides nothing, else DIAGONAL."""
    hidden = jnp.min(k_idx_c) > jnp.max(q_idx_c)
    visible = jnp.max(k_idx_c) <= jnp.min(q_idx_c)
    return jnp.where(hidden, SKIP, jnp.where(visible, VISIBLE, DIAGONAL))


def _visit_tile(compute, carry, q_idx_c, k_idx_c, causal: bool):
    """Run `compute(carry, causal_mask)` unless the tile is hidden. Returns (carry, 1 if computed else 0)."""
    if not causal:
        return compute(carry, False), 1
    kind = _tile_kind(q_idx_c, k_idx_c)
    branches = [lambda c: c, lambda c: compute(c, False), lambda c: compute(c, True)]
    return lax.switch(kind, branches, carry), (kind != SKIP).astype(jnp.int32)


def _tile_mask(q_idx_c, k_idx_c, q_seg_c, k_seg_c, causal: bool):
    """Boolean mask broadcastable to the score tile [b, h, g, q, k], or None when nothing is masked."""
    mask = None
    if causal:
        mask = (q_idx_c[:, None] >= k_idx_c[None, :])[None, None, None]
    if q_seg_c is not None:
        same = (q_seg_c[:, :, None] == k_seg_c[:, None, :])[:, None, None]
        mask = same if mask is None else mask & same
    return mask


def _scores(q_c, k_c, mask):
    s = jnp.einsum("bhgqd,bhkd->bhgqk", q_c, k_c, preferred_element_type=F32)
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _num_chunks(length: int, chunk: int) -> int:
    if length % chunk:
        raise ValueError(f"chunk size {chunk} does not divide block length {length}")
    return length // chunk


def block_forward(q, k, v, q_idx, k_idx, q_seg, k_seg, stats: Stats, tiling: Tiling):
    """Fold key/value block (k, v) into `stats` (q pre-scaled). Returns (stats, number of tiles computed)."""
    cq, ck, causal = tiling
    nq, nk = _num_chunks(q.shape[3], cq), _num_chunks(k.shape[2], ck)

    def q_step(i, carry):
        st, count = carry
        qs = i * cq
        q_c = _slice(q, qs, cq, 3)
        qi_c = _slice(q_idx, qs, cq, 0)
        qseg_c = None if q_seg is None else _slice(q_seg, qs, cq, 1)
        local = Stats(_slice(st.o, qs, cq, 3), _slice(st.m, qs, cq, 3), _slice(st.l, qs, cq, 3))

        def k_step(j, inner):
            acc, n = inner
            ks = j * ck
            ki_c = _slice(k_idx, ks, ck, 0)

            def compute(acc, causal_mask):
                k_c, v_c = _slice(k, ks, ck, 2), _slice(v, ks, ck, 2)
                kseg_c = None if k_seg is None else _slice(k_seg, ks, ck, 1)
                s = _scores(q_c, k_c, _tile_mask(qi_c, ki_c, qseg_c, kseg_c, causal_mask))
                m_new = jnp.maximum(acc.m, jnp.max(s, axis=-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.exp(s - m_safe[..., None])
                alpha = jnp.exp(acc.m - m_safe)
                pv = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(v.dtype), v_c, preferred_element_type=F32)
                return Stats(alpha[..., None] * acc.o + pv, m_new, alpha * acc.l + jnp.sum(p, axis=-1))

            acc, computed = _visit_tile(compute, acc, qi_c, ki_c, causal)
            return acc, n + computed

        local, count = lax.fori_loop(0, nk, k_step, (local, count))
        st = Stats(
            *(
                lax.dynamic_update_slice_in_dim(full, part, qs, 3)
                for full, part in zip(st, local, strict=True)
            )
        )
        return st, count

    return lax.fori_loop(0, nq, q_step, (stats, varying_like(jnp.int32(0), q, k, q_idx, k_idx)))


def block_backward(q, k, v, do, lse, delta, q_idx, k_idx, q_seg, k_seg, dq, tiling: Tiling):
    """Gradients of the local queries' attention to block (k, v), with q pre-scaled.

    Adds dScores @ k into `dq` (f32; the caller applies the scale once) and returns (dq, dk_block, dv_block),
    the block's key/value gradients in float32.
    """
    cq, ck, causal = tiling
    nq, nk = _num_chunks(q.shape[3], cq), _num_chunks(k.shape[2], ck)
    dk0 = varying_like(jnp.zeros(k.shape, F32), q, k, do, q_idx, k_idx)
    dv0 = varying_like(jnp.zeros(v.shape, F32), q, k, do, q_idx, k_idx)

    def q_step(i, carry):
        dq, dk, dv = carry
        qs = i * cq
        q_c, do_c = _slice(q, qs, cq, 3), _slice(do, qs, cq, 3)
        lse_c, delta_c = _slice(lse, qs, cq, 3), _slice(delta, qs, cq, 3)
        qi_c = _slice(q_idx, qs, cq, 0)
        qseg_c = None if q_seg is None else _slice(q_seg, qs, cq, 1)

        def k_step(j, inner):
            dq_c, dk, dv = inner
            ks = j * ck
            ki_c = _slice(k_idx, ks, ck, 0)
            k_c, v_c = _slice(k, ks, ck, 2), _slice(v, ks, ck, 2)

            def compute(_, causal_mask):
                """Tile gradients (dq, dk, dv); only tile-sized values pass through the branch."""
                kseg_c = None if k_seg is None else _slice(k_seg, ks, ck, 1)
                s = _scores(q_c, k_c, _tile_mask(qi_c, ki_c, qseg_c, kseg_c, causal_mask))
                p = jnp.exp(s - lse_c[..., None])
                dv_t = jnp.einsum("bhgqk,bhgqd->bhkd", p.astype(do.dtype), do_c, preferred_element_type=F32)
                dp = jnp.einsum("bhgqd,bhkd->bhgqk", do_c, v_c, preferred_element_type=F32)
                ds = (p * (dp - delta_c[..., None])).astype(q.dtype)
                dq_t = jnp.einsum("bhgqk,bhkd->bhgqd", ds, k_c, preferred_element_type=F32)
                dk_t = jnp.einsum("bhgqk,bhgqd->bhkd", ds, q_c, preferred_element_type=F32)
                return dq_t, dk_t, dv_t

            zeros = tuple(
                varying_like(jnp.zeros(shape, F32), q, k, do, q_idx, k_idx)
                for shape in (q_c.shape, k_c.shape, v_c.shape)
            )
            (dq_t, dk_t, dv_t), _ = _visit_tile(compute, zeros, qi_c, ki_c, causal)
            dk = lax.dynamic_update_slice_in_dim(dk, _slice(dk, ks, ck, 2) + dk_t, ks, 2)
            dv = lax.dynamic_update_slice_in_dim(dv, _slice(dv, ks, ck, 2) + dv_t, ks, 2)
            return dq_c + dq_t, dk, dv

        dq_c, dk, dv = lax.fori_loop(0, nk, k_step, (_slice(dq, qs, cq, 3), dk, dv))
        return lax.dynamic_update_slice_in_dim(dq, dq_c, qs, 3), dk, dv

    return lax.fori_loop(0, nq, q_step, (dq, dk0, dv0))
