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
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lvm.attention.blockwise import Stats, Tiling, varying_like

F32 = jnp.float32
NN = (((1,), (0,)), ((), ()))  # a @ b
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the kernels run: the kernel `flavour` ("tpu" or "gpu") and whether Pallas interprets it."""

    flavour: str
    interpret: bool = False

    def tile_ok(self, size: int, axis: int) -> bool:
        """Whether `size` suits the query (axis 0) or key (axis 1) tiles: TPU tiles are whole sublanes (8) for
        queries and whole lanes (128) for keys, whose indices lie along lanes, and fit VMEM; GPU (Triton) tiles
        are powers of two that fit registers."""
        if self.flavour == "gpu":
            return _is_pow2(size) and 16 <= size <= 256
        return size % (8, 128)[axis] == 0 and size <= 1024

    def tile_rule(self, axis: int) -> str:
        if self.flavour == "gpu":
            return "a power of two from 16 to 256"
        return f"a multiple of {(8, 128)[axis]} up to 1024"

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


def check_head_dim(target: Target, head_dim: int) -> None:
    ok = _is_pow2(head_dim) and 16 <= head_dim <= 256 if target.flavour == "gpu" else head_dim % 8 == 0
    if not ok:
        need = "a power of two in [16, 256]" if target.flavour == "gpu" else "a multiple of 8"
        raise Unsupported(
            f"head_dim={head_dim} is not supported by the fused {target.flavour} kernel (needs {need})"
        )


def resolve_tiles(target: Target, block_len: int, run: int, q_chunk, kv_chunk, head_dim: int) -> dict:
    """{backward: (q tile, kv tile)} for a local block of `block_len` tokens made of runs of `run` indices.

    Explicit chunks are used for both passes (checked); defaults are the largest suitable divisors of the run
    up to the target's preferred tiles. Raises `Unsupported` with the reason when the kernels cannot run.
    """
    check_head_dim(target, head_dim)
    tiles = {}
    for backward in (False, True):
        pair = []
        for axis, (name, value) in enumerate((("q_chunk", q_chunk), ("kv_chunk", kv_chunk))):
            rule = f"{target.tile_rule(axis)} for the fused {target.flavour} kernel"
            if value is None:
                want = target.default_tiles(backward)[axis]
                fits = [t for t in range(min(want, run), 0, -1) if run % t == 0 and target.tile_ok(t, axis)]
                if not fits:
                    raise Unsupported(
                        f"no {name} divides the layout run of {run} tokens and is {rule}; use longer "
                        "sequences per device or kernel='xla'"
                    )
                value = fits[0]
            elif block_len % value or not target.tile_ok(value, axis):
                raise Unsupported(
                    f"{name}={value} must divide the per-device block of {block_len} tokens and be {rule}; "
                    "unset it for the kernel's default or use kernel='xla'"
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


def _visit(compute, carry, q_lo, q_hi, k_lo, k_hi):
    """`compute(carry, diagonal)` unless the causal mask hides the tile; `diagonal` says a causal mask is needed."""
    hidden = k_lo > q_hi
    below = k_hi <= q_lo
    return lax.cond(
        hidden,
        lambda c: c,
        lambda c: lax.cond(below, partial(compute, diagonal=False), partial(compute, diagonal=True), c),
        carry,
    )


def _spans(outer_lo, outer_hi, inner_lo, inner_hi, queries_outer: bool):
    """GPU schedule: split points (a, b) [n_outer] of the inner tiles of each outer tile.

    Global indices increase along each block in every layout, so with queries outside the inner key tiles are
    [0, a) wholly visible, [a, b) diagonal, [b, n) hidden; with keys outside the inner query tiles are [0, a)
    hidden, [a, b) diagonal, [b, n) wholly visible.
    """
    count = lambda cond: jnp.sum(cond, axis=1, dtype=jnp.int32)
    if queries_outer:  # outer = query tiles, inner = key tiles
        a = count(inner_hi[None, :] <= outer_lo[:, None])
        b = count(inner_lo[None, :] <= outer_hi[:, None])
    else:  # outer = key tiles, inner = query tiles
        a = count(inner_hi[None, :] < outer_lo[:, None])
        b = count(inner_lo[None, :] < outer_hi[:, None])
    return a, b


def _sweep(step, carry, sched, outer, inner, n_loop, causal: bool, tpu: bool, queries_outer: bool):
    """Visit this grid step's inner tiles with `step(t, carry, diagonal)`, skipping tiles the mask hides.

    TPU: one inner tile per grid step (n_loop == 1), classified from the tile bounds in SMEM.
    GPU: every inner tile in loops over the ranges of `_spans` (plain loops that Triton can pipeline).
    """
    if not causal:
        return _loop(0, n_loop, partial(step, diagonal=False), carry)
    if tpu:
        q_lo, q_hi, k_lo, k_hi = sched
        qt, kt = (outer, inner) if queries_outer else (inner, outer)
        return _visit(partial(step, 0), carry, q_lo[qt], q_hi[qt], k_lo[kt], k_hi[kt])
    a, b = sched[0][outer], sched[1][outer]
    carry = _loop(a, b, partial(step, diagonal=True), carry)
    return (
        _loop(0, a, partial(step, diagonal=False), carry)
        if queries_outer
        else _loop(b, n_loop, partial(step, diagonal=False), carry)
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


def _loop(lo, hi, body, carry):
    """fori_loop over tiles [lo, hi); a single static tile is visited with a static index (aligned for Mosaic)."""
    if isinstance(lo, int) and isinstance(hi, int) and hi - lo == 1:
        return body(lo, carry)
    return lax.fori_loop(lo, hi, body, carry)


def _split_inner(target: Target, n_tiles: int) -> tuple[int, int]:
    """(grid steps, in-kernel loop steps) for an accumulated axis of `n_tiles` tiles."""
    return (n_tiles, 1) if target.flavour == "tpu" else (1, n_tiles)


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
# Operands shared by the three kernels


class _Operands(NamedTuple):
    """Schedule, index and segment operands of one kernel, with their BlockSpecs."""

    args: list
    specs: list


def _schedule_and_indices(target, q_idx, k_idx, q_seg, k_seg, cq, ck, q_block, kv_block, queries_outer, maps):
    """The tile schedule (TPU: tile bounds in SMEM; GPU: `_spans`), global indices [c, 1] / [1, kv] and segment
    ids [b, c, 1] / [b, 1, kv]. `maps` = (query block index, key block index) as functions of the grid."""
    q_map, k_map = maps
    (q_lo, q_hi), (k_lo, k_hi) = _bounds(q_idx, cq), _bounds(k_idx, ck)
    if target.flavour == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        sched = [q_lo, q_hi, k_lo, k_hi]
        sched_spec = pl.BlockSpec(memory_space=pltpu.SMEM)
    else:
        outer = (q_lo, q_hi, k_lo, k_hi) if queries_outer else (k_lo, k_hi, q_lo, q_hi)
        sched = list(_spans(*outer, queries_outer))
        sched_spec = pl.BlockSpec()
    args = [*sched, q_idx[:, None], k_idx[None, :]]
    specs = [sched_spec] * len(sched) + [
        pl.BlockSpec((q_block, 1), lambda *g: (q_map(*g), 0)),
        pl.BlockSpec((1, kv_block), lambda *g: (0, k_map(*g))),
    ]
    if q_seg is not None:
        args += [q_seg[:, :, None], k_seg[:, None, :]]
        specs += [
            pl.BlockSpec((None, q_block, 1), lambda bi, *g: (bi, q_map(bi, *g), 0)),
            pl.BlockSpec((None, 1, kv_block), lambda bi, *g: (bi, 0, k_map(bi, *g))),
        ]
    return _Operands(args, specs)


def _unpack(refs, tpu: bool, has_seg: bool):
    """(schedule refs, q_idx, k_idx, q_seg, k_seg, remaining refs) of a kernel's argument list."""
    n_sched = 4 if tpu else 2
    sched, (q_idx, k_idx), refs = refs[:n_sched], refs[n_sched : n_sched + 2], refs[n_sched + 2 :]
    if has_seg:
        return sched, q_idx, k_idx, refs[0], refs[1], refs[2:]
    return sched, q_idx, k_idx, None, None, refs


def _queries_outer(target, q_idx, k_idx, q_seg, k_seg, tiling: Tiling, g: int, d: int, kv_len: int):
    """Operands and BlockSpecs of the kernels with grid (b, h, query tiles, key blocks): the forward and dq.

    Returns (operands, per-query-tile spec for a trailing width, per-key-block spec, key blocks, loop steps)."""
    cq, ck = tiling.q_chunk, tiling.kv_chunk
    n_grid, n_loop = _split_inner(target, kv_len // ck)
    kv_block = kv_len // n_grid
    maps = (lambda b, h, i, j: i, lambda b, h, i, j: j)
    ops = _schedule_and_indices(target, q_idx, k_idx, q_seg, k_seg, cq, ck, cq, kv_block, True, maps)
    per_q = lambda w: pl.BlockSpec((None, None, cq, w), lambda bi, hi, i, j: (bi, hi, i, 0))
    per_kv = pl.BlockSpec((None, None, kv_block, d), lambda bi, hi, i, j: (bi, lax.div(hi, g), j, 0))
    return ops, per_q, per_kv, n_grid, n_loop


# ----------------------------------------------------------------------------------------------------------
# Forward


def _forward_kernel(*refs, causal, tpu, has_seg, n_loop, ck, counting):
    sched, q_idx, k_idx, q_seg, k_seg, refs = _unpack(refs, tpu, has_seg)
    q_ref, k_ref, v_ref, o_in, m_in, l_in, o_ref, m_ref, l_ref, *cnt = refs
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        o_ref[...], m_ref[...], l_ref[...] = o_in[...], m_in[...], l_in[...]
        if counting:
            cnt[0][...] = jnp.zeros(cnt[0].shape, jnp.int32)

    q, qi = q_ref[...], q_idx[...]
    qs = None if q_seg is None else q_seg[...]

    def step(t, carry, diagonal):
        o, m, l, n = carry  # noqa: E741
        ks = pl.ds(pl.multiple_of(t * ck, ck), ck)
        mask = _mask(qi, k_idx[:, ks], qs, None if k_seg is None else k_seg[:, ks], diagonal)
        s = _scores(q, k_ref[ks, :], mask)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe)
        alpha = jnp.exp(m - m_safe)
        v = v_ref[ks, :]
        pv = lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=F32)
        return alpha * o + pv, m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True), n + 1

    carry = (o_ref[...], m_ref[...], l_ref[...], jnp.int32(0))
    o, m, l, n = _sweep(step, carry, sched, i, j, n_loop, causal, tpu, queries_outer=True)  # noqa: E741
    o_ref[...], m_ref[...], l_ref[...] = o, m, l
    if counting:
        cnt[0][...] += n


def _per_head(x, b, h, c):
    """[b, hk, g, c, ...] -> [b, h, c, d or 1] (query heads flattened; statistics get a trailing unit axis)."""
    return x.reshape(b, h, c, -1)


def block_forward(q, k, v, q_idx, k_idx, q_seg, k_seg, stats: Stats, tiling: Tiling, *, target, count=False):
    """Fold key/value block (k, v) into `stats` (q pre-scaled); layouts as in `blockwise.block_forward`.

    Global indices must increase along each block (true of every layout). Returns (stats, score tiles computed
    per batch row and query head [b, h], or None unless `count`).
    """
    b, hk, g, c, d = q.shape
    h, kv_len = hk * g, k.shape[2]
    cq, ck = tiling.q_chunk, tiling.kv_chunk
    nq = c // cq
    ops, per_q, per_kv, n_grid, n_loop = _queries_outer(
        target, q_idx, k_idx, q_seg, k_seg, tiling, g, d, kv_len
    )
    state = [_per_head(x, b, h, c) for x in stats]
    args = [*ops.args, q.reshape(b, h, c, d), k, v, *state]
    out_shape = [(x.shape, F32) for x in state]
    out_specs = [per_q(d), per_q(1), per_q(1)]
    if count:
        out_shape.append(((b, h, nq, 8, 128), jnp.int32))
        out_specs.append(pl.BlockSpec((None, None, None, 8, 128), lambda bi, hi, i, j: (bi, hi, i, 0, 0)))
    kernel = partial(
        _forward_kernel,
        causal=tiling.causal,
        tpu=target.flavour == "tpu",
        has_seg=q_seg is not None,
        n_loop=n_loop,
        ck=ck,
        counting=count,
    )
    outs = _call(
        kernel,
        target,
        args,
        out_shape,
        grid=(b, h, nq, n_grid),
        in_specs=[*ops.specs, per_q(d), per_kv, per_kv, per_q(d), per_q(1), per_q(1)],
        out_specs=out_specs,
        input_output_aliases={len(args) - 3 + n: n for n in range(3)},
        compiler_params=_compiler_params(target, ("parallel", "parallel", "parallel", "arbitrary"), cq * ck),
    )
    new = Stats(*(x.reshape(old.shape) for x, old in zip(outs[:3], stats, strict=True)))
    return new, (outs[3][:, :, :, 0, 0].sum(axis=2) if count else None)


# ----------------------------------------------------------------------------------------------------------
# Backward: dq (queries outer, keys inner) and dk/dv (keys outer, query heads of the group and queries inner)


def _probs_and_ds(q, k, v, do, lse, delta, mask):
    """Softmax probabilities of the tile from the global log-sum-exp, and dScores (in q's dtype)."""
    p = jnp.exp(_scores(q, k, mask) - lse)
    dp = lax.dot_general(do, v, NT, preferred_element_type=F32)
    return p, (p * (dp - delta)).astype(q.dtype)


def _dq_kernel(*refs, causal, tpu, has_seg, n_loop, ck):
    sched, q_idx, k_idx, q_seg, k_seg, refs = _unpack(refs, tpu, has_seg)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_in, dq_ref = refs
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        dq_ref[...] = dq_in[...]

    q, do, lse, delta, qi = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...], q_idx[...]
    qs = None if q_seg is None else q_seg[...]

    def step(t, dq, diagonal):
        ks = pl.ds(pl.multiple_of(t * ck, ck), ck)
        k = k_ref[ks, :]
        mask = _mask(qi, k_idx[:, ks], qs, None if k_seg is None else k_seg[:, ks], diagonal)
        _, ds = _probs_and_ds(q, k, v_ref[ks, :], do, lse, delta, mask)
        return dq + lax.dot_general(ds, k, NN, preferred_element_type=F32)

    dq_ref[...] = _sweep(step, dq_ref[...], sched, i, j, n_loop, causal, tpu, queries_outer=True)


def _dkv_kernel(*refs, causal, tpu, has_seg, n_loop_g, n_loop_q, cq):
    sched, q_idx, k_idx, q_seg, k_seg, refs = _unpack(refs, tpu, has_seg)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    j, gi, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((gi == 0) & (i == 0))
    def _():
        dk_ref[...] = jnp.zeros(dk_ref.shape, F32)
        dv_ref[...] = jnp.zeros(dv_ref.shape, F32)

    k, v, ki = k_ref[...], v_ref[...], k_idx[...]
    ks = None if k_seg is None else k_seg[...]

    def head(gs, carry):
        def step(t, carry, diagonal):
            dk, dv = carry
            rows = pl.ds(pl.multiple_of(t * cq, cq), cq)
            q, do = q_ref[gs, rows, :], do_ref[gs, rows, :]
            mask = _mask(q_idx[rows, :], ki, None if q_seg is None else q_seg[rows, :], ks, diagonal)
            p, ds = _probs_and_ds(q, k, v, do, lse_ref[gs, rows, :], delta_ref[gs, rows, :], mask)
            dv = dv + lax.dot_general(p.astype(do.dtype), do, TN, preferred_element_type=F32)
            return dk + lax.dot_general(ds, q, TN, preferred_element_type=F32), dv

        return _sweep(step, carry, sched, j, i, n_loop_q, causal, tpu, queries_outer=False)

    dk_ref[...], dv_ref[...] = _loop(0, n_loop_g, head, (dk_ref[...], dv_ref[...]))


def block_backward(q, k, v, do, lse, delta, q_idx, k_idx, q_seg, k_seg, dq, tiling: Tiling, *, target):
    """Gradients of the local queries' attention to block (k, v); contract of `blockwise.block_backward`."""
    b, hk, g, c, d = q.shape
    h, kv_len = hk * g, k.shape[2]
    cq, ck = tiling.q_chunk, tiling.kv_chunk
    tpu, has_seg = target.flavour == "tpu", q_seg is not None
    qh, doh = q.reshape(b, h, c, d), do.reshape(b, h, c, d)
    lse4, delta4 = (_per_head(x, b, h, c) for x in (lse, delta))

    # dq: grid (b, h, query tiles, key blocks)
    ops, per_q, per_kv, n_grid, n_loop = _queries_outer(
        target, q_idx, k_idx, q_seg, k_seg, tiling, g, d, kv_len
    )
    args = [*ops.args, qh, k, v, doh, lse4, delta4, dq.reshape(b, h, c, d)]
    (dq_new,) = _call(
        partial(_dq_kernel, causal=tiling.causal, tpu=tpu, has_seg=has_seg, n_loop=n_loop, ck=ck),
        target,
        args,
        [((b, h, c, d), F32)],
        grid=(b, h, c // cq, n_grid),
        in_specs=[*ops.specs, per_q(d), per_kv, per_kv, per_q(d), per_q(1), per_q(1), per_q(d)],
        out_specs=[per_q(d)],
        input_output_aliases={len(args) - 1: 0},
        compiler_params=_compiler_params(target, ("parallel", "parallel", "parallel", "arbitrary"), cq * ck),
    )

    # dk/dv: grid (b, kv heads, key tiles, query heads of the group, query blocks)
    g_grid, g_loop = _split_inner(target, g)
    q_grid, q_loop = _split_inner(target, c // cq)
    g_block, q_block = g // g_grid, c // q_grid
    ops = _schedule_and_indices(
        target,
        q_idx,
        k_idx,
        q_seg,
        k_seg,
        cq,
        ck,
        q_block,
        ck,
        False,
        (lambda b, h, j, gi, i: i, lambda b, h, j, gi, i: j),
    )
    per_qg = lambda w: pl.BlockSpec(
        (None, g_block, q_block, w), lambda bi, hi, j, gi, i: (bi, hi * g_grid + gi, i, 0)
    )
    per_k = pl.BlockSpec((None, None, ck, d), lambda bi, hi, j, gi, i: (bi, hi, j, 0))
    dk, dv = _call(
        partial(
            _dkv_kernel,
            causal=tiling.causal,
            tpu=tpu,
            has_seg=has_seg,
            n_loop_g=g_loop,
            n_loop_q=q_loop,
            cq=cq,
        ),
        target,
        [*ops.args, qh, k, v, doh, lse4, delta4],
        [(k.shape, F32)] * 2,
        grid=(b, hk, kv_len // ck, g_grid, q_grid),
        in_specs=[*ops.specs, per_qg(d), per_k, per_k, per_qg(d), per_qg(1), per_qg(1)],
        out_specs=[per_k, per_k],
        compiler_params=_compiler_params(
            target, ("parallel", "parallel", "parallel", "arbitrary", "arbitrary"), cq * ck
        ),
    )
    return dq_new.reshape(dq.shape), dk, dv
