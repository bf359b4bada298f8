"""Inference math: a KV cache filled by ring-attention prefill and extended step by step gives the logits of
recomputing the full forward pass; sharded prefill equals unsharded prefill; sampling filters. The decode loops
on the device pick the tokens of the host-driven loops (`host_generate_*`) and of full recomputation, give a row
the same tokens in a batch as alone, reproduce seeded samples, and compile a few bucketed shapes, not one per
request."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_mesh, tiny_tokenizers

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
    from lvm.generation import Generator, generate_text, host_generate_text

    cfg, mesh = cfg_for((1, 1, 1, 4)), make_mesh((1, 1, 1, 4))
    params = init_params(cfg, mesh, jax.random.key(4))
    ids, vis = sequence(5, 30, rows=1)
    gen = Generator(params, cfg, mesh)
    text, _, cache = gen.prefill([(ids[0], vis[0])], room=16)
    got = generate_text(gen, cache, text, 10, eos_id=-1)[0]
    assert got == host_generate_text(gen, cache, text, 10, eos_id=-1)[0]
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


# ----------------------------------------------------------------------------------------------------------
# The decode loops on the device


@pytest.fixture(scope="module")
def gen():
    from lvm.generation import Generator

    cfg, mesh = cfg_for((1, 1, 1, 2)), make_mesh((1, 1, 1, 2))
    return Generator(init_params(cfg, mesh, jax.random.key(8)), cfg, mesh)


def text_prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(1, 512, n).astype(np.int32), np.zeros(n, bool)) for n in lengths]


def test_device_text_loop_picks_the_host_loops_tokens_and_a_row_gets_what_it_gets_alone(gen):
    from lvm.generation import Sampling, TextDecoder, generate_text, host_generate_text

    prompts = text_prompts((5, 30, 17))
    text, _, cache = gen.prefill(prompts, room=24)
    free = host_generate_text(gen, cache, text, 20, eos_id=-1)
    eos = free[1][6]  # a token row 1 picks: it stops there, the others may stop elsewhere or run to the limit
    ref = host_generate_text(gen, cache, text, 20, eos_id=eos)
    assert [r[: r.index(eos)] if eos in r else r for r in free] == ref and len(ref[1]) < 20
    expected_stream = [(r, ref[r][step]) for step in range(20) for r in range(3) if step < len(ref[r])]
    for chunk in (16, 3):
        streamed = []
        got = generate_text(
            gen, cache, text, 20, eos, chunk=chunk, on_token=lambda *rt, s=streamed: s.append(rt)
        )
        assert got == ref and streamed == expected_stream, (
            chunk
        )  # the host loop's order: step by step, row by row

    sampled = Sampling(1.0, top_k=50)
    draws = generate_text(gen, cache, text, 20, eos, sampled, seed=7)
    assert draws == generate_text(
        gen, cache, text, 20, eos, sampled, seed=7, chunk=3
    )  # reproducible, any chunk
    assert draws != generate_text(gen, cache, text, 20, eos, sampled, seed=8) and draws != ref
    for r, prompt in enumerate(prompts):  # row r uses seed + r: alone with that seed it draws the same
        t1, _, c1 = gen.prefill([prompt], room=24)
        assert generate_text(gen, c1, t1, 20, eos)[0] == ref[r]
        assert generate_text(gen, c1, t1, 20, eos, sampled, seed=7 + r)[0] == draws[r]

    mixed = generate_text(gen, cache, text, 20, eos, [Sampling(), sampled, Sampling()], seed=7)
    assert mixed[0] == ref[0] and mixed[2] == ref[2] and mixed[1] == draws[1]  # settings per row

    decoder = TextDecoder(gen, cache, text, 20, eos, chunk=3)
    chunks = list(decoder)
    assert len(chunks[0][0]) == 1 and all(len(c[0]) <= 3 for c in chunks)  # a first token, then chunks
    assert decoder.tokens == ref and decoder.done.all()
    stopped = np.array([len(r) < 20 for r in ref])  # the rows that sampled EOS: it is in their cache
    lengths = np.array([len(p[0]) for p in prompts]) + [len(r) for r in ref] + stopped
    np.testing.assert_array_equal(np.asarray(decoder.state.cache.length), lengths)


def test_device_vision_loop_picks_the_host_loops_codes(gen):
    from lvm.generation import Sampling, VisionDecoder, generate_vision, host_generate_vision

    prompts = text_prompts((3, 3), seed=1)
    prompts[1] = (prompts[1][0][:1], prompts[1][1][:1])  # the unconditional twin: a shorter prompt
    _, vision, cache = gen.prefill(prompts, room=3 * 5)
    for guidance, c, v in ((2.0, cache, vision), (None, _first(cache), vision[:1])):
        ref = host_generate_vision(gen, c, v, 3, 4, 256, guidance=guidance)
        np.testing.assert_array_equal(generate_vision(gen, c, v, 3, 4, 256, guidance=guidance), ref)
    sampled = [generate_vision(gen, cache, vision, 3, 4, 256, Sampling(1.0), 2.0, seed) for seed in (3, 3, 4)]
    np.testing.assert_array_equal(sampled[0], sampled[1])
    assert not np.array_equal(sampled[0], sampled[2]) and sampled[0].max() < 256
    frames = list(VisionDecoder(gen, cache, vision, 3, 4, 256, Sampling(1.0), 2.0, seed=3))
    np.testing.assert_array_equal(np.stack(frames, axis=1), sampled[0])  # a frame at a time, as they come


def _first(cache):
    """Row 0 of a cache."""
    from lvm.model import KVCache

    return KVCache(cache.k[:, :1], cache.v[:, :1], cache.length[:1])


def test_append_gives_the_logits_of_extending_each_row(gen):
    from lvm.generation import generate_text, host_generate_text

    context = text_prompts((40, 9), seed=2)
    _, _, cache = gen.prefill(context, room=64)
    rows = text_prompts((5, 40), seed=3)  # two calls of 32 tokens, the second padded
    text, vision, appended = gen.append(cache, rows)
    np.testing.assert_array_equal(np.asarray(appended.length), [45, 49])
    for r, (ids, vis) in enumerate(rows):
        one = _row(cache, r)
        t, v, extended = gen.extend_chunked(one, ids[None], vis[None])
        np.testing.assert_allclose(np.asarray(text)[r], t[0, -1], rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(np.asarray(vision)[r], v[0, -1], rtol=2e-5, atol=2e-6)
        assert generate_text(gen, _row(appended, r), text[r : r + 1], 8, -1) == host_generate_text(
            gen, extended, t[:, -1], 8, -1
        )
    with pytest.raises(ValueError, match="free slots"):
        gen.append(cache, text_prompts((480, 5)))


def _row(cache, r):
    from lvm.model import KVCache

    return KVCache(cache.k[:, r : r + 1], cache.v[:, r : r + 1], cache.length[r : r + 1])


@contextlib.contextmanager
def counting_compiles():
    """Counts every computation jax lowers for compilation (jitted functions and eager ops alike, whether or
    not the persistent cache then has it) while the block runs."""
    events = []
    listener = lambda event, _seconds, **_: events.append(event)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_requests_of_any_length_compile_a_few_bucketed_shapes():
    """20 requests (text prompts of 3..500 tokens with 1..48 new tokens, questions of 1..70 tokens about a
    cached context) compile a handful of shapes: prompt widths and cache sizes are bucketed, the question is
    appended in pieces of 32 tokens (the last one a multiple of 8), the decode loop's length, the EOS id and
    the sampling settings are traced."""
    from lvm.generation import Generator, Sampling, generate_text

    cfg, mesh = cfg_for((1, 1, 1, 2)), make_mesh((1, 1, 1, 2))
    gen = Generator(init_params(cfg, mesh, jax.random.key(9)), cfg, mesh)
    rng = np.random.default_rng(0)
    _, _, context = gen.prefill(text_prompts((100,)), room=150)
    before = {name: f._cache_size() for name, f in gen.jitted().items()}  # shared by every Generator
    with counting_compiles() as events:
        for i in range(20):
            new = int(rng.integers(1, 49))
            sampling = Sampling(float(rng.uniform(0.5, 2)), int(rng.integers(0, 50))) if i % 3 else Sampling()
            if i % 2:
                text, _, cache = gen.append(context, text_prompts((int(rng.integers(1, 71)),), seed=i))
            else:
                n = (3, 500)[i // 2] if i < 4 else int(rng.integers(3, 501))  # both width buckets early
                text, _, cache = gen.prefill(text_prompts((n,), seed=i), room=new)
            out = generate_text(gen, cache, text, new, eos_id=-1, sampling=sampling, seed=i, vocab_size=400)
            assert len(out[0]) == new and max(out[0]) < 400
    sizes = {name: f._cache_size() - before[name] for name, f in gen.jitted().items()}
    lowered = events.count("/jax/core/compile/jaxpr_to_mlir_module_duration")
    # prefill: widths 256 and 512 (sp=2 buckets), caches 512 / 768; the decode loop: those two caches and the
    # context's; append: pieces of 8, 16, 24 and 32 tokens to the context's cache
    assert sizes["prefill"] <= 3 and sizes["text_chunk"] <= 3 and sizes["append"] <= 4, sizes
    assert sum(sizes.values()) <= 10 and lowered <= 16, (sizes, lowered)


def test_model_streams_answers_and_frames_as_they_come(tmp_path):
    """`Model.answer_stream` / `answer(on_text=...)` hand over the answer a chunk at a time and give the answer
    of the host loop `answer` ran before; `generate_video` decodes each frame as it comes, the frames of
    `generate_codes`, whose codes are the host loop's."""
    from lvm.generation import Generator, host_generate_text, host_generate_vision
    from lvm.inference import GREEDY, Model
    from lvm.tokenizers import format as fmt
    from lvm.tokenizers.text import SentencePieceTokenizer

    tok = tiny_tokenizers(tmp_path)  # an untrained VQGAN of 8x8 codes at tmp_path/vqgan
    cfg, mesh = cfg_for((1, 1, 1, 2)), make_mesh((1, 1, 1, 2))
    model = Model.__new__(Model)  # a random model: what matters is that both loops pick the same tokens
    model.cfg, model.mesh, model.params = cfg, mesh, init_params(cfg, mesh, jax.random.key(10))
    model.generator = gen = Generator(model.params, cfg, mesh)
    model.codec = SentencePieceTokenizer(tok.model_file)
    model.vqgan_path, model._vqgan, model.context = str(tmp_path / "vqgan"), None, 2048

    ctx = model.video_context(np.random.default_rng(0).integers(0, 256, (2, 8, 8)), room=64)
    question = "What colour is the video?"
    pieces = list(model.answer_stream(ctx, question, max_new_tokens=24, chunk=4))
    got = []
    answer = model.answer(ctx, question, max_new_tokens=24, on_text=got.append)
    assert "".join(pieces).strip() == answer == "".join(got).strip() and len(pieces[0]) > 0
    ids, vis = model._question_tokens(ctx, question)  # as `answer` ran before: one dispatch per token
    text, _, cache = gen.extend_chunked(ctx.cache, ids[None], vis[None])
    eos, n = model.codec.eos_id, model.codec.vocab_size
    ref = host_generate_text(gen, cache, text[:, -1], 24, eos, vocab_size=n)[0]
    assert answer == model.codec.decode(ref, continuation=True).strip()

    shown = []
    video = model.generate_video(
        "a red video", 2, sampling=GREEDY, on_frame=lambda i, f: shown.append((i, f))
    )
    codes = model.generate_codes("a red video", 2, sampling=GREEDY)
    np.testing.assert_array_equal(video, model.vqgan.decode(codes))
    assert [i for i, _ in shown] == [0, 1] and all(np.array_equal(f, video[i]) for i, f in shown)
    rows = [model.codec.encode_pieces(fmt.video_request(p)) for p in ("a red video", "")]
    _, vision, cache = gen.prefill([(np.asarray(r), np.zeros(len(r), bool)) for r in rows], 2 * 65)
    ref_codes = host_generate_vision(gen, cache, vision, 2, 64, 256, GREEDY, guidance=3.0)
    np.testing.assert_array_equal(codes, ref_codes[0].reshape(2, 8, 8))
