"""Fused (Pallas) kernels for one ring step: a device's queries against one key/value block.

Same contract and internal layouts as `blockwise.py` (q pre-scaled, float32 statistics, global token indices
for the causal mask, segment ids, grouped-query attention at key/value width), written as Pallas kernels:

  forward   continues the running online-softmax state (o, m, l) of the local queries across ring hops;
  dq        adds this block's contribution to dq, given the global log-sum-exp and delta = rowsum(do * out);
  dk/dv     returns this block's key/value gradients, summed over the query heads that share a key/value head.

Each kernel has an outer tile on a parallel grid axis and an inner axis it accumulates over. Where the inner axis
lives depends on the target:
  "tpu" (Mosaic): inner tiles are an "arbitrary" grid axis; accumulators live in the output block, which stays
      in VMEM while its index does not change; tile bounds are read from SMEM.
  "gpu" (Triton): the grid is parallel only, so inner tiles are a loop inside the kernel over a block that holds
      them all; accumulators are loop carries in registers.
A tile the causal mask hides completely is skipped (its matmuls never run); tiles wholly below the diagonal
take a branch without the causal mask. On CPU the "tpu" kernels run in Pallas interpret mode (for tests).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lvm.attention.blockwise import Stats, Tiling, varying_like

F32 = jnp.float32
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the kernels run: the kernel `flavour` ("tpu" or "gpu") and whether Pallas interprets it."""

    flavour: str
    interpret: bool = False

    @property
    def min_tiles(self) -> tuple[int, int]:
        """Smallest (query, key) tile: TPU sublanes x lanes (key indices lie along lanes), GPU MMA shape."""
        return (8, 128) if self.flavour == "tpu" else (16, 16)

    def default_tiles(self, backward: bool) -> tuple[int, int]:
        if self.flavour == "tpu":
            return 512, 512
        return (64, 64) if backward else (128, 64)


def target_for(platform: str) -> Target:
    """The kernel target for a jax platform name ("tpu", "gpu"/"cuda"/"rocm", or "cpu" = interpret)."""
    if platform == "tpu":
        return Target("tpu")
    if platform in ("gpu", "cuda", "rocm"):
        return Target("gpu")
    return Target("tpu", interpret=True)


class Unsupported(ValueError):
    """The fused kernels cannot run these shapes on this target."""


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _tile_ok(target: Target, size: int, minimum: int) -> bool:
    if target.flavour == "gpu":
        return _is_pow2(size) and size >= minimum
    return size % minimum == 0


def _pick_tile(target: Target, run: int, want: int, minimum: int) -> int | None:
    """Largest tile <= `want` that divides the layout run and suits the target (None if there is none)."""
    for t in range(min(want, run), minimum - 1, -1):
        if run % t == 0 and _tile_ok(target, t, minimum):
            return t
    return None


def check_head_dim(target: Target, head_dim: int) -> None:
    ok = _is_pow2(head_dim) and 16 <= head_dim <= 256 if target.flavour == "gpu" else head_dim % 8 == 0
    if not ok:
        need = "a power of two in [16, 256]" if target.flavour == "gpu" else "a multiple of 8"
        raise Unsupported(
            f"head_dim={head_dim} is not supported by the fused {target.flavour} kernel (needs {need})"
        )


def resolve_tiles(target: Target, block_len: int, run: int, q_chunk, kv_chunk, head_dim: int) -> dict:
    """Forward and backward tiles for a local block of `block_len` tokens made of runs of `run` indices.

    Explicit chunks are used for both passes (checked); defaults are chosen per pass and target.
    Raises `Unsupported` with the reason when the fused kernels cannot run these shapes.
    """
    check_head_dim(target, head_dim)
    tiles = {}
    for backward in (False, True):
        pair = []
        for name, value, want, minimum in zip(
            ("q_chunk", "kv_chunk"),
            (q_chunk, kv_chunk),
            target.default_tiles(backward),
            target.min_tiles,
            strict=True,
        ):
            if value is None:
                value = _pick_tile(target, run, want, minimum)
                if value is None:
                    raise Unsupported(
                        f"no {name} for the fused {target.flavour} kernel divides the layout run of {run} tokens "
                        f"({'a power of two' if target.flavour == 'gpu' else 'a multiple of'} >= {minimum} "
                        "is needed); use longer sequences per device or kernel='xla'"
                    )
            elif block_len % value or not _tile_ok(target, value, minimum):
                kind = "a power of two" if target.flavour == "gpu" else "a multiple of"
                raise Unsupported(
                    f"{name}={value} does not suit the fused {target.flavour} kernel: it must divide the "
                    f"per-device block of {block_len} tokens and be {kind} >= {minimum}"
                )
            pair.append(int(value))
        tiles[backward] = tuple(pair)
    return tiles


# ----------------------------------------------------------------------------------------------------------
# Tile classification and the shared tile math


def _bounds(idx: jax.Array, tile: int) -> tuple[jax.Array, jax.Array]:
    """Lowest and highest global index of each tile of `idx` [n]: two int32 [n // tile]."""
    t = idx.reshape(-1, tile)
    return jnp.min(t, axis=1), jnp.max(t, axis=1)


def _visit(compute, carry, q_lo, q_hi, k_lo, k_hi, causal: bool):
    """`compute(carry, diagonal)` unless the causal mask hides the tile; `diagonal` says a causal mask is needed."""
    if not causal:
        return compute(carry, False)
    hidden = k_lo > q_hi
    below = k_hi <= q_lo
    return lax.cond(
        hidden,
        lambda c: c,
        lambda c: lax.cond(below, partial(compute, diagonal=False), partial(compute, diagonal=True), c),
        carry,
    )


def _mask(q_idx, k_idx, q_seg, k_seg, diagonal: bool):
    """[cq, ck] boolean mask (None when nothing is masked) from [cq, 1] and [1, ck] indices / segment ids."""
    mask = q_idx >= k_idx if diagonal else None
    if q_seg is not None:
        same = q_seg == k_seg
        mask = same if mask is None else mask & same
    return mask


def _scores(q, k, mask):
    s = lax.dot_general(q, k, NT, preferred_element_type=F32)
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _loop(n: int, body, carry):
    """fori_loop over n tiles; a single tile is visited with a static index (aligned slices for Mosaic)."""
    return body(0, carry) if n == 1 else lax.fori_loop(0, n, body, carry)


def _split_inner(target: Target, n_tiles: int) -> tuple[int, int]:
    """(grid steps, in-kernel loop steps) for an accumulated axis of `n_tiles` tiles."""
    return (n_tiles, 1) if target.flavour == "tpu" else (1, n_tiles)


def _bounds_spec(target: Target):
    if target.flavour == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec()


def _compiler_params(target: Target, semantics: tuple[str, ...], tile_elems: int):
    if target.interpret:
        return None
    if target.flavour == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=semantics)
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4 if tile_elems <= 64 * 64 else 8, num_stages=2)


def _call(kernel, target: Target, args, out_shape, **kw):
    """`pallas_call` whose operands and results all vary over the same manual mesh axes (inside shard_map)."""
    args = [varying_like(a, *args) for a in args]
    mat = jax.typeof(args[0]).manual_axis_type
    out_shape = [jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat) for shape, dtype in out_shape]
    return pl.pallas_call(kernel, interpret=target.interpret, out_shape=out_shape, **kw)(*args)


# ----------------------------------------------------------------------------------------------------------
# Forward


def _forward_kernel(*refs, causal, has_seg, n_loop, ck, counting):
    q_lo, q_hi, k_lo, k_hi, q_idx, k_idx, *refs = refs
    q_seg, k_seg, *refs = refs if has_seg else (None, None, *refs)
    q_ref, k_ref, v_ref, o_in, m_in, l_in, o_ref, m_ref, l_ref, *cnt = refs
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        o_ref[...], m_ref[...], l_ref[...] = o_in[...], m_in[...], l_in[...]
        if counting:
            cnt[0][...] = jnp.zeros(cnt[0].shape, jnp.int32)

    q, qi = q_ref[...], q_idx[...]
    qs = None if q_seg is None else q_seg[...]

    def tile(t, carry):
        kt = j * n_loop + t
        ks = pl.ds(pl.multiple_of(t * ck, ck), ck)

        def compute(carry, diagonal):
            o, m, l, n = carry  # noqa: E741
            mask = _mask(qi, k_idx[:, ks], qs, None if k_seg is None else k_seg[:, ks], diagonal)
            s = _scores(q, k_ref[ks, :], mask)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_safe)
            alpha = jnp.exp(m - m_safe)
            v = v_ref[ks, :]
            pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=F32)
            return alpha * o + pv, m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True), n + 1

        return _visit(compute, carry, q_lo[i], q_hi[i], k_lo[kt], k_hi[kt], causal)

    o, m, l, n = _loop(n_loop, tile, (o_ref[...], m_ref[...], l_ref[...], jnp.int32(0)))  # noqa: E741
    o_ref[...], m_ref[...], l_ref[...] = o, m, l
    if counting:
        cnt[0][...] += n


def _stats_layout(x, b, h, c):
    return x.reshape(b, h, c, -1)


def block_forward(q, k, v, q_idx, k_idx, q_seg, k_seg, stats: Stats, tiling: Tiling, *, target, count=False):
    """Fold key/value block (k, v) into `stats` (q pre-scaled); layouts as in `blockwise.block_forward`.

    Returns (stats, tiles computed per batch row and query head, summed over query tiles; 0 unless `count`).
    """
    b, hk, g, c, d = q.shape
    h, kv_len = hk * g, k.shape[2]
    cq, ck = tiling.q_chunk, tiling.kv_chunk
    n_grid, n_loop = _split_inner(target, kv_len // ck)
    kv_block = kv_len // n_grid
    has_seg = q_seg is not None
    qh = q.reshape(b, h, c, d)
    o, m, l = (_stats_layout(x, b, h, c) for x in stats)  # noqa: E741

    per_q = lambda w: pl.BlockSpec((None, None, cq, w), lambda bi, hi, i, j: (bi, hi, i, 0))
    per_kv = pl.BlockSpec((None, None, kv_block, d), lambda bi, hi, i, j: (bi, lax.div(hi, g), j, 0))
    bounds = _bounds_spec(target)
    in_specs = [bounds] * 4 + [
        pl.BlockSpec((cq, 1), lambda bi, hi, i, j: (i, 0)),
        pl.BlockSpec((1, kv_block), lambda bi, hi, i, j: (0, j)),
    ]
    args = [*_bounds(q_idx, cq), *_bounds(k_idx, ck), q_idx[:, None], k_idx[None, :]]
    if has_seg:
        in_specs += [
            pl.BlockSpec((None, cq, 1), lambda bi, hi, i, j: (bi, i, 0)),
            pl.BlockSpec((None, 1, kv_block), lambda bi, hi, i, j: (bi, 0, j)),
        ]
        args += [q_seg[:, :, None], k_seg[:, None, :]]
    in_specs += [per_q(d), per_kv, per_kv, per_q(d), per_q(1), per_q(1)]
    args += [qh, k, v, o, m, l]
    out_shape = [(x.shape, F32) for x in (o, m, l)]
    out_specs = [per_q(d), per_q(1), per_q(1)]
    nq = c // cq
    if count:
        out_shape.append(((b, h, nq, 8, 128), jnp.int32))
        out_specs.append(pl.BlockSpec((None, None, None, 8, 128), lambda bi, hi, i, j: (bi, hi, i, 0, 0)))
    first_state = len(args) - 3
    kernel = partial(
        _forward_kernel, causal=tiling.causal, has_seg=has_seg, n_loop=n_loop, ck=ck, counting=count
    )
    outs = _call(
        kernel,
        target,
        args,
        out_shape,
        grid=(b, h, nq, n_grid),
        in_specs=in_specs,
        out_specs=out_specs,
        input_output_aliases={first_state + n: n for n in range(3)},
        compiler_params=_compiler_params(target, ("parallel", "parallel", "parallel", "arbitrary"), cq * ck),
    )
    new = Stats(
        outs[0].reshape(stats.o.shape), outs[1].reshape(stats.m.shape), outs[2].reshape(stats.l.shape)
    )
    tiles = outs[3][:, :, :, 0, 0].sum(axis=2) if count else None
    return new, tiles


# ----------------------------------------------------------------------------------------------------------
# Backward: dq (queries outer, keys inner) and dk/dv (keys outer, query heads of the group and queries inner)


def _probs_and_ds(q, k, v, do, lse, delta, mask):
    """Softmax probabilities of the tile from the global log-sum-exp, and dScores (in q's dtype)."""
    p = jnp.exp(_scores(q, k, mask) - lse)
    dp = lax.dot_general(do, v, NT, preferred_element_type=F32)
    return p, (p * (dp - delta)).astype(q.dtype)


def _dq_kernel(*refs, causal, has_seg, n_loop, ck):
    q_lo, q_hi, k_lo, k_hi, q_idx, k_idx, *refs = refs
    q_seg, k_seg, *refs = refs if has_seg else (None, None, *refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_in, dq_ref = refs
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        dq_ref[...] = dq_in[...]

    q, do, lse, delta, qi = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...], q_idx[...]
    qs = None if q_seg is None else q_seg[...]

    def tile(t, dq):
        kt = j * n_loop + t
        ks = pl.ds(pl.multiple_of(t * ck, ck), ck)

        def compute(dq, diagonal):
            k = k_ref[ks, :]
            mask = _mask(qi, k_idx[:, ks], qs, None if k_seg is None else k_seg[:, ks], diagonal)
            _, ds = _probs_and_ds(q, k, v_ref[ks, :], do, lse, delta, mask)
            return dq + lax.dot_general(ds, k, (((1,), (0,)), ((), ())), preferred_element_type=F32)

        return _visit(compute, dq, q_lo[i], q_hi[i], k_lo[kt], k_hi[kt], causal)

    dq_ref[...] = _loop(n_loop, tile, dq_ref[...])


def _dkv_kernel(*refs, causal, has_seg, n_loop_g, n_loop_q, cq):
    q_lo, q_hi, k_lo, k_hi, q_idx, k_idx, *refs = refs
    q_seg, k_seg, *refs = refs if has_seg else (None, None, *refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    j, gi, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((gi == 0) & (i == 0))
    def _():
        dk_ref[...] = jnp.zeros(dk_ref.shape, F32)
        dv_ref[...] = jnp.zeros(dv_ref.shape, F32)

    k, v, ki = k_ref[...], v_ref[...], k_idx[...]
    ks = None if k_seg is None else k_seg[...]

    def tile(t, carry):
        gs, tq = (0, t) if n_loop_g == 1 else (lax.div(t, n_loop_q), lax.rem(t, n_loop_q))
        qt = i * n_loop_q + tq
        rows = pl.ds(pl.multiple_of(tq * cq, cq), cq)

        def compute(carry, diagonal):
            dk, dv = carry
            q, do = q_ref[gs, rows, :], do_ref[gs, rows, :]
            mask = _mask(q_idx[rows, :], ki, None if q_seg is None else q_seg[rows, :], ks, diagonal)
            p, ds = _probs_and_ds(q, k, v, do, lse_ref[gs, rows, :], delta_ref[gs, rows, :], mask)
            dv = dv + lax.dot_general(p.astype(do.dtype), do, TN, preferred_element_type=F32)
            return dk + lax.dot_general(ds, q, TN, preferred_element_type=F32), dv

        return _visit(compute, carry, q_lo[qt], q_hi[qt], k_lo[j], k_hi[j], causal)

    dk, dv = _loop(n_loop_g * n_loop_q, tile, (dk_ref[...], dv_ref[...]))
    dk_ref[...], dv_ref[...] = dk, dv


def block_backward(q, k, v, do, lse, delta, q_idx, k_idx, q_seg, k_seg, dq, tiling: Tiling, *, target):
    """Gradients of the local queries' attention to block (k, v); contract of `blockwise.block_backward`."""
    b, hk, g, c, d = q.shape
    h, kv_len = hk * g, k.shape[2]
    cq, ck = tiling.q_chunk, tiling.kv_chunk
    has_seg = q_seg is not None
    qh, doh = q.reshape(b, h, c, d), do.reshape(b, h, c, d)
    lse4, delta4 = (_stats_layout(x, b, h, c) for x in (lse, delta))
    bounds = [*_bounds(q_idx, cq), *_bounds(k_idx, ck)]
    idx = [q_idx[:, None], k_idx[None, :]]
    seg = [q_seg[:, :, None], k_seg[:, None, :]] if has_seg else []

    # dq: grid (b, h, query tiles, key blocks)
    n_grid, n_loop = _split_inner(target, kv_len // ck)
    kv_block = kv_len // n_grid
    per_q = lambda w: pl.BlockSpec((None, None, cq, w), lambda bi, hi, i, j: (bi, hi, i, 0))
    per_kv = pl.BlockSpec((None, None, kv_block, d), lambda bi, hi, i, j: (bi, lax.div(hi, g), j, 0))
    in_specs = [_bounds_spec(target)] * 4 + [
        pl.BlockSpec((cq, 1), lambda bi, hi, i, j: (i, 0)),
        pl.BlockSpec((1, kv_block), lambda bi, hi, i, j: (0, j)),
    ]
    if has_seg:
        in_specs += [
            pl.BlockSpec((None, cq, 1), lambda bi, hi, i, j: (bi, i, 0)),
            pl.BlockSpec((None, 1, kv_block), lambda bi, hi, i, j: (bi, 0, j)),
        ]
    in_specs += [per_q(d), per_kv, per_kv, per_q(d), per_q(1), per_q(1), per_q(d)]
    args = [*bounds, *idx, *seg, qh, k, v, doh, lse4, delta4, dq.reshape(b, h, c, d)]
    (dq_new,) = _call(
        partial(_dq_kernel, causal=tiling.causal, has_seg=has_seg, n_loop=n_loop, ck=ck),
        target,
        args,
        [((b, h, c, d), F32)],
        grid=(b, h, c // cq, n_grid),
        in_specs=in_specs,
        out_specs=[per_q(d)],
        input_output_aliases={len(args) - 1: 0},
        compiler_params=_compiler_params(target, ("parallel", "parallel", "parallel", "arbitrary"), cq * ck),
    )

    # dk/dv: grid (b, kv heads, key tiles, query heads of the group, query blocks)
    g_grid, g_loop = _split_inner(target, g)
    q_grid, q_loop = _split_inner(target, c // cq)
    g_block, q_block = g // g_grid, c // q_grid
    per_qg = lambda w: pl.BlockSpec(
        (None, g_block, q_block, w), lambda bi, hi, j, gi, i: (bi, hi * g_grid + gi, i, 0)
    )
    per_k = pl.BlockSpec((None, None, ck, d), lambda bi, hi, j, gi, i: (bi, hi, j, 0))
    in_specs = [_bounds_spec(target)] * 4 + [
        pl.BlockSpec((q_block, 1), lambda bi, hi, j, gi, i: (i, 0)),
        pl.BlockSpec((1, ck), lambda bi, hi, j, gi, i: (0, j)),
    ]
    if has_seg:
        in_specs += [
            pl.BlockSpec((None, q_block, 1), lambda bi, hi, j, gi, i: (bi, i, 0)),
            pl.BlockSpec((None, 1, ck), lambda bi, hi, j, gi, i: (bi, 0, j)),
        ]
    in_specs += [per_qg(d), per_k, per_k, per_qg(d), per_qg(1), per_qg(1)]
    dk, dv = _call(
        partial(_dkv_kernel, causal=tiling.causal, has_seg=has_seg, n_loop_g=g_loop, n_loop_q=q_loop, cq=cq),
        target,
        [*bounds, *idx, *seg, qh, k, v, doh, lse4, delta4],
        [(k.shape, F32)] * 2,
        grid=(b, hk, kv_len // ck, g_grid, q_grid),
        in_specs=in_specs,
        out_specs=[per_k, per_k],
        compiler_params=_compiler_params(
            target, ("parallel", "parallel", "parallel", "arbitrary", "arbitrary"), cq * ck
        ),
    )
    return dq_new.reshape(dq.shape), dk, dv
