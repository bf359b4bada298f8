"""The decoder: sharded == unsharded, == a naive dense reference, memory scales with sp, and it can learn.

Compiles are the cost on CPU, so each (config, mesh) program is compiled once (`_program`) and reused.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_mesh
from jax.sharding import PartitionSpec as P

from lvm.batch import Batch, abstract_batch, batch_shardings
from lvm.config import ConfigError, load_config
from lvm.model import (
    forward,
    init_opt_state,
    init_params,
    loss_fn,
    make_train_step,
    opt_state_shardings,
    param_shapes,
    param_shardings,
)

SEQ, BATCH = 256, 2
# small chunks so every loop runs several iterations, and causal tile skipping happens inside a device's block
CHUNKS = ["attention.q_chunk=16", "attention.kv_chunk=32", "model.ffn_chunk=32", "model.loss_chunk=16"]


def tiny(*overrides):
    return load_config(["model/tiny"], [*CHUNKS, *overrides])


def make_batch(seed, batch=BATCH, seq=SEQ, text_vocab=512, vision_vocab=66, vision=True, text=True):
    """Packed rows: documents of uneven length (ids compared for equality only, 0 included), positions
    restarting per document, a vision span inside most documents, next-token targets within a document."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((batch, seq), np.int32)
    pos = np.zeros((batch, seq), np.int32)
    vis = np.zeros((batch, seq), bool) if text else np.ones((batch, seq), bool)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(8, seq - 8), size=3, replace=False))
        bounds = [0, *cuts.tolist(), seq]
        ids = rng.permutation(7)[:4]  # distinct, unordered, may include 0
        for d, (a, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            seg[row, a:e] = ids[d]
            pos[row, a:e] = np.arange(e - a)
            if vision and text and e - a > 4:
                start = rng.integers(a + 1, e - 2)
                vis[row, start : rng.integers(start + 1, e)] = True
    tokens = np.where(vis, rng.integers(0, vision_vocab, vis.shape), rng.integers(0, text_vocab, vis.shape))
    same_doc_next = np.concatenate([seg[:, 1:] == seg[:, :-1], np.zeros((batch, 1), bool)], axis=1)
    return Batch(
        tokens=jnp.asarray(tokens, jnp.int32),
        vision_mask=jnp.asarray(vis),
        positions=jnp.asarray(pos),
        segment_ids=jnp.asarray(seg),
        targets=jnp.asarray(np.roll(tokens, -1, axis=1), jnp.int32),
        target_vision_mask=jnp.asarray(np.roll(vis, -1, axis=1)),
        loss_mask=jnp.asarray(same_doc_next, jnp.float32),
    )


@functools.cache
def _program(cfg, mesh_shape):
    """Jitted (params, batch) -> (logits, (loss, metrics), grads) for `cfg` on a mesh of `mesh_shape`."""
    mesh = make_mesh(mesh_shape)

    def run(params, batch):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, cfg, mesh)
        return forward(params, batch, cfg, mesh), (loss, metrics), grads

    return mesh, jax.jit(run)


def run_on(cfg, mesh_shape, batch, seed=0):
    """Initialise on the mesh and run the program; returns host arrays and the params."""
    mesh, fn = _program(cfg, mesh_shape)
    params = init_params(cfg, mesh, jax.random.key(seed))
    batch = jax.device_put(batch, batch_shardings(mesh))
    return jax.device_get((fn(params, batch), params))


@functools.cache
def single_device_result(cfg):
    return run_on(cfg, (1, 1, 1, 1), make_batch(0))


def assert_close(actual, expected, rel=1e-5, what=""):
    """Elementwise |a - e| <= rel * max|e| (a tolerance scaled to the tensor, robust to near-zero entries)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.max(np.abs(expected)), 1e-30)
    err = np.max(np.abs(actual - expected)) / scale
    assert err <= rel, f"{what}: max error {err:.2e} of max |value| {scale:.2e} exceeds {rel:.0e}"


# ----------------------------------------------------------------------------------------------------------
# A naive dense reference in float64 numpy: no chunks, no layout, no sharding.


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, theta, layout):
    """x [b, s, h, d]. interleaved: complex pairs (2i, 2i+1); half: rotate_half with (i, i + d/2)."""
    d = x.shape[-1]
    freq = theta ** (-np.arange(0, d, 2) / d)
    ang = pos[:, :, None, None] * freq  # [b, s, 1, d/2]
    if layout == "interleaved":
        z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * ang)
        return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rotated = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], axis=-1)
    return x * cos + rotated * sin


def reference_forward(params, batch, m):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    tok, vis = np.asarray(batch.tokens), np.asarray(batch.vision_mask)
    pos, seg = np.asarray(batch.positions), np.asarray(batch.segment_ids)
    s = tok.shape[1]
    x = np.where(vis[..., None], p["vte"][np.where(vis, tok, 0)], p["wte"][np.where(vis, 0, tok)])
    mask = np.tril(np.ones((s, s), bool))[None] & (seg[:, :, None] == seg[:, None, :])  # [b, q, k]
    group = m.n_heads // m.n_kv_heads
    for i in range(m.n_layers):
        w = {k: v[i] for k, v in p["layers"].items()}
        h = _rms(x, w["attn_norm"], m.norm_eps)
        q = _rope(np.einsum("bsd,dhk->bshk", h, w["wq"]), pos, m.rope_theta, m.rope_layout)
        k = _rope(np.einsum("bsd,dhk->bshk", h, w["wk"]), pos, m.rope_theta, m.rope_layout)
        v = np.einsum("bsd,dhk->bshk", h, w["wv"])
        k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(m.head_dim)
        scores = np.where(mask[:, None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + np.einsum("bshk,hkd->bsd", np.einsum("bhqk,bkhd->bqhd", probs, v), w["wo"])
        h = _rms(x, w["mlp_norm"], m.norm_eps)
        gate = h @ w["w_gate"]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w["w_up"])) @ w["w_down"]
    h = _rms(x, p["final_norm"], m.norm_eps)
    return h @ p["lm_head"], h @ p["vision_head"]


def reference_loss(logits, batch):
    """0.5 * (text CE + vision CE), each a mean over its own targets; an absent modality is left out."""
    tgt, tvis, w = (np.asarray(a) for a in (batch.targets, batch.target_vision_mask, batch.loss_mask))
    losses = []
    for lg, sel in ((logits[0], ~tvis), (logits[1], tvis)):
        ids = np.where(sel, tgt, 0)
        lse = np.log(np.sum(np.exp(lg - lg.max(-1, keepdims=True)), -1)) + lg.max(-1)
        ce = lse - np.take_along_axis(lg, ids[..., None], -1)[..., 0]
        weight = w * sel
        if weight.sum() > 0:
            losses.append(np.sum(ce * weight) / weight.sum())
    return np.mean(losses)


# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(1, 2, 1, 4), (2, 1, 2, 2)], ids=["fsdp2-sp4", "dp2-tp2-sp2"])
def test_sharded_model_equals_single_device(mesh_shape):
    """Logits, loss and every parameter gradient with the sequence over sp (zigzag) and parameters over
    fsdp / tp equal the same model on one device (float32; packed uneven documents; text and vision)."""
    cfg = tiny()
    (logits, (loss, _), grads), params = run_on(cfg, mesh_shape, make_batch(0))
    (ref_logits, (ref_loss, _), ref_grads), ref_params = single_device_result(cfg)
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)  # init does not depend on the mesh
    for name, a, e in zip(("text logits", "vision logits"), logits, ref_logits, strict=True):
        assert_close(a, e, 1e-5, name)
    assert_close(loss, ref_loss, 1e-6, "loss")
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    for (path, g), e in zip(flat, jax.tree.leaves(ref_grads), strict=True):
        assert np.abs(e).max() > 0, f"gradient of {jax.tree_util.keystr(path)} is zero"
        assert_close(g, e, 2e-5, f"grad {jax.tree_util.keystr(path)}")


def test_params_are_created_on_their_shardings():
    cfg = tiny()
    mesh = make_mesh((1, 2, 2, 2))
    params = init_params(cfg, mesh, jax.random.key(0))
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(param_shardings(cfg, mesh)), strict=True):
        assert p.sharding == s
    assert params["layers"]["wq"].sharding.spec == P(None, ("fsdp", "sp"), "tp", None)
    assert params["wte"].addressable_shards[0].data.shape == (
        512 // 2,
        64 // 4,
    )  # vocab / tp, embed / (fsdp*sp)


@pytest.mark.parametrize("rope_layout", ["interleaved", "half"])
def test_forward_and_loss_match_naive_dense_reference(rope_layout):
    cfg = tiny(f"model.rope_layout={rope_layout}")
    batch = make_batch(0)
    (logits, (loss, metrics), _), params = single_device_result(cfg)
    ref = reference_forward(params, batch, cfg.model)
    assert_close(logits[0], ref[0], 1e-5, "text logits")
    assert_close(logits[1], ref[1], 1e-5, "vision logits")
    assert metrics["text_tokens"] > 0 and metrics["vision_tokens"] > 0
    np.testing.assert_allclose(loss, reference_loss(ref, batch), rtol=1e-6)


@pytest.mark.parametrize("modality", ["text", "vision"])
def test_single_modality_batch_gives_that_modality_ce(modality):
    """A batch with one modality gives exactly its CE (no NaN, no halving)."""
    cfg = tiny()
    mesh, fn = _program(cfg, (1, 1, 1, 1))
    batch = make_batch(1, vision=modality == "vision", text=modality == "text")
    params = init_params(cfg, mesh, jax.random.key(0))
    logits, (loss, metrics), grads = jax.device_get(fn(params, batch))
    other = "vision" if modality == "text" else "text"
    assert metrics[f"{other}_tokens"] == 0 and metrics[f"{modality}_tokens"] > 0
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    np.testing.assert_allclose(loss, metrics[f"{modality}_loss"], rtol=1e-6)
    np.testing.assert_allclose(
        loss, reference_loss(reference_forward(params, batch, cfg.model), batch), rtol=1e-5
    )


def test_unscanned_layers_and_dots_remat_give_the_same_gradients():
    cfg = tiny("model.scan_layers=false", "model.remat=dots")
    (_, (loss, _), grads), _ = run_on(cfg, (1, 1, 1, 1), make_batch(0))
    (_, (ref_loss, _), ref_grads), _ = single_device_result(tiny())
    assert_close(loss, ref_loss, 1e-6, "loss")
    jax.tree.map(lambda a, e: assert_close(a, e, 1e-5, "grad"), grads, ref_grads)


def test_bad_batch_shape_fails_before_compiling():
    cfg = tiny()
    mesh = make_mesh((1, 2, 1, 4))
    params = param_shapes(cfg.model)
    with pytest.raises(ConfigError, match="divisible by 8 for the zigzag layout"):
        jax.eval_shape(lambda p, b: loss_fn(p, b, cfg, mesh), params, make_batch(0, seq=100))
    with pytest.raises(ConfigError, match="batch size 1 is not divisible by dp\\*fsdp=2"):
        jax.eval_shape(lambda p, b: loss_fn(p, b, cfg, mesh), params, make_batch(0, batch=1))


def _compiled_step_temp_bytes(cfg, mesh_shape, seq):
    """Per-device temporary memory of the compiled train step (loss + grad + AdamW update); compile only."""
    mesh = make_mesh(mesh_shape)
    optimizer = optax.adamw(1e-3)
    abstract = lambda shapes, shardings: jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    params = abstract(param_shapes(cfg.model), param_shardings(cfg, mesh))
    opt_state = abstract(jax.eval_shape(optimizer.init, params), opt_state_shardings(cfg, mesh, optimizer))
    batch = abstract_batch(1, seq, mesh)
    step = make_train_step(cfg, mesh, optimizer)
    return step.lower(params, opt_state, batch).compile().memory_analysis().temp_size_in_bytes


def test_train_step_memory_per_device_shrinks_with_sp():
    """At 8192 tokens, per-device temporary memory of a training step at sp=8 is at most 1/5 of one device
    (same code path, same chunk sizes, same global batch), and nothing of order S^2 is materialised."""
    seq = 8192
    chunks = ("attention.q_chunk", "attention.kv_chunk", "model.ffn_chunk", "model.loss_chunk")
    cfg = load_config(["model/tiny"], [f"{name}=128" for name in chunks])
    one = _compiled_step_temp_bytes(cfg, (1, 1, 1, 1), seq)
    eight = _compiled_step_temp_bytes(cfg, (1, 1, 1, 8), seq)
    score_matrix = seq * seq * 4  # one float32 [S, S] matrix for a single head
    assert one < score_matrix / 4, f"sp=1 step needs {one / 2**20:.0f} MiB: a buffer of order S^2 exists"
    assert eight <= one / 5, f"sp=8: {eight / 2**20:.1f} MiB per device vs sp=1: {one / 2**20:.1f} MiB"


@pytest.mark.slow
def test_tiny_model_overfits_a_fixed_batch_with_sequence_parallelism():
    cfg = load_config(["model/tiny"], ["mesh=1,2,1,4"])  # chunk sizes derived from the 32-token blocks
    mesh = make_mesh((1, 2, 1, 4))
    optimizer = optax.adam(1e-2)
    params = init_params(cfg, mesh, jax.random.key(0))
    opt_state = init_opt_state(cfg, mesh, optimizer, params)
    step = make_train_step(cfg, mesh, optimizer)
    batch = jax.device_put(make_batch(3, seq=128), batch_shardings(mesh))
    losses = []
    for _ in range(100):
        params, opt_state, metrics = step(params, opt_state, batch)
        # read the loss every step: many steps queued at once can deadlock XLA:CPU's collectives on
        # 8 simulated devices sharing 2 cores
        losses.append(float(metrics["loss"]))
    assert params["layers"]["wq"].sharding == param_shardings(cfg, mesh)["layers"]["wq"]
    assert losses[0] > 3.0 and losses[-1] < 0.1, losses[::10]


@pytest.mark.slow
def test_train_step_with_fused_attention_equals_xla_kernel():
    """The model's loss, gradients and one AdamW update with the fused (Pallas, interpreted) attention kernel
    equal those with the XLA blockwise kernel (sp=2 zigzag over 512-token blocks, tp=2, packed documents).
    The update is compared to 1e-4 of the largest parameter, under 1% of an AdamW step of lr 1e-3."""
    mesh_shape, seq = (1, 1, 2, 2), 1024
    results = {}
    for kernel in ("fused", "xla"):
        overrides = ["attention.q_chunk=64", "attention.kv_chunk=128", f"attention.kernel={kernel}"]
        cfg = load_config(["model/tiny"], ["model.ffn_chunk=128", "model.loss_chunk=128", *overrides])
        mesh = make_mesh(mesh_shape)
        optimizer = optax.adamw(1e-3)
        params = init_params(cfg, mesh, jax.random.key(0))
        batch = jax.device_put(make_batch(5, seq=seq), batch_shardings(mesh))
        grad_fn = jax.jit(jax.value_and_grad(lambda p, b, cfg=cfg, mesh=mesh: loss_fn(p, b, cfg, mesh)[0]))
        loss, grads = grad_fn(params, batch)
        step = make_train_step(cfg, mesh, optimizer)
        new_params, _, _ = step(params, init_opt_state(cfg, mesh, optimizer, params), batch)
        results[kernel] = jax.device_get((loss, grads, new_params))
    (loss, grads, new), (ref_loss, ref_grads, ref_new) = results["fused"], results["xla"]
    assert_close(loss, ref_loss, 1e-6, "loss")
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    for (path, g), e in zip(flat, jax.tree.leaves(ref_grads), strict=True):
        assert np.abs(e).max() > 0, f"gradient of {jax.tree_util.keystr(path)} is zero"
        assert_close(g, e, 1e-5, f"grad {jax.tree_util.keystr(path)}")
    jax.tree.map(lambda a, e: assert_close(a, e, 1e-4, "updated params"), new, ref_new)
