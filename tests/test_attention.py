"""Ring attention against a dense reference: forward, gradients, layouts, compiled program, load balance."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_mesh
from jax.sharding import PartitionSpec as P

from lvm.attention import (
    dense_attention,
    from_layout,
    global_permutation,
    ring_block_counts,
    sharded_attention,
    to_layout,
)


def packed_segments(rng, batch, seq, max_docs=5):
    """Segment ids of packed documents with uneven lengths; ids are arbitrary ints (0 included, not ordered)."""
    out = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq), size=rng.integers(1, max_docs), replace=False))
        ids = rng.permutation(10)[: len(cuts) + 1]  # e.g. [3, 0, 7]: equality only, 0 is ordinary
        out[b] = np.repeat(ids, np.diff(np.concatenate([[0], cuts, [seq]])))
    return out


def numpy_attention(q, k, v, causal, seg):
    """Independent float64 reference."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, s, h, d = q.shape
    k = np.repeat(k, h // k.shape[2], axis=2)
    v = np.repeat(v, h // v.shape[2], axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    mask = np.ones((b, 1, s, s), bool)
    if causal:
        mask &= np.tril(np.ones((s, s), bool))
    if seg is not None:
        mask &= seg[:, None, :, None] == seg[:, None, None, :]
    scores = np.where(mask, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


def random_qkv(seed, b, s, h, hk, d, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, s, h, d), dtype)
    k = jax.random.normal(keys[1], (b, s, hk, d), dtype)
    v = jax.random.normal(keys[2], (b, s, hk, d), dtype)
    cot = jax.random.normal(keys[3], (b, s, h, d), dtype)
    return q, k, v, cot


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def value_and_grads(attn, q, k, v, cot):
    out, vjp = jax.vjp(attn, q, k, v)
    return out, vjp(cot)


# Seeded sweep: (sp, causal, layout, batch, seq, heads, kv_heads, head_dim, q_chunk, kv_chunk, segments)
CASES = [
    (1, True, "zigzag", 2, 96, 4, 2, 16, 32, 16, True),
    (2, True, "zigzag", 1, 128, 4, 1, 16, None, None, True),
    (2, False, "zigzag", 2, 64, 2, 2, 8, 8, 16, True),
    (4, True, "zigzag", 2, 192, 6, 3, 16, None, None, True),
    (4, False, "contiguous", 1, 128, 4, 4, 32, 16, 8, False),
    (4, True, "contiguous", 2, 128, 4, 2, 16, 16, 32, True),
    (8, True, "zigzag", 1, 256, 4, 2, 16, 8, 16, True),
    (8, False, "zigzag", 2, 128, 2, 1, 16, None, None, True),
]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"sp{c[0]}-{'causal' if c[1] else 'full'}-{c[2]}-s{c[4]}"
)
def test_matches_dense_forward_and_grads(case):
    sp, causal, layout, b, s, h, hk, d, cq, ck, use_seg = case
    rng = np.random.default_rng(sp * 100 + s)
    q, k, v, cot = random_qkv(sp + s, b, s, h, hk, d)
    seg = jnp.asarray(packed_segments(rng, b, s)) if use_seg else None
    mesh = make_mesh((sp,), ("sp",))
    ring = lambda q, k, v: sharded_attention(
        q, k, v, mesh, causal=causal, segment_ids=seg, layout=layout, q_chunk=cq, kv_chunk=ck
    )
    dense = lambda q, k, v: dense_attention(q, k, v, causal=causal, segment_ids=seg)
    out, grads = jax.jit(lambda *a: value_and_grads(ring, *a))(q, k, v, cot)
    ref_out, ref_grads = value_and_grads(dense, q, k, v, cot)

    assert rel_err(out, numpy_attention(q, k, v, causal, None if seg is None else np.asarray(seg))) < 1e-5
    assert rel_err(out, ref_out) < 1e-5
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        assert rel_err(g, rg) < 1e-5, name


def test_bfloat16_within_bf16_tolerance():
    b, s, h, hk, d = 1, 256, 4, 2, 32
    q, k, v, cot = random_qkv(7, b, s, h, hk, d, jnp.bfloat16)
    seg = jnp.asarray(packed_segments(np.random.default_rng(0), b, s))
    mesh = make_mesh((4,), ("sp",))
    ring = lambda q, k, v: sharded_attention(q, k, v, mesh, segment_ids=seg, q_chunk=16, kv_chunk=16)
    out, grads = jax.jit(lambda *a: value_and_grads(ring, *a))(q, k, v, cot)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, cot)]
    dense = lambda q, k, v: dense_attention(q, k, v, segment_ids=seg)
    ref_out, ref_grads = value_and_grads(dense, *f32)
    assert rel_err(out, ref_out) < 2e-2
    for g, rg in zip(grads, ref_grads, strict=True):
        assert rel_err(g, rg) < 3e-2


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_layout_round_trip_matches_permutation(layout):
    n, s = 4, 64
    mesh = make_mesh((n,), ("sp",))
    x = jnp.arange(2 * s).reshape(2, s)
    shard = lambda f: jax.shard_map(f, mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp"))
    laid = jax.jit(shard(lambda x: to_layout(x, "sp", layout)))(x)
    np.testing.assert_array_equal(laid, x[:, global_permutation(s, n, layout)])
    back = jax.jit(shard(lambda x: from_layout(x, "sp", layout)))(laid)
    np.testing.assert_array_equal(back, x)


def block_counts(n, layout, s=256, chunk=None):
    """Score tiles computed per (device, ring step) by the real forward kernel: int [n, n]."""
    mesh = make_mesh((n,), ("sp",))
    q, k, v, _ = random_qkv(0, 1, s, 2, 2, 8)

    def local(q, k, v):
        return ring_block_counts(q, k, v, causal=True, layout=layout, q_chunk=chunk, kv_chunk=chunk)[None]

    fn = jax.shard_map(local, mesh=mesh, in_specs=P(None, "sp"), out_specs=P("sp"))
    return np.asarray(jax.jit(fn)(q, k, v))


@pytest.mark.parametrize("n,chunk", [(4, None), (8, None), (4, 8)])
def test_zigzag_balances_causal_work(n, chunk):
    counts = block_counts(n, "zigzag", chunk=chunk)
    # every device computes the same number of tiles at every ring step
    assert (counts == counts[0:1]).all(), counts
    # and causal skipping saves work: about half of all tiles
    tiles_per_step = (256 // n // (chunk or 256 // n // 2)) ** 2
    assert counts.sum() < 0.6 * tiles_per_step * n * n


def test_contiguous_layout_is_unbalanced():
    counts = block_counts(4, "contiguous")
    assert not (counts == counts[0:1]).all()
    assert counts[0, 1:].sum() == 0  # device 0 only ever attends to itself


def _hlo_shapes(text):
    return [tuple(int(x) for x in dims.split(",") if x) for dims in re.findall(r"\[([\d,]+)\]", text)]


def test_compiled_program_rotates_kv_without_gather_or_big_buffers():
    n, b, s, h, hk, d, chunk = 4, 1, 1024, 4, 2, 16, 32
    mesh = make_mesh((n,), ("sp",))
    q, k, v, cot = random_qkv(0, b, s, h, hk, d)
    seg = jnp.zeros((b, s), jnp.int32)
    ring = lambda q, k, v: sharded_attention(q, k, v, mesh, segment_ids=seg, q_chunk=chunk, kv_chunk=chunk)
    hlo = jax.jit(lambda *a: value_and_grads(ring, *a)).lower(q, k, v, cot).compile().as_text()
    assert "collective-permute" in hlo
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    block = s // n
    # No buffer holds scores for more than a chunk x chunk tile: never two dimensions as long as a layout run.
    for shape in _hlo_shapes(hlo):
        assert sum(dim >= block // 2 for dim in shape) <= 1, shape
    tile = b * h * chunk * chunk
    assert max(np.prod(sh) for sh in _hlo_shapes(hlo)) <= max(tile, b * (s // n) * h * d * 2)


def test_bad_chunk_and_heads_fail_before_compiling():
    mesh = make_mesh((4,), ("sp",))
    q, k, v, _ = random_qkv(0, 1, 64, 4, 3, 8)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        sharded_attention(q, k, v, mesh)
    q, k, v, _ = random_qkv(0, 1, 64, 4, 2, 8)
    with pytest.raises(ValueError, match="q_chunk=5 must be a positive divisor"):
        sharded_attention(q, k, v, mesh, q_chunk=5)
    with pytest.raises(ValueError, match="divisible by 8"):
        sharded_attention(q[:, :60], k[:, :60], v[:, :60], mesh)


def test_default_chunk_is_zigzag_half():
    from lvm.attention.ring import resolve_chunks

    assert resolve_chunks(1536 // 4, 4, "zigzag", None, None) == (192, 192)
    assert resolve_chunks(4096, 1, "zigzag", None, None) == (512, 512)
