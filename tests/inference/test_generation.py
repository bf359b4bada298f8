"""Inference math: a KV cache filled by ring-attention prefill and extended step by step gives the logits of
recomputing the full forward pass; sharded prefill equals unsharded prefill; sampling filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_mesh

from lvm.batch import Batch, batch_shardings
from lvm.config import load_config
from lvm.model import extend, forward, init_params, prefill

PROMPT, PAD, MAX_LEN = 45, 64, 96


def cfg_for(mesh_shape, *extra):
    mesh = ",".join(map(str, mesh_shape))
    return load_config(["model/tiny"], [f"mesh={mesh}", *extra])


def sequence(seed, n, rows=2):
    """Token rows with a vision span in the middle: ids and vision mask [rows, n]."""
    rng = np.random.default_rng(seed)
    vis = np.zeros((rows, n), bool)
    vis[:, 10:30] = True
    ids = np.where(vis, rng.integers(0, 512, (rows, n)), rng.integers(1, 512, (rows, n)))
    return ids.astype(np.int32), vis


def padded_batch(ids, vis, lengths, width):
    rows = ids.shape[0]
    tok = np.zeros((rows, width), np.int32)
    vm = np.zeros((rows, width), bool)
    seg = np.zeros((rows, width), np.int32)
    for r, n in enumerate(lengths):
        tok[r, :n], vm[r, :n], seg[r, :n] = ids[r, :n], vis[r, :n], 1
    pos = np.tile(np.arange(width, dtype=np.int32), (rows, 1))
    zeros = np.zeros_like(tok)
    return Batch(tok, vm, pos, seg, zeros, vm, zeros.astype(np.float32))


def full_logits(params, ids, vis, cfg, mesh):
    n = ids.shape[1]
    seg = np.ones_like(ids)
    pos = np.tile(np.arange(n, dtype=np.int32), (ids.shape[0], 1))
    batch = Batch(ids, vis, pos, seg, np.zeros_like(ids), vis, np.zeros(ids.shape, np.float32))
    return [np.asarray(x) for x in forward(params, jax.device_put(batch, batch_shardings(mesh)), cfg, mesh)]


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1, 4), (1, 1, 2, 2)])
def test_cached_decoding_gives_the_logits_of_the_full_forward_pass(mesh_shape):
    cfg = cfg_for(mesh_shape)
    mesh = make_mesh(mesh_shape)
    params = init_params(cfg, mesh, jax.random.key(0))
    total = 80
    ids, vis = sequence(1, total)
    lengths = np.array([PROMPT, PROMPT - 7])  # prompts of different lengths in one batch
    batch = jax.device_put(padded_batch(ids, vis, lengths, PAD), batch_shardings(mesh))
    text, vision, cache = jax.jit(prefill, static_argnums=(3, 4, 5))(
        params, batch, jnp.asarray(lengths), cfg, mesh, MAX_LEN
    )
    ref_text, ref_vision = full_logits(params, ids, vis, cfg, mesh)
    rows = np.arange(2)
    np.testing.assert_allclose(text, ref_text[rows, lengths - 1], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(vision, ref_vision[rows, lengths - 1], rtol=2e-4, atol=2e-5)
    step = jax.jit(extend, static_argnums=(4, 5))
    for t in range(12):  # one token per step, then a 4-token chunk
        width = 1 if t < 8 else 4
        if t >= 8 and (t - 8) % 4:
            continue
        at = lengths[:, None] + np.arange(width)  # the next tokens of each row (teacher forced)
        new_ids, new_vis = ids[rows[:, None], at], vis[rows[:, None], at]
        text, vision, cache = step(params, cache, jnp.asarray(new_ids), jnp.asarray(new_vis), cfg, mesh)
        np.testing.assert_allclose(text, ref_text[rows[:, None], at], rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(vision, ref_vision[rows[:, None], at], rtol=2e-4, atol=2e-5)
        lengths = lengths + width
    assert np.array_equal(np.asarray(cache.length), lengths)


def test_sharded_prefill_equals_unsharded_prefill():
    ids, vis = sequence(2, PAD)
    lengths = np.array([PROMPT, PAD])
    results = []
    for shape in ((1, 1, 1, 1), (1, 1, 1, 4)):
        cfg, mesh = cfg_for(shape), make_mesh(shape)
        params = init_params(cfg, mesh, jax.random.key(3))
        batch = jax.device_put(padded_batch(ids, vis, lengths, PAD), batch_shardings(mesh))
        text, vision, cache = prefill(params, batch, jnp.asarray(lengths), cfg, mesh, MAX_LEN)
        if shape[3] == 4:
            assert cache.k.sharding.spec[2] == "sp"  # the cache's sequence axis stays sharded
        results.append([np.asarray(x) for x in (text, vision, cache.k, cache.v)])
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


@pytest.mark.slow
def test_greedy_cached_generation_picks_the_tokens_of_full_recomputation():
    from lvm.generation import Generator, generate_text

    cfg, mesh = cfg_for((1, 1, 1, 4)), make_mesh((1, 1, 1, 4))
    params = init_params(cfg, mesh, jax.random.key(4))
    ids, vis = sequence(5, 30, rows=1)
    gen = Generator(params, cfg, mesh)
    text, _, cache = gen.prefill([(ids[0], vis[0])], room=16)
    got = generate_text(gen, cache, text, 10, eos_id=-1)[0]
    seq_ids, seq_vis = ids, vis
    expected = []
    for _ in range(10):  # recompute the whole forward pass for every new token
        n = seq_ids.shape[1]
        batch = padded_batch(seq_ids, seq_vis, [n], 64)  # causal: the padding after n changes nothing
        logits = forward(params, jax.device_put(batch, batch_shardings(mesh)), cfg, mesh)[0]
        expected.append(int(np.argmax(np.asarray(logits)[0, n - 1])))
        seq_ids = np.concatenate([seq_ids, [[expected[-1]]]], axis=1).astype(np.int32)
        seq_vis = np.concatenate([seq_vis, [[False]]], axis=1)
    assert got == expected


def test_sampling_filters_and_vision_frames():
    from lvm.generation import Generator, Sampling, filter_logits, generate_vision, sample

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda s: np.isfinite(np.asarray(filter_logits(logits, s)))[0].tolist()
    assert kept(Sampling(1.0, top_k=2)) == [True, True, False, False]
    assert kept(Sampling(1.0, top_p=0.7)) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.7
    assert kept(Sampling(1.0, top_p=0.9)) == [True, True, True, False]
    draws = [int(sample(jax.random.key(i), logits, Sampling(1.0, top_k=2))[0]) for i in range(200)]
    assert set(draws) == {0, 1} and 0.45 < draws.count(0) / 200 < 0.8
    with pytest.raises(ValueError):
        Sampling(top_p=0)

    cfg, mesh = cfg_for((1, 1, 1, 2)), make_mesh((1, 1, 1, 2))
    params = init_params(cfg, mesh, jax.random.key(6))
    gen = Generator(params, cfg, mesh)
    prompt = (np.array([1, 2, 3], np.int32), np.zeros(3, bool))
    _, vision, cache = gen.prefill([prompt, prompt], room=3 * 5)
    codes = generate_vision(gen, cache, vision, 3, 4, n_codes=256, sampling=Sampling(1.0), guidance=2.0)
    assert codes.shape == (1, 3, 4) and codes.min() >= 0 and codes.max() < 256  # never <eof>/<eov> inside


def test_prompt_lengths_pad_by_under_an_eighth_with_few_shapes():
    from lvm.generation import padded_length

    unit = 2 * 8 * 64
    lengths = [padded_length(n, unit) for n in range(1, 64 * unit + 1)]
    for n, width in enumerate(lengths, start=1):
        assert width >= n and width % unit == 0
        assert width < 1.125 * -(-n // unit) * unit
    assert len({w for w in lengths if 16 * unit < w <= 32 * unit}) == 8
    assert padded_length(8704, unit) == 9216  # the demo's 8.7K-token videos (a power of two would be 16384)


def test_sampling_never_picks_an_id_beyond_the_tokenizer():
    """A text vocabulary padded beyond the tokenizer (the demo: 512 rows, 400 pieces): the padded rows are
    masked inside the jitted sampling step; the logits of the tokenizer's ids are unchanged."""
    from lvm.generation import Generator, Sampling, generate_text, mask_vocab, sample

    n = 100  # the "tokenizer's" vocabulary; the model's is 512
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 512)), jnp.float32).at[:, n:].add(5.0)  # padded rows likeliest
    masked = np.asarray(mask_vocab(logits, n))
    np.testing.assert_array_equal(masked[:, :n], np.asarray(logits)[:, :n])
    assert np.all(masked[:, n:] == -np.inf)
    assert np.asarray(sample(jax.random.key(0), logits, Sampling())).min() >= n  # unmasked: padded ids win
    greedy = np.asarray(sample(jax.random.key(0), logits, Sampling(), n))
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits)[:, :n], axis=-1))
    for s in (Sampling(3.0), Sampling(3.0, top_k=300), Sampling(3.0, top_p=0.99)):
        draws = np.stack([np.asarray(sample(jax.random.key(seed), logits, s, n)) for seed in range(50)])
        assert draws.max() < n and len(np.unique(draws)) > 20, s  # still samples, among valid ids only

    cfg, mesh = cfg_for((1, 1, 1, 2)), make_mesh((1, 1, 1, 2))
    gen = Generator(init_params(cfg, mesh, jax.random.key(7)), cfg, mesh)
    prompts = [(rng.integers(1, n, 9 + r).astype(np.int32), np.zeros(9 + r, bool)) for r in range(4)]
    text, _, cache = gen.prefill(prompts, room=16)
    unmasked = generate_text(gen, cache, text, 12, eos_id=-1)
    assert max(max(row) for row in unmasked) >= n  # the random model does pick padded ids without the mask
    for sampling in (Sampling(), Sampling(3.0)):
        for seed in range(4):
            out = generate_text(gen, cache, text, 12, eos_id=-1, sampling=sampling, seed=seed, vocab_size=n)
            assert all(len(row) == 12 and max(row) < n for row in out), (sampling, seed)
