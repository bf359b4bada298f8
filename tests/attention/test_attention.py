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
    ring_attention,
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


def spanning_segments(batch, seq, n):
    """Packed segment ids whose documents span device blocks (id 0 included, ids unordered)."""
    out = np.zeros((batch, seq), np.int32)
    layouts = [([0.37, 0.81], [0, 5, 2]), ([0.55], [4, 0])]
    for row in range(batch):
        fractions, ids = layouts[row % 2]
        cuts = [int(f * seq) + 3 for f in fractions]
        out[row] = np.repeat(ids, np.diff([0, *cuts, seq]))
    block = seq // n
    assert n == 1 or (out[0, block - 1] == out[0, block]), "a segment must cross a device boundary"
    return out


def numpy_probs(q, k, causal, seg):
    """Independent float64 softmax probabilities [b, h, q, k] (key heads repeated for GQA)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, s, h, d = q.shape
    k = np.repeat(k, h // k.shape[2], axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    mask = np.ones((b, 1, s, s), bool)
    if causal:
        mask &= np.tril(np.ones((s, s), bool))
    if seg is not None:
        mask &= seg[:, None, :, None] == seg[:, None, None, :]
    scores = np.where(mask, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def numpy_attention(q, k, v, causal, seg):
    """Independent float64 reference."""
    v = np.repeat(np.asarray(v, np.float64), q.shape[2] // v.shape[2], axis=2)
    return np.einsum("bhqk,bkhd->bqhd", numpy_probs(q, k, causal, seg), v)


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


# (kernel, seq, head_dim, chunk): the xla kernel with small tiles, the fused kernel with its default tiles
BF16_CASES = [("xla", 256, 32, 16), ("fused", 1024, 128, None)]


@pytest.mark.parametrize("kernel,s,d,chunk", BF16_CASES, ids=[c[0] for c in BF16_CASES])
def test_bfloat16_within_bf16_tolerance(kernel, s, d, chunk):
    q, k, v, cot = random_qkv(7, 2, s, 4, 2, d, jnp.bfloat16)
    seg = jnp.asarray(spanning_segments(2, s, 4))
    mesh = make_mesh((4,), ("sp",))
    ring = lambda q, k, v: sharded_attention(
        q, k, v, mesh, segment_ids=seg, q_chunk=chunk, kv_chunk=chunk, kernel=kernel
    )
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
    from lvm.attention.chunking import resolve_chunks

    assert resolve_chunks(1536 // 4, 4, "zigzag", None, None) == (192, 192)
    assert resolve_chunks(4096, 1, "zigzag", None, None) == (512, 512)


# ----------------------------------------------------------------------------------------------------------
# The fused (Pallas) kernels: on CPU they run in interpret mode, the same kernel code TPUs and GPUs compile.


def numpy_attention_grads(q, k, v, cot, causal, seg):
    """float64 dq, dk, dv of numpy_attention (softmax backward written out; GQA summed over the group)."""
    p = numpy_probs(q, k, causal, seg)
    q, k, v, cot = (np.asarray(x, np.float64) for x in (q, k, v, cot))
    b, s, h, d = q.shape
    group = h // k.shape[2]
    kr, vr = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    dv = np.einsum("bhqk,bqhd->bkhd", p, cot)
    dp = np.einsum("bqhd,bkhd->bhqk", cot, vr)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True)) / np.sqrt(d)
    dq = np.einsum("bhqk,bkhd->bqhd", ds, kr)
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q)
    fold = lambda x: x.reshape(b, s, k.shape[2], group, d).sum(3)
    return dq, fold(dk), fold(dv)


# (sp, causal, layout, seq, heads, kv_heads, head_dim, q_chunk, kv_chunk); batch 2, packed segments spanning devices
FUSED_CASES = [
    (1, True, "zigzag", 256, 4, 2, 64, 64, 128),
    (2, True, "zigzag", 512, 4, 1, 128, None, None),
    (2, False, "contiguous", 256, 2, 2, 64, 32, 128),
    (4, True, "zigzag", 1024, 4, 2, 64, 64, 128),
    (4, True, "contiguous", 512, 6, 3, 128, 64, 128),
    (4, False, "zigzag", 1024, 2, 1, 64, 128, 128),
    (8, True, "zigzag", 2048, 2, 1, 64, None, None),
]


@pytest.mark.parametrize(
    "case", FUSED_CASES, ids=lambda c: f"sp{c[0]}-{'causal' if c[1] else 'full'}-{c[2]}-hd{c[6]}"
)
def test_fused_kernel_matches_float64_reference_and_xla_kernel(case):
    sp, causal, layout, s, h, hk, d, cq, ck = case
    q, k, v, cot = random_qkv(sp * 7 + d, 2, s, h, hk, d)
    seg = spanning_segments(2, s, sp)
    mesh = make_mesh((sp,), ("sp",))

    def run(kernel):
        attn = lambda q, k, v: sharded_attention(
            q,
            k,
            v,
            mesh,
            causal=causal,
            segment_ids=jnp.asarray(seg),
            layout=layout,
            q_chunk=cq,
            kv_chunk=ck,
            kernel=kernel,
        )
        return jax.jit(lambda *a: value_and_grads(attn, *a))(q, k, v, cot)

    out, grads = run("fused")
    xla_out, xla_grads = run("xla")
    ref_out = numpy_attention(q, k, v, causal, seg)
    ref_grads = numpy_attention_grads(q, k, v, cot, causal, seg)
    assert rel_err(out, ref_out) < 1e-4 and rel_err(out, xla_out) < 1e-4
    for name, g, xg, rg in zip("qkv", grads, xla_grads, ref_grads, strict=True):
        assert rel_err(g, rg) < 1e-4, f"d{name} vs float64"
        assert rel_err(g, xg) < 1e-4, f"d{name} vs xla kernel"


def test_fused_kernel_balances_zigzag_work():
    """The fused kernel's own tile counter: equal work per device and ring step, causal tiles skipped."""
    n, s = 4, 2048
    mesh = make_mesh((n,), ("sp",))
    q, k, v, _ = random_qkv(0, 1, s, 2, 2, 64)
    counts = {}
    for kernel in ("fused", "xla"):
        local = lambda q, k, v, kernel=kernel: ring_block_counts(
            q, k, v, layout="zigzag", q_chunk=128, kv_chunk=128, kernel=kernel
        )[None]
        fn = jax.shard_map(local, mesh=mesh, in_specs=P(None, "sp"), out_specs=P("sp"), check_vma=False)
        counts[kernel] = np.asarray(jax.jit(fn)(q, k, v))
    fused = counts["fused"]
    assert (fused == fused[0:1]).all(), fused
    tiles_per_step = (s // n // 128) ** 2
    assert fused.sum() < 0.6 * tiles_per_step * n * n
    np.testing.assert_array_equal(fused, counts["xla"])  # the same tiles as the XLA kernel skips


def test_fused_kernel_gpu_flavour_matches_xla_kernel_per_block():
    """The GPU (Triton) flavour of the kernels, interpreted: one ring step on a zigzag block pair with GQA,
    packed segments and a diagonal, compared with the XLA blockwise kernel."""
    from lvm.attention import blockwise, fused

    target = fused.Target("gpu", interpret=True)
    b, hk, g, c, d = 2, 2, 3, 256, 64
    keys = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(keys[0], (b, hk, g, c, d)) * d**-0.5
    k, v = (jax.random.normal(x, (b, hk, c, d)) for x in keys[1:3])
    do = jax.random.normal(keys[3], (b, hk, g, c, d))
    q_idx = jnp.concatenate([jnp.arange(128), jnp.arange(896, 1024)]).astype(jnp.int32)  # device 0 of 4
    k_idx = jnp.concatenate([jnp.arange(0, 128), jnp.arange(896, 1024)]).astype(jnp.int32)
    seg = jnp.asarray(np.random.default_rng(0).integers(0, 2, (b, c)), jnp.int32)
    tiling = blockwise.Tiling(32, 64, True)
    stats0 = blockwise.init_stats(q)
    ref, _ = blockwise.block_forward(q, k, v, q_idx, k_idx, seg, seg, stats0, tiling)
    got, _ = fused.block_forward(q, k, v, q_idx, k_idx, seg, seg, stats0, tiling, target=target)
    ref_out, lse = blockwise.finalize(ref, jnp.float32)
    got_out, got_lse = blockwise.finalize(got, jnp.float32)
    assert rel_err(got_out, ref_out) < 1e-5
    np.testing.assert_allclose(got_lse, lse, rtol=1e-5)
    delta = jnp.sum(do * ref_out, axis=-1)
    dq0 = jnp.zeros(q.shape)
    ref_grads = blockwise.block_backward(q, k, v, do, lse, delta, q_idx, k_idx, seg, seg, dq0, tiling)
    got_grads = fused.block_backward(
        q, k, v, do, lse, delta, q_idx, k_idx, seg, seg, dq0, tiling, target=target
    )
    for name, a, e in zip(("dq", "dk", "dv"), got_grads, ref_grads, strict=True):
        assert rel_err(a, e) < 1e-5, name


def test_fused_ring_lowers_to_triton_kernels_for_cuda():
    """Without a GPU: the whole ring (forward and backward) with kernel="fused" for platform "gpu" lowers to
    Triton kernels (Pallas -> Triton IR); the XLA kernel lowers without any."""
    mesh = make_mesh((2,), ("sp",))
    q, k, v, cot = random_qkv(0, 1, 1024, 4, 2, 128, jnp.bfloat16)
    seg = jnp.zeros((1, 1024), jnp.int32)
    counts = {}
    for kernel in ("fused", "xla"):
        local = lambda q, k, v, s, kernel=kernel: ring_attention(q, k, v, s, kernel=kernel, platform="gpu")
        act = P(None, "sp")
        ring = jax.shard_map(local, mesh=mesh, in_specs=(act, act, act, act), out_specs=act)
        step = lambda q, k, v, cot, ring=ring: value_and_grads(lambda *a: ring(*a, seg), q, k, v, cot)
        text = jax.jit(step).trace(q, k, v, cot).lower(lowering_platforms=("cuda",)).as_text()
        counts[kernel] = text.count("xla.gpu.triton")
    assert counts["fused"] >= 3 and counts["xla"] == 0, counts


def test_kernel_choice_errors_and_fallback(caplog):
    from lvm.attention.ring import choose_kernel

    mesh = make_mesh((2,), ("sp",))
    q, k, v, _ = random_qkv(0, 1, 128, 2, 2, 64)  # layout run of 32 tokens: too short for 128-lane key tiles
    with pytest.raises(
        ValueError,
        match="no kv_chunk divides the layout run of 32 tokens and is a multiple of 128 up to 1024 for the fused tpu",
    ):
        sharded_attention(q, k, v, mesh, kernel="fused")
    with pytest.raises(ValueError, match="unknown attention kernel 'flash'"):
        sharded_attention(q, k, v, mesh, kernel="flash")
    with pytest.raises(ValueError, match="head_dim=72 is not supported by the fused gpu kernel"):
        choose_kernel("fused", "gpu", 1024, 1, "zigzag", 72, None, None)
    with caplog.at_level("WARNING"):
        assert choose_kernel("auto", "gpu", 1024, 1, "zigzag", 72, None, None)[0] is None  # falls back to xla
        choose_kernel("auto", "gpu", 1024, 1, "zigzag", 72, None, None)
    assert sum("uses 'xla': head_dim=72" in r.message for r in caplog.records) == 1  # logged once
    assert choose_kernel("auto", "cpu", 1024, 1, "zigzag", 64, None, None)[0] is None
    assert choose_kernel("auto", "tpu", 1024, 1, "zigzag", 128, None, None)[0].flavour == "tpu"
    assert choose_kernel("auto", "gpu", 1024, 1, "zigzag", 128, None, None)[0].flavour == "gpu"
    with pytest.raises(ValueError, match="q_chunk=512 must divide .* a power of two from 16 to 256"):
        choose_kernel("fused", "gpu", 1024, 1, "zigzag", 128, 512, None)
    with caplog.at_level("WARNING"):  # the XLA kernel's GPU tiles (2048) fall back to it under auto
        assert choose_kernel("auto", "gpu", 8192, 1, "zigzag", 128, 2048, 2048)[0] is None
