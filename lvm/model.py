"""LLaMA-style decoder for interleaved text and vision tokens, sequence-parallel with ring attention.

Written as pure JAX functions over a nested dict of arrays rather than Flax NNX modules: the parameter tree, its
parallel tree of logical axes (`param_axes`) and the stacked-layer scan are then plain pytrees and `lax.scan`,
with nothing between the code and `jit` / `shard_map` / `jax.checkpoint`. Parameters are created by a jitted
initialiser with `out_shardings`, directly on their final devices.

Data flow of one forward pass (global arrays, jit + sharding constraints; only attention is a `shard_map`):
  1. The batch's token stream (tokens, masks, positions, segment ids, targets) is permuted ONCE into the ring
     layout (zigzag by default) with collective permutes. Every later step is position-wise except attention,
     and ring attention derives each token's global index (for the causal mask) from the layout itself.
  2. Embedding: the input vision mask picks `vte` or `wte` per position.
  3. Layers (stacked on a leading axis, scanned, rematerialised per `model.remat`): RMSNorm, attention with GQA
     and RoPE (positions restart per packed document) through `ring_attention` over `sp` with segment ids;
     RMSNorm, SwiGLU feed-forward applied in sequence chunks so the [chunk, mlp] activation exists per chunk.
  4. Output: the target vision mask picks `vision_head` or `lm_head`. `loss_fn` computes the loss in sequence
     chunks (full-vocabulary float32 logits exist per chunk only) and never undoes the layout (a sum over
     tokens does not care about order); `forward` returns full logits and undoes the layout ONCE.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh

from lvm.attention import from_layout, ring_attention, to_layout
from lvm.attention.chunking import default_chunk
from lvm.attention.ring import checks_vma, mesh_platform
from lvm.batch import Batch, batch_shardings
from lvm.config import MESH_AXES, Config, MeshConfig, ModelConfig
from lvm.layers import apply_rope, rms_norm, rope_angles, swiglu
from lvm.sharding import (
    RESIDUAL,
    TOKENS,
    gather_param,
    logical_sharding,
    logical_spec,
    replicated,
    tree_shardings,
    with_logical_constraint,
)

F32 = jnp.float32
DEFAULT_FFN_CHUNK = 1024  # largest derived feed-forward chunk (tokens per device)
DEFAULT_LOSS_CHUNK = 512  # largest derived loss chunk (tokens per device)
_REMAT = {  # model.remat -> jax.checkpoint policy ("none": no rematerialisation)
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# ----------------------------------------------------------------------------------------------------------
# Parameters


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str  # "normal" (std model.init_std) or "ones"


def param_specs(m: ModelConfig) -> dict:
    """Shape, logical axes and initialiser of every parameter; layer weights are stacked on a leading axis."""
    L, d, h, hk, hd, f = m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.mlp_dim
    return {
        "wte": ParamSpec((m.text_vocab_size, d), ("vocab", "embed"), "normal"),
        "vte": ParamSpec((m.vision_vocab_size, d), ("vocab", "embed"), "normal"),
        "layers": {
            "attn_norm": ParamSpec((L, d), ("layers", "norm"), "ones"),
            "wq": ParamSpec((L, d, h, hd), ("layers", "embed", "heads", "head_dim"), "normal"),
            "wk": ParamSpec((L, d, hk, hd), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
            "wv": ParamSpec((L, d, hk, hd), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
            "wo": ParamSpec((L, h, hd, d), ("layers", "heads", "head_dim", "embed"), "normal"),
            "mlp_norm": ParamSpec((L, d), ("layers", "norm"), "ones"),
            "w_gate": ParamSpec((L, d, f), ("layers", "embed", "mlp"), "normal"),
            "w_up": ParamSpec((L, d, f), ("layers", "embed", "mlp"), "normal"),
            "w_down": ParamSpec((L, f, d), ("layers", "mlp", "embed"), "normal"),
        },
        "final_norm": ParamSpec((d,), ("norm",), "ones"),
        "lm_head": ParamSpec((d, m.text_vocab_size), ("embed", "vocab"), "normal"),
        "vision_head": ParamSpec((d, m.vision_vocab_size), ("embed", "vocab"), "normal"),
    }


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def param_axes(m: ModelConfig) -> dict:
    """Tree of logical-axes tuples parallel to the parameter tree."""
    return jax.tree.map(lambda s: s.axes, param_specs(m), is_leaf=_is_spec)


def param_shapes(m: ModelConfig) -> dict:
    """Tree of ShapeDtypeStructs of the parameters (no allocation)."""
    dtype = jnp.dtype(m.param_dtype)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_specs(m), is_leaf=_is_spec)


def param_shardings(cfg: Config, mesh: Mesh) -> dict:
    """Tree of NamedShardings of the parameters on `mesh`."""
    return tree_shardings(mesh, param_axes(cfg.model))


def param_count(m: ModelConfig) -> int:
    """Number of parameters."""
    return sum(s.size for s in jax.tree.leaves(param_shapes(m)))


def init_params(cfg: Config, mesh: Mesh, key: jax.Array) -> dict:
    """Initialise the parameters directly on their shardings (values do not depend on the mesh)."""
    m = cfg.model
    specs, treedef = jax.tree.flatten(param_specs(m), is_leaf=_is_spec)
    dtype = jnp.dtype(m.param_dtype)

    def init(key):
        keys = jax.random.split(key, len(specs))
        leaves = [
            jnp.ones(s.shape, dtype)
            if s.init == "ones"
            else (m.init_std * jax.random.normal(k, s.shape)).astype(dtype)
            for s, k in zip(specs, keys, strict=True)
        ]
        return jax.tree.unflatten(treedef, leaves)

    return jax.jit(init, out_shardings=param_shardings(cfg, mesh))(key)


# ----------------------------------------------------------------------------------------------------------
# Forward pass


class _Plan(NamedTuple):
    """Static, per-shape settings of one forward pass."""

    cfg: Config
    mesh: Mesh
    ffn_chunk: int
    loss_chunk: int


def _plan(cfg: Config, mesh: Mesh, batch: Batch) -> _Plan:
    """Validate the batch shape against the config and `mesh` (before tracing further); resolve chunk sizes."""
    b, s = batch.tokens.shape
    sizes = MeshConfig(*(mesh.shape[a] for a in MESH_AXES))
    dataclasses.replace(cfg, mesh=sizes).check_batch_shape(b, s, mesh.size)
    block = s // sizes.sp
    m = cfg.model
    return _Plan(
        cfg,
        mesh,
        m.ffn_chunk or default_chunk(block, DEFAULT_FFN_CHUNK),
        m.loss_chunk or default_chunk(block, DEFAULT_LOSS_CHUNK),
    )


def _tokens_to_layout(batch: Batch, plan: _Plan) -> Batch:
    """Permute every [batch, seq] field into the ring layout (collective permutes over sp)."""
    layout = plan.cfg.attention.layout
    spec = logical_spec(TOKENS)
    fn = lambda b: jax.tree.map(lambda x: to_layout(x, "sp", layout), b)
    return jax.shard_map(fn, mesh=plan.mesh, in_specs=(spec,), out_specs=spec)(batch)


def _from_layout(x: jax.Array, axes, plan: _Plan) -> jax.Array:
    """`x` (logical axes `axes`, one of them "seq") from the ring layout back to natural token order."""
    spec = logical_spec(axes)
    fn = partial(from_layout, axis_name="sp", layout=plan.cfg.attention.layout, seq_axis=axes.index("seq"))
    return jax.shard_map(fn, mesh=plan.mesh, in_specs=(spec,), out_specs=spec)(x)


def _use(w: jax.Array, axes, plan: _Plan) -> jax.Array:
    """A parameter cast to the compute dtype and gathered for use."""
    return gather_param(w.astype(jnp.dtype(plan.cfg.model.dtype)), axes, plan.mesh)


def _embed(params: dict, tokens: jax.Array, vision_mask: jax.Array, plan: _Plan) -> jax.Array:
    """[batch, seq] ids -> [batch, seq, d]: the input vision mask picks `vte` or `wte` per position."""
    axes = ("vocab", "embed")
    text = jnp.take(_use(params["wte"], axes, plan), jnp.where(vision_mask, 0, tokens), axis=0)
    vision = jnp.take(_use(params["vte"], axes, plan), jnp.where(vision_mask, tokens, 0), axis=0)
    return jnp.where(vision_mask[..., None], vision, text)


def _seq_chunks(x: jax.Array, chunk: int, plan: _Plan) -> jax.Array:
    """[b, S, ...] -> [n, b, sp, chunk, ...]: chunks of each device's block, stacked on an unsharded axis."""
    b, s = x.shape[:2]
    sp = plan.mesh.shape["sp"]
    y = jnp.moveaxis(x.reshape(b, sp, s // sp // chunk, chunk, *x.shape[2:]), 2, 0)
    tail = ("act_embed",) if x.ndim == 3 else ()
    return with_logical_constraint(y, (None, "batch", "seq", None, *tail), plan.mesh)


def _seq_unchunk(y: jax.Array, plan: _Plan) -> jax.Array:
    """Inverse of `_seq_chunks` for [n, b, sp, chunk, d]."""
    n, b, sp, chunk = y.shape[:4]
    x = jnp.moveaxis(y, 0, 2).reshape(b, sp * n * chunk, *y.shape[4:])
    return with_logical_constraint(x, RESIDUAL, plan.mesh)


def _qkv(x, p, axes, rope, plan: _Plan) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pre-norm RoPE-rotated q [b, S, h, hd], k [b, S, hk, hd] and v [b, S, hk, hd] of x [b, S, d]."""
    m = plan.cfg.model
    h = rms_norm(x, p["attn_norm"], m.norm_eps)
    q, k, v = (jnp.einsum("bsd,dhk->bshk", h, _use(p[n], axes[n], plan)) for n in ("wq", "wk", "wv"))
    return apply_rope(q, *rope, m.rope_layout), apply_rope(k, *rope, m.rope_layout), v


def _layer(x, attend, wo, feed_forward, constrain=lambda x: x):
    """One transformer layer, the body shared by the forward pass and `extend`: x + attention(x) projected by
    `wo`, then + feed_forward(x). `attend(x)` returns (heads' outputs [b, S, h, hd], the layer's (k, v))."""
    o, kv = attend(x)
    x = constrain(x + jnp.einsum("bshk,hkd->bsd", o.astype(x.dtype), wo))
    return constrain(x + feed_forward(x)), kv


def _swiglu_block(x, p, axes, plan: _Plan) -> jax.Array:
    """Pre-norm SwiGLU of x [..., d]."""
    w = [_use(p[n], axes[n], plan) for n in ("w_gate", "w_up", "w_down")]
    return swiglu(rms_norm(x, p["mlp_norm"], plan.cfg.model.norm_eps), *w)


def _attention(x, p, axes, rope, segment_ids, plan: _Plan):
    """Ring attention's heads' outputs [b, S, h, hd] for x [b, S, d] in ring layout, and the layer's keys and
    values [b, S, hk, hd] (for a KV cache)."""
    a, mesh = plan.cfg.attention, plan.mesh
    q, k, v = _qkv(x, p, axes, rope, plan)
    q_spec = logical_spec(("batch", "seq", "act_heads", None))
    kv_spec = logical_spec(("batch", "seq", "act_kv_heads", None))
    platform = mesh_platform(mesh)
    attn = partial(
        ring_attention,
        axis_name="sp",
        causal=True,
        layout=a.layout,
        q_chunk=a.q_chunk,
        kv_chunk=a.kv_chunk,
        kernel=a.kernel,
        platform=platform,
    )
    o = jax.shard_map(
        attn,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, logical_spec(TOKENS)),
        out_specs=q_spec,
        check_vma=checks_vma(a.kernel, platform),
    )(q, k, v, segment_ids)
    return o, (k, v)


def _feed_forward(x, p, axes, plan: _Plan) -> jax.Array:
    """The SwiGLU block's output, computed chunk by chunk along each device's block."""

    @partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
    def chunk(xc):  # [b, sp, chunk, d]: only this chunk's [.., mlp] intermediate is ever live
        return _swiglu_block(xc, p, axes, plan)

    _, out = lax.scan(lambda c, xc: (c, chunk(xc)), None, _seq_chunks(x, plan.ffn_chunk, plan))
    return _seq_unchunk(out, plan)


def layer_axes(m: ModelConfig) -> dict:
    """Logical axes of one layer's weights (the stacking axis dropped)."""
    return {k: v[1:] for k, v in param_axes(m)["layers"].items()}


def _trunk(params: dict, batch: Batch, plan: _Plan, collect_kv: bool = False):
    """Residual stream [b, S, d] after all layers (before the final norm), for a batch in ring layout; with
    `collect_kv`, also every layer's keys and values, stacked: [L, b, S, hk, hd] each (ring layout)."""
    m, mesh = plan.cfg.model, plan.mesh
    axes = layer_axes(m)
    rope = rope_angles(batch.positions, m.head_dim, m.rope_theta)
    segment_ids = batch.segment_ids.astype(jnp.int32)

    def layer(x, p):
        x, kv = _layer(
            x,
            lambda x: _attention(x, p, axes, rope, segment_ids, plan),
            _use(p["wo"], axes["wo"], plan),
            lambda x: _feed_forward(x, p, axes, plan),
            lambda x: with_logical_constraint(x, RESIDUAL, mesh),
        )
        return x, (kv if collect_kv else None)

    if m.remat != "none" and not collect_kv:
        layer = jax.checkpoint(layer, policy=_REMAT[m.remat], prevent_cse=not m.scan_layers)
    x = with_logical_constraint(_embed(params, batch.tokens, batch.vision_mask, plan), RESIDUAL, mesh)
    if m.scan_layers:
        x, kv = lax.scan(layer, x, params["layers"])
    else:
        kvs = []
        for i in range(m.n_layers):
            x, kv = layer(x, jax.tree.map(lambda w, i=i: w[i], params["layers"]))
            kvs.append(kv)
        kv = jax.tree.map(lambda *a: jnp.stack(a), *kvs) if collect_kv else None
    return (x, kv) if collect_kv else x


def _head_weights(params: dict, plan: _Plan) -> tuple[jax.Array, jax.Array]:
    return tuple(_use(params[n], ("embed", "vocab"), plan) for n in ("lm_head", "vision_head"))


def _logits(h: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum("...d,dv->...v", h, w, preferred_element_type=F32)


def forward(params: dict, batch: Batch, cfg: Config, mesh: Mesh) -> tuple[jax.Array, jax.Array]:
    """Float32 logits (text [b, S, text_vocab], vision [b, S, vision_vocab]) in natural token order."""
    plan = _plan(cfg, mesh, batch)
    h = _trunk(params, _tokens_to_layout(batch, plan), plan)
    h = rms_norm(h, params["final_norm"], cfg.model.norm_eps)
    return tuple(
        _from_layout(_logits(h, w), ("batch", "seq", "act_vocab"), plan) for w in _head_weights(params, plan)
    )


def _cross_entropy(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """Per-position CE of float32 logits [..., V] (vocabulary may be sharded) against ids [...]."""
    hit = lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == ids[..., None]
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)


def _ce_sums(params: dict, batch: Batch, plan: _Plan, n_buckets: int) -> jax.Array:
    """[n_buckets, 4] sums (text CE, text weight, vision CE, vision weight) over the batch's masked targets,
    bucketed by the input token's position in its document (equal slices of the sequence length).
    Computed in sequence chunks; the layout is never undone (sums do not care about token order)."""
    batch = _tokens_to_layout(batch, plan)
    h = _trunk(params, batch, plan)
    w_text, w_vision = _head_weights(params, plan)
    eps = plan.cfg.model.norm_eps
    width = -(-batch.tokens.shape[1] // n_buckets)

    @partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
    def chunk_sums(h, targets, is_vision, weight, positions):  # [b, sp, chunk, (d)] -> [n_buckets, 4]
        h = rms_norm(h, params["final_norm"], eps)
        ce_text = _cross_entropy(_logits(h, w_text), jnp.where(is_vision, 0, targets))
        ce_vision = _cross_entropy(_logits(h, w_vision), jnp.where(is_vision, targets, 0))
        w_t = jnp.where(is_vision, 0.0, weight)
        w_v = jnp.where(is_vision, weight, 0.0)
        per_token = jnp.stack([ce_text * w_t, w_t, ce_vision * w_v, w_v], axis=-1)  # [..., 4]
        bucket = jax.nn.one_hot(jnp.minimum(positions // width, n_buckets - 1), n_buckets, dtype=F32)
        return jnp.einsum("...n,...k->nk", bucket, per_token)

    xs = (
        h,
        batch.targets,
        batch.target_vision_mask.astype(bool),
        batch.loss_mask.astype(F32),
        batch.positions,
    )
    xs = tuple(_seq_chunks(x, plan.loss_chunk, plan) for x in xs)
    zero = jnp.zeros((n_buckets, 4), F32)
    return lax.scan(lambda acc, xc: (acc + chunk_sums(*xc), None), zero, xs)[0]


def loss_from_sums(sums: jax.Array) -> tuple[jax.Array, dict]:
    """The training loss and its metrics from `_ce_sums`'s [4] (or [n, 4], summed) totals: 0.5 * (text CE +
    vision CE), each averaged over its own masked targets; an absent modality is left out of the average."""
    text_sum, text_n, vision_sum, vision_n = sums.reshape(-1, 4).sum(0)
    text_loss = text_sum / jnp.maximum(text_n, 1.0)
    vision_loss = vision_sum / jnp.maximum(vision_n, 1.0)
    present = (text_n > 0).astype(F32) + (vision_n > 0).astype(F32)
    loss = (text_loss + vision_loss) / jnp.maximum(present, 1.0)  # an absent modality contributes 0
    metrics = {
        "loss": loss,
        "text_loss": text_loss,
        "vision_loss": vision_loss,
        "text_tokens": text_n,
        "vision_tokens": vision_n,
    }
    return loss, metrics


def loss_fn(params: dict, batch: Batch, cfg: Config, mesh: Mesh) -> tuple[jax.Array, dict]:
    """The training loss of `loss_from_sums` on `batch`. Returns (loss, metrics)."""
    return loss_from_sums(_ce_sums(params, batch, _plan(cfg, mesh, batch), 1))


def bucket_sums(params: dict, batch: Batch, cfg: Config, mesh: Mesh, n_buckets: int) -> jax.Array:
    """[n_buckets, 4] CE sums and target counts (text, vision) by position bucket, for validation."""
    return _ce_sums(params, batch, _plan(cfg, mesh, batch), n_buckets)


# ----------------------------------------------------------------------------------------------------------
# Training step


def opt_state_shardings(cfg: Config, mesh: Mesh, optimizer: optax.GradientTransformation):
    """Shardings of `optimizer`'s state: parameter-shaped leaves like their parameter, the rest replicated."""
    state = jax.eval_shape(optimizer.init, param_shapes(cfg.model))
    return optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        state,
        param_shardings(cfg, mesh),
        transform_non_params=lambda _: replicated(mesh),
    )


def init_opt_state(cfg: Config, mesh: Mesh, optimizer: optax.GradientTransformation, params: dict):
    """Optimizer state created directly on its shardings."""
    return jax.jit(optimizer.init, out_shardings=opt_state_shardings(cfg, mesh, optimizer))(params)


def _microbatches(batch: Batch, n: int, mesh: Mesh) -> Batch:
    """[B, S] fields -> [n, B / n, S]; microbatch i holds rows i, i + n, ... so no row changes device."""

    def split(x):
        b, s = x.shape
        y = x.reshape(b // n, n, s).swapaxes(0, 1)
        return with_logical_constraint(y, (None, *TOKENS), mesh)

    return jax.tree.map(split, batch)


def make_train_step(cfg: Config, mesh: Mesh, optimizer: optax.GradientTransformation):
    """Jitted `step(params, opt_state, batch) -> (params, opt_state, metrics)`; params and state are donated.

    With `train.grad_accum` > 1 the batch is split into that many microbatches whose gradients (and metrics)
    are averaged. With `train.nonfinite == "skip"` a step whose loss or gradient is not finite leaves params
    and optimizer state unchanged; `metrics["finite"]` says which happened."""
    p_sh = param_shardings(cfg, mesh)
    o_sh = opt_state_shardings(cfg, mesh, optimizer)
    accum, skip = cfg.train.grad_accum, cfg.train.nonfinite == "skip"
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def grads_and_metrics(params, batch):
        if accum == 1:
            (_, metrics), grads = grad_fn(params, batch, cfg, mesh)
            return grads, metrics
        micro = tuple(_microbatches(batch, accum, mesh))
        value_and_grad = lambda mb: grad_fn(params, Batch(*mb), cfg, mesh)
        shapes = jax.eval_shape(value_and_grad, jax.tree.map(lambda x: x[0], micro))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        add = lambda total, mb: (jax.tree.map(jnp.add, total, value_and_grad(mb)), None)
        (_, metrics), grads = jax.tree.map(lambda x: x / accum, lax.scan(add, zeros, micro)[0])
        return grads, metrics

    def step(params, opt_state, batch):
        grads, metrics = grads_and_metrics(params, batch)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        if skip:
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            new_params, new_opt_state = keep(new_params, params), keep(new_opt_state, opt_state)
        return new_params, new_opt_state, {**metrics, "grad_norm": grad_norm, "finite": finite}

    return jax.jit(
        step,
        in_shardings=(p_sh, o_sh, batch_shardings(mesh)),
        out_shardings=(p_sh, o_sh, replicated(mesh)),
        donate_argnums=(0, 1),
    )


# ----------------------------------------------------------------------------------------------------------
# Inference: a sequence-sharded KV cache, ring-attention prefill, and dense extension steps

CACHE_AXES = ("layers", "batch", "seq", "act_kv_heads", None)  # [L, b, S, hk, hd]


class KVCache(NamedTuple):
    """Keys and values of every layer in natural token order, sharded over sp on the sequence axis.

    k, v: [layers, batch, max_len, kv_heads, head_dim]; length: [batch] int32 tokens held per row (row r's
    tokens occupy [0, length[r]); slots past it are free)."""

    k: jax.Array
    v: jax.Array
    length: jax.Array


def cache_sharding(mesh: Mesh) -> KVCache:
    kv = logical_sharding(mesh, CACHE_AXES)
    return KVCache(kv, kv, replicated(mesh))


def prefill(
    params: dict, batch: Batch, lengths: jax.Array, cfg: Config, mesh: Mesh, max_len: int
) -> tuple[jax.Array, jax.Array, KVCache]:
    """Run right-padded prompts (batch fields [b, S], row r real for its first lengths[r] tokens) through the
    model with ring attention over sp. Returns the text and vision logits [b, V] at each row's last prompt
    token and a KVCache of `max_len` slots holding the prompts."""
    plan = _plan(cfg, mesh, batch)
    h, (k, v) = _trunk(params, _tokens_to_layout(batch, plan), plan, collect_kv=True)
    h = _from_layout(h, RESIDUAL, plan)
    k, v = (_from_layout(x, CACHE_AXES, plan) for x in (k, v))
    pad = [(0, 0), (0, 0), (0, max_len - k.shape[2]), (0, 0), (0, 0)]
    k, v = (with_logical_constraint(jnp.pad(x, pad), CACHE_AXES, mesh) for x in (k, v))
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [b, d]
    last = rms_norm(last, params["final_norm"], cfg.model.norm_eps)
    text, vision = (_logits(last, w) for w in _head_weights(params, plan))
    return text, vision, KVCache(k, v, lengths.astype(jnp.int32))


def extend(
    params: dict, cache: KVCache, tokens: jax.Array, vision_mask: jax.Array, cfg: Config, mesh: Mesh
) -> tuple[jax.Array, jax.Array, KVCache]:
    """Append `tokens` [b, T] (vision_mask [b, T]) to every row of the cache and return their text and vision
    logits [b, T, V] and the new cache. Attention is dense over the cache (its sequence axis stays sharded
    over sp; XLA reduces across devices), so T should be small: one token per step when decoding."""
    m = cfg.model
    plan = _Plan(cfg, mesh, 1, 1)
    b, T = tokens.shape
    S = cache.k.shape[2]
    positions = cache.length[:, None] + jnp.arange(T, dtype=jnp.int32)  # [b, T]
    rope = rope_angles(positions, m.head_dim, m.rope_theta)
    rows = jnp.arange(b)[:, None]  # [b, 1]: with positions [b, T], the slots the new tokens take
    visible = jnp.arange(S)[None, None, :] <= positions[..., None]  # [b, T, S]
    axes = layer_axes(m)
    g = m.n_heads // m.n_kv_heads

    def attend_cache(x, p, k_all, v_all, i):
        """The new tokens written into layer i of the carried cache, then attending densely over that layer.
        The write scatters T slots per row (in place), not a rewrite of all S slots; slots past the cache are
        dropped (`_check_room` keeps callers from asking for them)."""
        q, k, v = _qkv(x, p, axes, rope, plan)
        k_all, v_all = (
            with_logical_constraint(
                c.at[i, rows, positions].set(n.astype(c.dtype), mode="drop"), CACHE_AXES, mesh
            )
            for c, n in ((k_all, k), (v_all, v))
        )
        kc, vc = k_all[i], v_all[i]
        qg = q.reshape(b, T, m.n_kv_heads, g, m.head_dim).astype(F32) * m.head_dim**-0.5
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, kc.astype(F32))
        probs = jax.nn.softmax(jnp.where(visible[:, None, None], scores, -jnp.inf), axis=-1)
        o = jnp.einsum("bkgts,bskd->btkgd", probs, vc.astype(F32)).reshape(b, T, m.n_heads, m.head_dim)
        return o, (k_all, v_all)

    def layer(carry, p):
        x, k_all, v_all, i = carry
        attend = lambda x: attend_cache(x, p, k_all, v_all, i)
        ff = lambda x: _swiglu_block(x, p, axes, plan)
        x, (k_all, v_all) = _layer(x, attend, _use(p["wo"], axes["wo"], plan), ff)
        return (x, k_all, v_all, i + 1), None

    x = _embed(params, tokens, vision_mask, plan)
    (x, k_all, v_all, _), _ = lax.scan(layer, (x, cache.k, cache.v, jnp.int32(0)), params["layers"])
    h = rms_norm(x, params["final_norm"], m.norm_eps)
    text, vision = (_logits(h, w) for w in _head_weights(params, plan))
    return text, vision, KVCache(k_all, v_all, cache.length + T)
